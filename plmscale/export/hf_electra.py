"""ELECTRA's two networks as two `transformers` checkpoints, as Google released them:

    OUTPUT/discriminator   ElectraForPreTraining (replaced-token logits; the model to fine-tune)
    OUTPUT/generator       ElectraForMaskedLM (the small generator, its embeddings the discriminator's)

ELECTRA is BERT's post-LN encoder (`model.layernorm_position: post`, `model.embedding_layernorm`), so the
trunks map by BERT's rules (`hf_mapping.bert_rules`) with `electra.` for `bert.`; the generator's layers by
the rules of its own width, its embeddings (and their LayerNorm) being the discriminator's. Each export is
loaded back with `transformers` and its logits compared with plmscale's, as for every export.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import ElectraConfig

from plmscale.config import ModelConfig
from plmscale.export.hf import HF_WEIGHTS, hf_tokenizer, verify_export
from plmscale.export.hf_mapping import ACTIVATION_TO_HF, Rule, bert_rules, renamed
from plmscale.model.electra import Electra, GeneratorMaskedLM
from plmscale.tokenizer import PAD_ID


def electra_config(cfg: ModelConfig, generator: bool) -> ElectraConfig:
    width = cfg.generator_config() if generator else cfg
    return ElectraConfig(
        vocab_size=cfg.padded_vocab_size,
        embedding_size=cfg.hidden_size,
        hidden_size=width.hidden_size,
        num_hidden_layers=width.num_layers,
        num_attention_heads=width.num_heads,
        intermediate_size=width.ffn_size,
        hidden_act=ACTIVATION_TO_HF[cfg.activation],
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size or 1,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.layernorm_eps,
        pad_token_id=PAD_ID,
        tie_word_embeddings=True,
        architectures=["ElectraForMaskedLM" if generator else "ElectraForPreTraining"],
    )


def _trunk(rules: list[Rule], prefix: str, layers: bool) -> list[Rule]:
    """BERT's trunk rules, the layers' or the embeddings', under plmscale's `prefix` and HF's `electra.`."""
    return [
        Rule(prefix + rule.ours, tuple(t.replace("bert.", "electra.", 1) for t in rule.theirs), *rule[2:])
        for rule in rules
        if rule.ours.startswith("layers.") == layers and not rule.theirs[0].startswith("cls.")
    ]


def electra_rules(cfg: ModelConfig, generator: bool) -> list[Rule]:
    embeddings = _trunk(bert_rules(cfg), "discriminator.", layers=False)
    if not generator:
        head = [("discriminator.head.dense", "discriminator_predictions.dense")]
        head += [("discriminator.head.prediction", "discriminator_predictions.dense_prediction")]
        layers = _trunk(bert_rules(cfg), "discriminator.", layers=True)
    else:
        gen = cfg.generator_config()
        head = [("generator.head.dense", "generator_predictions.dense")]
        head += [("generator.head.ln", "generator_predictions.LayerNorm")]
        if gen.hidden_size != cfg.hidden_size:
            head += [("generator.project", "electra.embeddings_project")]
        layers = _trunk(bert_rules(gen), "generator.trunk.", layers=True)
        embeddings.append(renamed("generator.head.output.bias", "generator_lm_head.bias"))
    heads = [renamed(f"{o}.{kind}", f"{t}.{kind}") for o, t in head for kind in ("weight", "bias")]
    return embeddings + layers + heads


def to_electra_weights(state: dict[str, torch.Tensor], cfg: ModelConfig, generator: bool) -> dict:
    out = {}
    for rule in electra_rules(cfg, generator):
        out |= zip(rule.theirs, rule.to_hf(state[rule.ours]), strict=True)
    if not cfg.type_vocab_size:  # ELECTRA always adds a segment: one zero row adds nothing
        out["electra.embeddings.token_type_embeddings.weight"] = torch.zeros(1, cfg.hidden_size)
    return {name: tensor.contiguous() for name, tensor in out.items()}


def export_electra(model: Electra, tokenizer_path: Path, out: Path) -> Path:
    """Write and verify both checkpoints under `out`; each holds the tokenizer too."""
    cfg = model.cfg
    for name, generator, network in (
        ("discriminator", False, model.discriminator),
        ("generator", True, GeneratorMaskedLM(model)),
    ):
        directory = out / name
        directory.mkdir(parents=True, exist_ok=True)
        electra_config(cfg, generator).save_pretrained(directory)
        weights = to_electra_weights(model.state_dict(), cfg, generator)
        save_file(weights, str(directory / HF_WEIGHTS), metadata={"format": "pt"})
        if tokenizer_path.is_file():
            hf_tokenizer(tokenizer_path, cfg).save_pretrained(directory)
        verify_export(network, tokenizer_path, directory)
    return out
