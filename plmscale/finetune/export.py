"""Export a fine-tuned directory as `transformers`' `*ForSequenceClassification`; prove it computes the same.

The trunk goes through the MLM export's weight mapping (`plmscale.export.hf_mapping`), keeping the `bert.*`
tensors and leaving out the pre-training heads; the head is `bert.pooler.dense` and `classifier`. The config
is the MLM export's with the labels (`id2label`), `num_labels` and `problem_type` (`regression` for one
output). `export_classifier_hf` ends by loading the export with `transformers` and comparing its logits with
plmscale's on a batch with a padded row and two segments, and the tokenizer's ids and segment ids for a
sentence pair with plmscale's encoding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from plmscale.config import ConfigError
from plmscale.export.hf import ATOL, HF_WEIGHTS, hf_tokenizer, load_hf_model
from plmscale.export.hf_mapping import family, hf_config, to_hf_weights
from plmscale.finetune.head import SequenceClassifier
from plmscale.finetune.task import Example
from plmscale.finetune.train import encode_examples, load_finetuned
from plmscale.model_dir import CONFIG, TOKENIZER
from plmscale.tokenizer import Tokenizer

CHECK_PAIR = ("Return the absolute value of x.", "Naïve café, 42 times!")


def classifier_weights(model: SequenceClassifier) -> dict[str, torch.Tensor]:
    trunk = to_hf_weights(model.trunk.state_dict(), model.trunk.cfg)
    weights = {k: v for k, v in trunk.items() if k.startswith("bert.") and not k.startswith("bert.pooler.")}
    head = model.head.state_dict()
    for kind in ("weight", "bias"):
        weights[f"bert.pooler.dense.{kind}"] = head[f"pooler.{kind}"]
        weights[f"classifier.{kind}"] = head[f"classifier.{kind}"]
    return {k: v.detach().contiguous() for k, v in weights.items()}


def export_classifier_hf(finetuned_dir: str | Path, output_dir: str | Path) -> Path:
    """Write config.json, model.safetensors and the tokenizer to `output_dir`, then verify them."""
    finetuned_dir, out = Path(finetuned_dir), Path(output_dir)
    model, results = load_finetuned(finetuned_dir)
    cfg, task = model.trunk.cfg, results["task"]
    try:
        config = hf_config(cfg)
    except ValueError as err:
        raise ConfigError(f"{finetuned_dir / CONFIG}: {err}") from None
    config.architectures = [family(cfg) + "ForSequenceClassification"]
    config.num_labels = model.head.classifier.out_features
    if task["kind"] == "regression":
        config.problem_type = "regression"
    else:
        config.problem_type = "single_label_classification"
        config.id2label = dict(enumerate(task["labels"]))
        config.label2id = {name: i for i, name in enumerate(task["labels"])}
    if family(cfg) == "Bert":  # Megatron-BERT's classifier dropout is its hidden dropout
        config.classifier_dropout = results["settings"]["dropout"]
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(classifier_weights(model), str(out / HF_WEIGHTS), metadata={"format": "pt"})
    hf_tokenizer(finetuned_dir / TOKENIZER, cfg).save_pretrained(out)
    verify_classifier_export(
        model, Tokenizer(finetuned_dir / TOKENIZER), out, results["settings"]["max_seq_length"]
    )
    return out


@torch.inference_mode()
def classifier_logit_difference(model: SequenceClassifier, hf) -> float:
    """Max |plmscale logit - transformers logit| on a fixed random batch, a padded row, segments A and B."""
    cfg = model.trunk.cfg
    seq = min(16, cfg.max_position_embeddings)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, cfg.vocab_size, (2, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, seq // 2 :] = 0
    segments = 2 if cfg.type_vocab_size >= 2 else 1
    token_type_ids = ((torch.arange(seq) >= seq // 2) & (segments == 2)).long().expand(2, seq)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    ours = model.eval()(**inputs)
    return (ours.float() - hf(**inputs).logits.float()).abs().max().item()


def verify_classifier_export(
    model: SequenceClassifier, tokenizer: Tokenizer, export_dir: Path, max_length: int
) -> None:
    hf, info = load_hf_model(export_dir)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"export {export_dir}: transformers could not load every weight: {problems}")
    diff = classifier_logit_difference(model, hf)
    if diff > ATOL:
        raise RuntimeError(
            f"export {export_dir}: transformers' {type(hf).__name__} differs from plmscale's classifier "
            f"(max |logit difference| {diff:.3g}); the weight mapping is wrong"
        )
    from transformers import AutoTokenizer

    cfg = model.trunk.cfg
    text_pair = CHECK_PAIR[1] if cfg.type_vocab_size >= 2 else None
    ours = encode_examples(tokenizer, [Example(CHECK_PAIR[0], text_pair, "", 0)], cfg.max_position_embeddings)
    theirs = AutoTokenizer.from_pretrained(export_dir)(
        CHECK_PAIR[0],
        text_pair,
        truncation=True,
        max_length=cfg.max_position_embeddings,
        return_token_type_ids=True,
    )
    if (theirs["input_ids"], theirs["token_type_ids"]) != (ours.input_ids[0], ours.token_type_ids[0]):
        raise RuntimeError(
            f"export {export_dir}: the tokenizer encodes a sentence pair as {theirs['input_ids']} "
            f"(segments {theirs['token_type_ids']}), plmscale as {ours.input_ids[0]} "
            f"(segments {ours.token_type_ids[0]})"
        )
