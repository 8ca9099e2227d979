"""Import a Hugging Face checkpoint directory as a plmscale model directory: start from public weights.

    plmscale import --format hf --input ckpt/bert-base-uncased --output runs/bert_base/model

Local files only: config.json and model.safetensors or pytorch_model.bin (read weights-only by
`transformers`). BERT (`BertForMaskedLM`, `BertForPreTraining`: post-LN with an embedding LayerNorm, built
with `model.layernorm_position: post` and `model.embedding_layernorm: true`), RoBERTa (`RobertaForMaskedLM`,
BERT's layout; the position rows before its first position id are dropped), Megatron-BERT, ALBERT
(`AlbertForMaskedLM`, `AlbertForPreTraining`: BERT's layout with `model.embedding_size` and
`model.layer_groups`) and GPT-2 (`GPT2LMHeadModel`). The weights go through the export's rules backwards
(`hf_mapping.py`), so `plmscale export` of the result gives back the same tensors bit for bit (RoBERTa's
unused position rows and padding id aside: they come back as zeros and [PAD]), and plmscale's logits are
checked against transformers' before anything is written. What plmscale cannot compute exactly (another
activation, relative positions, an output projection not tied to the word embedding, cross-attention,
ALBERT groups of more than one layer or that do not divide the layers evenly) is refused with the config
key that says so.

A checkpoint with its pair head's pooler but not its classifier (the hub's ALBERTs publish no SOP
classifier) imports with the classifier that transformers initializes, seeded, and meta.json lists it
under `initialized`: continued pre-training with SOP needs one. ALBERT's `classifier_dropout_prob` is not
kept: the pair head's dropout is `model.hidden_dropout`, a training setting like every dropout.

The vocabulary is kept as it is, rows and all: plmscale's padded vocabulary takes part in the softmax, so
padding it would change the logits. The tensor-parallel size must therefore divide the checkpoint's
vocabulary size (config validation says so); GPT-2's 50257 allows TP=1 only. The tokenizer is plmscale's
SentencePiece model or none: ALBERT's spiece.model has plmscale's special ids but spells [PAD] and [UNK]
`<pad>` and `<unk>`, and AlbertTokenizer lowercases and strips accents before SentencePiece runs, so it is
refused like any tokenizer whose special tokens differ.

The directory's config.yaml is a complete run config whose data, objective, optimizer and train sections
are defaults to override: train from the weights with `train.init_from: DIR` (README, "Starting from
public weights").
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import transformers
from pydantic import ValidationError
from transformers import AutoConfig, PretrainedConfig

from plmscale.config import ConfigError, ModelConfig, RunConfig
from plmscale.export.hf import ATOL, load_hf_model, logit_differences
from plmscale.export.hf_mapping import (
    ACTIVATION_FROM_HF,
    architecture,
    from_hf_weights,
    model_fields_from_hf,
    weight_rules,
)
from plmscale.model import TransformerLM
from plmscale.model_dir import TOKENIZER, save_model_dir
from plmscale.tokenizer import Tokenizer, file_sha256

# Loaded with its pre-training heads; a checkpoint without the pair head (pooler + NSP / SOP classifier)
# imports without one.
PRETRAINING_CLASS = {
    "albert": "AlbertForPreTraining",
    "bert": "BertForPreTraining",
    "megatron-bert": "MegatronBertForPreTraining",
    "gpt2": "GPT2LMHeadModel",
    "roberta": "RobertaForMaskedLM",
}
# The mapping's family of each model type that is not its layout's default.
FAMILY = {"roberta": "Roberta"}
# (pooler, classifier) of each pair head; ALBERT's are the SOP head's.
PAIR_HEAD = {
    "albert": ("albert.pooler", "sop_classifier.classifier"),
    "bert": ("bert.pooler.dense", "cls.seq_relationship"),
    "megatron-bert": ("bert.pooler.dense", "cls.seq_relationship"),
}


def weight_names(*modules: str) -> set[str]:
    return {f"{module}.{kind}" for module in modules for kind in ("weight", "bias")}


PAIR_HEAD_WEIGHTS = set().union(*(weight_names(*modules) for modules in PAIR_HEAD.values()))
# What a family computes whose config has no such key (transformers 5's ALBERT has none of them).
WITHOUT_KEY = {"position_embedding_type": "absolute", "add_cross_attention": False, "is_decoder": False}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_checkpoint_file(path: Path) -> bool:
    return (
        path.name == "config.json"
        or path.suffix in (".safetensors", ".bin")
        or path.name.endswith(".index.json")
    )


def unrepresentable(config: PretrainedConfig) -> str | None:
    """The first config setting plmscale's trunk cannot compute exactly, as `key=value (why)`, or None."""
    gpt2 = config.model_type == "gpt2"
    act_key = "activation_function" if gpt2 else "hidden_act"
    checks = [
        (act_key, ACTIVATION_FROM_HF, f"activations: {sorted(ACTIVATION_FROM_HF)}"),
        ("tie_word_embeddings", {True}, "the output projection is the word embedding"),
        ("add_cross_attention", {False}, "no cross-attention"),
    ]
    if gpt2:
        checks += [
            ("scale_attn_weights", {True}, "attention scores are scaled by 1/sqrt(head_dim)"),
            ("scale_attn_by_inverse_layer_idx", {False}, "attention scores are scaled by 1/sqrt(head_dim)"),
            ("embd_pdrop", {config.resid_pdrop}, "one model.hidden_dropout (resid_pdrop) for both"),
        ]
    else:
        checks += [
            ("is_decoder", {False}, "a BERT is a bidirectional encoder"),
            ("position_embedding_type", {"absolute"}, "learned absolute positions"),
        ]
    if config.model_type == "roberta":
        checks[0] = ("hidden_act", {"gelu"}, "RoBERTa's MLM head uses exact GELU, so its layers must too")
    if config.model_type == "albert":
        layers, hidden = config.num_hidden_layers, config.hidden_size
        # transformers runs group int(i / (L / G)) at layer i, plmscale i * G // L: the same when G divides L
        checks += [
            ("inner_group_num", {1}, "a layer group of one layer: plmscale shares single blocks"),
            (
                "num_hidden_groups",
                {g for g in range(1, layers + 1) if layers % g == 0},
                f"layers share weights in equal groups, so it must divide num_hidden_layers={layers}",
            ),
            ("embedding_size", range(1, hidden + 1), f"the embedding is at most hidden_size={hidden} wide"),
        ]
    for key, allowed, why in checks:
        value = getattr(config, key, WITHOUT_KEY.get(key))
        if value not in allowed:
            return f"{key}={value!r} ({why})"
    return None


def vocab_padding(vocab_size: int, rows: int) -> int:
    """`model.pad_vocab_to_multiple_of` that pads the tokenizer's vocabulary to exactly the checkpoint's
    rows: the largest power of two up to 128 that does, else the row count itself."""
    return next(m for m in (128, 64, 32, 16, 8, 4, 2, 1, rows) if math.ceil(vocab_size / m) * m == rows)


def default_run_config(model: ModelConfig) -> RunConfig:
    """A complete, valid run config around the imported model; every section but `model` is a default
    that the recipe training from these weights overrides (shards, batch, steps, output)."""
    encoder = model.kind == "encoder"
    return RunConfig.model_validate(
        {
            "model": model,
            "data": {"shards": "data/shards", "seq_length": min(model.max_position_embeddings, 512)},
            "objective": {"name": "mlm" if encoder else "causal_lm"},
            "optimizer": {"lr": 1e-4, "warmup_steps": 100},
            "train": {
                "deepspeed_config": "ds_configs/zero1.json",
                "micro_batch_size": 8,
                "global_batch_size": 256,
                "train_steps": 10000,
                "output_dir": "runs/from_hf",
            },
        }
    )


def load_checkpoint(directory: Path) -> tuple[transformers.PreTrainedModel, bool, list[str]]:
    """The checkpoint as its pre-training class, whether it has a pair head, and the weights transformers
    initialized: a pair head's classifier that a checkpoint with its pooler lacks (the hub's ALBERTs publish
    no SOP classifier). Refuses a checkpoint that leaves any other weight uninitialized or holds weights that
    the class does not use."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} is not a Hugging Face checkpoint directory (no config.json)")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{directory}: no weights ({' or '.join(WEIGHT_FILES)})")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if config.model_type not in PRETRAINING_CLASS:
        raise ConfigError(
            f"{config_file}: model_type={config.model_type!r}; plmscale imports {sorted(PRETRAINING_CLASS)}"
        )
    problem = unrepresentable(config)
    if problem:
        raise ConfigError(f"{config_file}: {problem} cannot be represented by plmscale's model")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the missing pair head is reported below, in our words
    try:
        with torch.random.fork_rng(devices=[]):  # the same initialized classifier on every import
            torch.manual_seed(0)
            hf, info = load_hf_model(directory, PRETRAINING_CLASS[config.model_type])
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = set(info["missing_keys"])
    pair_head, initialized = config.model_type in PAIR_HEAD, []
    if pair_head:
        pooler, classifier = PAIR_HEAD[config.model_type]
        head, classifier_weights = weight_names(pooler, classifier), weight_names(classifier)
        if missing >= head:  # no pair head: import the encoder and its MLM head
            missing -= head
            pair_head = False
        elif missing & head == classifier_weights:
            initialized = sorted(classifier_weights)
            missing -= classifier_weights
    problems = {
        "missing": sorted(missing),
        "unexpected": sorted(info["unexpected_keys"]),
        "wrong shape": sorted(str(k) for k in info["mismatched_keys"]),
    }
    problems = {what: names for what, names in problems.items() if names}
    if problems:
        raise ConfigError(f"{directory}: weights do not fit {type(hf).__name__}: {problems}")
    return hf, pair_head, initialized


def check_all_weights_used(weights: dict[str, torch.Tensor], cfg: ModelConfig, family: str | None) -> None:
    """Every tensor of the loaded model is converted or is a tied alias of one that is (the output
    projection), or is the untrained pair head of a checkpoint without one: nothing else is dropped."""
    used = {name for rule in weight_rules(cfg, family) for name in rule.theirs}
    used_storage = {weights[name].data_ptr() for name in used}
    left = sorted(
        name
        for name, tensor in weights.items()
        if name not in used
        and tensor.data_ptr() not in used_storage
        and not (name in PAIR_HEAD_WEIGHTS and not cfg.pair_head)
    )
    if left:
        raise RuntimeError(f"weights with no place in plmscale's {architecture(cfg, family)}: {left}")


def import_hf(input_dir: str | Path, output_dir: str | Path, tokenizer: str | Path | None = None) -> dict:
    """Convert, check logits against transformers, write the model directory; returns its meta.json."""
    source, out = Path(input_dir), Path(output_dir)
    if tokenizer is None and (source / TOKENIZER).is_file():
        tokenizer = source / TOKENIZER
    hf, pair_head, initialized = load_checkpoint(source)
    rows = hf.config.vocab_size
    vocab_size = rows
    if tokenizer is not None:
        try:
            vocab_size = Tokenizer(tokenizer).vocab_size
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if vocab_size > rows:
            raise ConfigError(
                f"{tokenizer}: {vocab_size} pieces, but {source}/config.json has vocab_size={rows}"
            )
    fields = model_fields_from_hf(hf.config)
    try:
        cfg = ModelConfig(
            **fields,
            vocab_size=vocab_size,
            pad_vocab_to_multiple_of=vocab_padding(vocab_size, rows),
            pair_head=pair_head,
        )
    except ValidationError as err:
        error = err.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ConfigError(f"{source}/config.json: {where + ': ' if where else ''}{error['msg']}") from None
    weights, family = hf.state_dict(), FAMILY.get(hf.config.model_type)
    state = from_hf_weights(weights, cfg, family)
    check_all_weights_used(weights, cfg, family)
    model = TransformerLM(cfg)
    model.load_state_dict(state)
    differences = logit_differences(model, hf)
    if max(differences.values()) > ATOL:
        raise RuntimeError(f"import {source}: plmscale's logits differ from transformers' by {differences}")
    meta = {
        "step": 0,
        "tokens": 0,
        "imported": {
            "format": "hf",
            "source": str(source.resolve()),
            "architecture": architecture(cfg, family),
            "files": {p.name: file_sha256(p) for p in sorted(source.iterdir()) if is_checkpoint_file(p)},
            "tokenizer": {"path": str(Path(tokenizer).resolve()), "sha256": file_sha256(tokenizer)}
            if tokenizer
            else None,
            "initialized": initialized,
            "transformers": transformers.__version__,
            "max_logit_difference": differences,
        },
    }
    save_model_dir(out, state, default_run_config(cfg), tokenizer, meta)
    return meta
