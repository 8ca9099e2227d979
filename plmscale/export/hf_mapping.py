"""How plmscale's model corresponds to `transformers`' BERT, Megatron-BERT, GPT-2, RoBERTa and ALBERT: one
table of weight rules and one pair of config translations, read in one direction by the export and in the
other by the import, so the two cannot drift apart.

RoBERTa computes what BERT's layout (post-LN, embedding LayerNorm) computes, with one difference of
bookkeeping: its position ids start after the padding id (`pad_token_id + 1`), so its position table has
that many unused rows in front of ours. An encoder with ALBERT's factorized embedding or shared layers
(`model.embedding_size`, `model.layer_groups`) is ALBERT, whose layer groups hold one layer each.

A rule ties one plmscale tensor to one or more `transformers` tensors with a function each way (rename,
transpose, split of the fused QKV projection) that moves values without arithmetic: HF -> plmscale -> HF is
bitwise exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from transformers import (
    AlbertConfig,
    BertConfig,
    GPT2Config,
    MegatronBertConfig,
    PretrainedConfig,
    RobertaConfig,
)

from plmscale.config import ModelConfig
from plmscale.tokenizer import CLS_ID, PAD_ID, SEP_ID

BERT_LAYOUT = ("encoder", "post", True)
# Which transformers family computes exactly what a (kind, layernorm_position, embedding_layernorm) builds.
FAMILIES = {("encoder", "pre", False): "MegatronBert", BERT_LAYOUT: "Bert", ("decoder", "pre", False): "GPT2"}
# Families that compute what a layout's default does too, chosen by name (`plmscale export --family`).
# ALBERT is the family of its own model options (`albert_options`), in BERT's layout.
ALTERNATIVES = {"Roberta": BERT_LAYOUT}
ACTIVATION_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}  # both as F.gelu computes them
# gelu_new is GPT-2's tanh GELU written out in elementary ops: the same function, last-bit differences.
ACTIVATION_FROM_HF = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


class Rule(NamedTuple):
    ours: str
    theirs: tuple[str, ...]
    to_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    from_hf: Callable[..., torch.Tensor]


def renamed(ours: str, theirs: str) -> Rule:
    return Rule(ours, (theirs,), lambda t: (t,), lambda t: t)


def transposed(ours: str, theirs: str) -> Rule:
    """GPT-2's Conv1D stores a linear weight as [in, out]."""
    return Rule(ours, (theirs,), lambda t: (t.T,), lambda t: t.T)


def split_qkv(fused: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Our fused QKV rows are [head, (q, k, v), head_dim]; return separate q, k, v (weights or biases)."""
    per_head = fused.view(cfg.num_heads, 3, cfg.head_dim, *fused.shape[1:])
    return [per_head[:, i].reshape(cfg.hidden_size, *fused.shape[1:]) for i in range(3)]


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The inverse of `split_qkv`."""
    per_head = [x.reshape(cfg.num_heads, cfg.head_dim, *x.shape[1:]) for x in (q, k, v)]
    return torch.stack(per_head, dim=1).reshape(3 * cfg.hidden_size, *q.shape[1:])


def with_full_heads(cfg: ModelConfig) -> ModelConfig:
    """The shape transformers builds: BERT's, Megatron-BERT's and GPT-2's heads are hidden_size / num_heads
    wide, and transformers 5 no longer prunes heads (`pruned_heads`). A model with fewer heads of their
    original width (`model.attention_head_dim`, a head-pruned model) exports with hidden_size / head_dim
    heads, the missing ones all zero (`full_heads`)."""
    if cfg.attention_head_dim is None:
        return cfg
    if cfg.hidden_size % cfg.head_dim or cfg.attention_width > cfg.hidden_size:
        raise ValueError(
            f"model.num_heads={cfg.num_heads} of model.attention_head_dim={cfg.head_dim} do not fit "
            f"model.hidden_size={cfg.hidden_size} in whole heads: transformers' attention takes each head "
            "to be hidden_size / num_heads wide"
        )
    return cfg.model_copy(update={"num_heads": cfg.hidden_size // cfg.head_dim, "attention_head_dim": None})


def full_heads(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`state` with the heads `with_full_heads` adds: zero query, key and value rows attend uniformly to
    zero values, and zero output columns add nothing, so the export computes exactly what the model does."""
    full = with_full_heads(cfg)
    missing = full.num_heads - cfg.num_heads
    if not missing:
        return state
    padded = dict(state)
    for name, tensor in state.items():
        if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            per_head = tensor.view(cfg.num_heads, 3 * cfg.head_dim, *tensor.shape[1:])
            zeros = per_head.new_zeros(missing, *per_head.shape[1:])
            padded[name] = torch.cat([per_head, zeros]).reshape(3 * full.hidden_size, *tensor.shape[1:])
        elif name.endswith("attn.proj.weight"):
            padded[name] = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], missing * cfg.head_dim)], 1)
    return padded


def albert_options(cfg: ModelConfig) -> bool:
    return cfg.embedding_size is not None or cfg.layer_groups is not None


def family(cfg: ModelConfig, name: str | None = None) -> str:
    """The transformers family that computes what `cfg` builds: its layout's, or `name` if that one does
    too (RoBERTa for BERT's layout)."""
    layout = (cfg.kind, cfg.layernorm_position, cfg.embedding_layernorm)
    where = (
        f"model.kind={cfg.kind} with model.layernorm_position={cfg.layernorm_position} and "
        f"model.embedding_layernorm={cfg.embedding_layernorm}"
    )
    if albert_options(cfg):
        if layout != BERT_LAYOUT or cfg.embedding_size is None:
            raise ValueError(
                f"model.embedding_size / model.layer_groups export as ALBERT, which needs model.embedding_size "
                f"set and BERT's layout {BERT_LAYOUT}; got embedding_size={cfg.embedding_size} and {where}"
            )
        default = "Albert"
    elif layout in FAMILIES:
        default = FAMILIES[layout]
    else:
        raise ValueError(f"{where} has no transformers architecture; exportable: {sorted(FAMILIES)}")
    if name is None or name == default:
        return default
    if ALTERNATIVES.get(name) != layout or albert_options(cfg):
        raise ValueError(f"{where} exports as {default}, not {name}")
    if name == "Roberta" and (cfg.pair_head or cfg.activation != "gelu"):
        raise ValueError(
            "RoBERTa has no pair head and its MLM head uses exact GELU: needs model.pair_head: false and "
            f"model.activation: gelu (got {cfg.pair_head}, {cfg.activation})"
        )
    return name


def architecture(cfg: ModelConfig, name: str | None = None) -> str:
    name = family(cfg, name)
    return (
        "GPT2LMHeadModel" if name == "GPT2" else name + ("ForPreTraining" if cfg.pair_head else "ForMaskedLM")
    )


def bert_rules(cfg: ModelConfig) -> list[Rule]:
    """BERT and Megatron-BERT share embeddings and heads; their blocks differ in where the LayerNorms sit."""
    plain = family(cfg) == "Bert"
    rules = [
        renamed("word_embeddings.weight", "bert.embeddings.word_embeddings.weight"),
        renamed("position_embeddings.weight", "bert.embeddings.position_embeddings.weight"),
        renamed("head.output.bias", "cls.predictions.bias"),
    ]
    if cfg.type_vocab_size:
        rules.append(renamed("token_type_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"))
    parts = [
        ("head.dense", "cls.predictions.transform.dense"),
        ("head.ln", "cls.predictions.transform.LayerNorm"),
    ]
    parts += [("embedding_ln", "bert.embeddings.LayerNorm")] if plain else [("final_ln", "bert.encoder.ln")]
    if cfg.pair_head:
        parts += [("pair_head.pooler", "bert.pooler.dense"), ("pair_head.classifier", "cls.seq_relationship")]
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"bert.encoder.layer.{i}."
        # Pre-LN: the LayerNorm before attention / MLP. Post-LN: the one after each residual add.
        ln_attn, ln_mlp = (
            ("attention.output.LayerNorm", "output.LayerNorm") if plain else ("attention.ln", "ln")
        )
        parts += [
            (ours + "ln_attn", theirs + ln_attn),
            (ours + "attn.proj", theirs + "attention.output.dense"),
            (ours + "ln_mlp", theirs + ln_mlp),
            (ours + "mlp.fc_in", theirs + "intermediate.dense"),
            (ours + "mlp.fc_out", theirs + "output.dense"),
        ]
        rules += qkv_rules(ours, theirs + "attention.self.", cfg)
    rules += [renamed(f"{o}.{kind}", f"{t}.{kind}") for o, t in parts for kind in ("weight", "bias")]
    return rules


def qkv_rules(ours: str, theirs: str, cfg: ModelConfig) -> list[Rule]:
    """plmscale's fused, head-interleaved QKV projection against separate query, key and value layers."""
    qkv = tuple(theirs + name for name in ("query", "key", "value"))
    return [
        Rule(
            ours + f"attn.qkv.{kind}",
            tuple(f"{name}.{kind}" for name in qkv),
            lambda t: tuple(split_qkv(t, cfg)),
            lambda q, k, v: merge_qkv(q, k, v, cfg),
        )
        for kind in ("weight", "bias")
    ]


def gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [
        renamed("word_embeddings.weight", "transformer.wte.weight"),
        renamed("position_embeddings.weight", "transformer.wpe.weight"),
        renamed("final_ln.weight", "transformer.ln_f.weight"),
        renamed("final_ln.bias", "transformer.ln_f.bias"),
    ]
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        rules += [
            Rule(
                ours + "attn.qkv.weight",
                (theirs + "attn.c_attn.weight",),
                lambda t: (torch.cat(split_qkv(t, cfg)).T,),
                lambda t: merge_qkv(*t.T.chunk(3), cfg),
            ),
            Rule(
                ours + "attn.qkv.bias",
                (theirs + "attn.c_attn.bias",),
                lambda t: (torch.cat(split_qkv(t, cfg)),),
                lambda t: merge_qkv(*t.chunk(3), cfg),
            ),
        ]
        for o, t in (("attn.proj", "attn.c_proj"), ("mlp.fc_in", "mlp.c_fc"), ("mlp.fc_out", "mlp.c_proj")):
            rules += [
                transposed(f"{ours}{o}.weight", f"{theirs}{t}.weight"),
                renamed(f"{ours}{o}.bias", f"{theirs}{t}.bias"),
            ]
        for o, t in (("ln_attn", "ln_1"), ("ln_mlp", "ln_2")):
            rules += [renamed(f"{ours}{o}.{kind}", f"{theirs}{t}.{kind}") for kind in ("weight", "bias")]
    return rules


ROBERTA_HEAD = {"cls.predictions.transform.dense": "lm_head.dense", "cls.predictions.transform.LayerNorm":
    "lm_head.layer_norm", "cls.predictions": "lm_head"}  # fmt: skip


def roberta_name(bert_name: str) -> str:
    module, kind = bert_name.rsplit(".", 1)
    return f"{ROBERTA_HEAD.get(module, module.replace('bert.', 'roberta.', 1))}.{kind}"


def roberta_rules(cfg: ModelConfig) -> list[Rule]:
    """BERT's rules under RoBERTa's names; the position table gains PAD_ID + 1 zero rows in front, and an
    import keeps the last max_position_embeddings rows (a checkpoint's own padding id may differ)."""
    rules = []
    for rule in bert_rules(cfg):
        if rule.ours == "position_embeddings.weight":
            rule = rule._replace(
                to_hf=lambda t: (torch.cat([t.new_zeros(PAD_ID + 1, t.shape[1]), t]),),
                from_hf=lambda t: t[-cfg.max_position_embeddings :],
            )
        rules.append(rule._replace(theirs=tuple(map(roberta_name, rule.theirs))))
    return rules


def albert_rules(cfg: ModelConfig) -> list[Rule]:
    """One ALBERT layer group (of one layer) per distinct layer of ours."""
    rules = [
        renamed("word_embeddings.weight", "albert.embeddings.word_embeddings.weight"),
        renamed("position_embeddings.weight", "albert.embeddings.position_embeddings.weight"),
        renamed("head.output.bias", "predictions.bias"),
    ]
    if cfg.type_vocab_size:
        rules.append(
            renamed("token_type_embeddings.weight", "albert.embeddings.token_type_embeddings.weight")
        )
    parts = [
        ("embedding_ln", "albert.embeddings.LayerNorm"),
        ("embedding_projection", "albert.encoder.embedding_hidden_mapping_in"),
        ("head.dense", "predictions.dense"),
        ("head.ln", "predictions.LayerNorm"),
    ]
    if cfg.pair_head:
        parts += [
            ("pair_head.pooler", "albert.pooler"),
            ("pair_head.classifier", "sop_classifier.classifier"),
        ]
    for group in range(cfg.distinct_layers):
        ours, theirs = f"layers.{group}.", f"albert.encoder.albert_layer_groups.{group}.albert_layers.0."
        parts += [
            (ours + "ln_attn", theirs + "attention.LayerNorm"),
            (ours + "attn.proj", theirs + "attention.dense"),
            (ours + "ln_mlp", theirs + "full_layer_layer_norm"),
            (ours + "mlp.fc_in", theirs + "ffn"),
            (ours + "mlp.fc_out", theirs + "ffn_output"),
        ]
        rules += qkv_rules(ours, theirs + "attention.", cfg)
    rules += [renamed(f"{o}.{kind}", f"{t}.{kind}") for o, t in parts for kind in ("weight", "bias")]
    return rules


def weight_rules(cfg: ModelConfig, name: str | None = None) -> list[Rule]:
    rules = {"GPT2": gpt2_rules, "Roberta": roberta_rules, "Albert": albert_rules}
    return rules.get(family(cfg, name), bert_rules)(cfg)


def to_hf_weights(
    state: dict[str, torch.Tensor], cfg: ModelConfig, name: str | None = None
) -> dict[str, torch.Tensor]:
    state, cfg = full_heads(state, cfg), with_full_heads(cfg)
    out = {}
    for rule in weight_rules(cfg, name):
        out |= zip(rule.theirs, rule.to_hf(state[rule.ours]), strict=True)
    if cfg.kind == "encoder" and not cfg.type_vocab_size:
        # BERTs always add a segment: a zero row adds nothing
        prefix = {"Roberta": "roberta", "Albert": "albert"}.get(family(cfg, name), "bert")
        out[f"{prefix}.embeddings.token_type_embeddings.weight"] = torch.zeros(1, cfg.embed_size)
    return out


def from_hf_weights(
    weights: dict[str, torch.Tensor], cfg: ModelConfig, name: str | None = None
) -> dict[str, torch.Tensor]:
    return {
        rule.ours: rule.from_hf(*(weights[theirs] for theirs in rule.theirs))
        for rule in weight_rules(cfg, name)
    }


def hf_config(cfg: ModelConfig, family_name: str | None = None) -> PretrainedConfig:
    """The `transformers` config of the architecture that computes what `cfg` builds."""
    cfg = with_full_heads(cfg)
    name = family(cfg, family_name)
    if name == "GPT2":
        return GPT2Config(
            vocab_size=cfg.padded_vocab_size,
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.ffn_size,
            n_positions=cfg.max_position_embeddings,
            activation_function=ACTIVATION_TO_HF[cfg.activation],
            resid_pdrop=cfg.hidden_dropout,
            embd_pdrop=cfg.hidden_dropout,
            attn_pdrop=cfg.attention_dropout,
            layer_norm_epsilon=cfg.layernorm_eps,
            initializer_range=cfg.init_std,
            # Packed streams end every document with [SEP]: it is the decoder's end-of-text.
            bos_token_id=SEP_ID,
            eos_token_id=SEP_ID,
            pad_token_id=PAD_ID,
            tie_word_embeddings=True,
            architectures=[architecture(cfg)],
        )
    extra = {}
    if name == "Roberta":
        extra = {"bos_token_id": CLS_ID, "eos_token_id": SEP_ID}
    if name == "Albert":
        extra = {
            "embedding_size": cfg.embed_size,
            "num_hidden_groups": cfg.distinct_layers,
            "inner_group_num": 1,
            "classifier_dropout_prob": cfg.hidden_dropout,
            "bos_token_id": CLS_ID,
            "eos_token_id": SEP_ID,
        }
    config_class = {"Bert": BertConfig, "Roberta": RobertaConfig, "Albert": AlbertConfig}
    return config_class.get(name, MegatronBertConfig)(
        **extra,
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size,
        hidden_act=ACTIVATION_TO_HF[cfg.activation],
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings + (PAD_ID + 1 if name == "Roberta" else 0),
        type_vocab_size=cfg.type_vocab_size or 1,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.layernorm_eps,
        pad_token_id=PAD_ID,
        tie_word_embeddings=True,
        architectures=[architecture(cfg, family_name)],
    )


def model_fields_from_hf(config: PretrainedConfig) -> dict:
    """`ModelConfig` fields from a BERT, RoBERTa, Megatron-BERT, ALBERT or GPT-2 config (the inverse of
    `hf_config`); vocabulary and pair head are the caller's, as they depend on the tokenizer and the weights."""
    if config.model_type == "gpt2":
        return {
            "kind": "decoder",
            "hidden_size": config.n_embd,
            "num_layers": config.n_layer,
            "num_heads": config.n_head,
            "ffn_hidden_size": config.n_inner or 4 * config.n_embd,
            "max_position_embeddings": config.n_positions,
            "type_vocab_size": 0,
            "activation": ACTIVATION_FROM_HF[config.activation_function],
            "layernorm_eps": config.layer_norm_epsilon,
            "hidden_dropout": config.resid_pdrop,
            "attention_dropout": config.attn_pdrop,
            "init_std": config.initializer_range,
        }
    plain = config.model_type in ("bert", "roberta", "albert")
    positions = config.max_position_embeddings
    if config.model_type == "roberta":  # positions start after the padding id
        positions -= config.pad_token_id + 1
    albert = {}
    if config.model_type == "albert":  # the dropout of its SOP head is model.hidden_dropout
        albert = {"embedding_size": config.embedding_size, "layer_groups": config.num_hidden_groups}
    return albert | {
        "kind": "encoder",
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "ffn_hidden_size": config.intermediate_size,
        "max_position_embeddings": positions,
        "type_vocab_size": config.type_vocab_size,
        "layernorm_position": "post" if plain else "pre",
        "embedding_layernorm": plain,
        "activation": ACTIVATION_FROM_HF[config.hidden_act],
        "layernorm_eps": config.layer_norm_eps,
        "hidden_dropout": config.hidden_dropout_prob,
        "attention_dropout": config.attention_probs_dropout_prob,
        "init_std": config.initializer_range,
    }
