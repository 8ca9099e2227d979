"""One typed config tree for every plmscale run, loaded from YAML and validated before any process starts.

A recipe (`launch/recipes/*.yaml`) names a DeepSpeed JSON under `ds_configs/` for the ZeRO settings only;
everything the recipe owns (batch sizes, optimizer, schedule, clipping, precision) is merged into it by
`deepspeed_config`, so each value has one source of truth.

Validation is strict: a key given twice, a misspelled key, a bool or a string where a number goes, a number
outside its range are each one line naming the file and the key. What needs the filesystem beyond the
recipe and its DeepSpeed JSON (data, output directory, teacher) is checked by plmscale/preflight.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from plmscale.config.recipe_yaml import DuplicateKeyError, parse_yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# Keys of the DeepSpeed JSON that the recipe derives; a ds_configs file that sets one is rejected.
RECIPE_OWNED_DS_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "bf16",
    "fp16",
}


class ConfigError(ValueError):
    """A user error in a recipe: the message names the file and key."""


class _Strict(BaseModel):
    # strict: `train_steps: true` is not 1 and `lr: "1"` not 1.0; no inf or nan anywhere
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    """The transformer trunk. `kind` picks the attention mask and the head: encoder = bidirectional + MLM
    head (exported as Megatron-BERT), decoder = causal + LM head (exported as GPT-2). An encoder with
    `pair_head` also has BERT's pooler and 2-way classifier on [CLS] (objectives mlm_nsp, mlm_sop).
    `layernorm_position: post` with `embedding_layernorm` is the original BERT's block (exported as BERT),
    so public BERT checkpoints import exactly; the defaults are the pre-LN trunk."""

    kind: Literal["encoder", "decoder"]
    vocab_size: int = Field(gt=4, description="tokenizer vocabulary; padded up for tensor parallelism")
    pad_vocab_to_multiple_of: int = Field(128, gt=0)
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    ffn_hidden_size: int | None = Field(None, gt=0, description="defaults to 4 * hidden_size")
    max_position_embeddings: int = Field(gt=0)
    type_vocab_size: int = Field(2, ge=0, description="segment embeddings (encoder pair objectives)")
    # Left out of dumps while false, so that configs and checkpoints written before it existed still match.
    pair_head: bool = Field(
        False, exclude_if=lambda value: not value, description="pooler + NSP/SOP classifier (encoder)"
    )
    # The variants below are left out of dumps at their defaults, as pair_head is.
    layernorm_position: Literal["pre", "post"] = Field(
        "pre",
        exclude_if=lambda value: value == "pre",
        description="pre: LayerNorm before attention / MLP and a final LayerNorm (GPT-2, Megatron-BERT); "
        "post: after each residual add, no final LayerNorm (BERT)",
    )
    embedding_layernorm: bool = Field(
        False, exclude_if=lambda value: not value, description="LayerNorm on the summed embeddings (BERT)"
    )
    activation: Literal["gelu", "gelu_tanh"] = Field(
        "gelu",
        exclude_if=lambda value: value == "gelu",
        description="MLP (and MLM head) activation: exact GELU, or its tanh approximation (GPT-2's gelu_new)",
    )
    embedding_size: int | None = Field(
        None,
        gt=0,
        exclude_if=lambda value: value is None,
        description="ALBERT's factorized embedding: word, position and segment embeddings of this size "
        "(at most hidden_size), projected to hidden_size; the MLM head projects back to it",
    )
    layer_groups: int | None = Field(
        None,
        gt=0,
        exclude_if=lambda value: value is None,
        description="ALBERT's cross-layer sharing: this many distinct layers (dividing num_layers), layer i "
        "running those of group i * layer_groups // num_layers (1: all layers share one)",
    )
    span_boundary_head: bool = Field(
        False,
        exclude_if=lambda value: not value,
        description="SpanBERT's span-boundary head (objective mlm_sbo)",
    )
    span_offset_size: int | None = Field(
        None,
        gt=0,
        exclude_if=lambda value: value is None,
        description="width of the span-boundary head's offset embedding, concatenated with the two boundary "
        "states (SpanBERT's code: 200); default hidden_size",
    )
    generator_hidden_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        exclude_if=lambda value: value is None,
        description="ELECTRA (objective electra): this model is the discriminator, and a generator of this "
        "fraction of its width (hidden size, heads, FFN; 1/4 to 1/3 in the paper) shares its embeddings",
    )
    attention_head_dim: int | None = Field(
        None,
        gt=0,
        exclude_if=lambda value: value is None,
        description="width of each attention head, when not hidden_size / num_heads: a head-pruned model "
        "(`plmscale prune`) keeps its heads' width with fewer heads",
    )
    layernorm_eps: float = Field(1e-5, gt=0)
    hidden_dropout: float = Field(0.1, ge=0, lt=1)
    attention_dropout: float = Field(0.1, ge=0, lt=1)
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if self.attention_head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must divide model.hidden_size={self.hidden_size} "
                "(or set model.attention_head_dim)"
            )
        if self.pair_head and self.kind != "encoder":
            raise ValueError("model.pair_head needs model.kind: encoder")
        self._check_albert()
        if self.span_boundary_head and self.kind != "encoder":
            raise ValueError("model.span_boundary_head needs model.kind: encoder")
        if self.span_offset_size is not None and not self.span_boundary_head:
            raise ValueError(
                "model.span_offset_size sizes the span-boundary head: set model.span_boundary_head"
            )
        if self.generator_hidden_fraction is not None:
            self._check_generator()
        return self

    def _check_generator(self) -> None:
        """ELECTRA is BERT's post-LN encoder (so it exports as transformers' ElectraFor* classes), without
        a pair or span-boundary head; the generator's heads must divide its width."""
        key = f"model.generator_hidden_fraction={self.generator_hidden_fraction}"
        if self.kind != "encoder" or self.layernorm_position != "post" or not self.embedding_layernorm:
            raise ValueError(
                f"{key} (ELECTRA) builds BERT's encoder: set model.kind: encoder, "
                "model.layernorm_position: post and model.embedding_layernorm: true"
            )
        if self.pair_head or self.span_boundary_head:
            raise ValueError(f"{key} (ELECTRA) takes neither model.pair_head nor model.span_boundary_head")
        gen = self.generator_config()
        if gen.hidden_size % gen.num_heads:
            raise ValueError(
                f"{key}: the generator's {gen.num_heads} heads do not divide its hidden size {gen.hidden_size}"
            )

    def generator_config(self) -> ModelConfig:
        """ELECTRA's generator: the discriminator's depth, `generator_hidden_fraction` of its hidden size,
        heads and FFN width (as ELECTRA's `get_generator_config`), at least one head."""
        fraction = self.generator_hidden_fraction
        return self.model_copy(
            update={
                "hidden_size": max(1, round(self.hidden_size * fraction)),
                "num_heads": max(1, round(self.num_heads * fraction)),
                "ffn_hidden_size": max(1, round(self.ffn_size * fraction)),
                "generator_hidden_fraction": None,
            }
        )

    def _check_albert(self) -> None:
        if self.embedding_size is not None:
            if self.kind != "encoder":
                raise ValueError("model.embedding_size (factorized embedding) needs model.kind: encoder")
            if self.embedding_size > self.hidden_size:
                raise ValueError(
                    f"model.embedding_size={self.embedding_size} exceeds model.hidden_size={self.hidden_size} "
                    "(a factorized embedding is the smaller one)"
                )
        if self.layer_groups is not None and self.num_layers % self.layer_groups:
            raise ValueError(
                f"model.layer_groups={self.layer_groups} must divide model.num_layers={self.num_layers}"
            )

    @property
    def embed_size(self) -> int:
        """Width of the embeddings (and of the MLM head's output transform)."""
        return self.embedding_size or self.hidden_size

    @property
    def distinct_layers(self) -> int:
        return self.layer_groups or self.num_layers

    def layer_group(self, layer: int) -> int:
        """Which distinct layer's weights layer `layer` runs (itself, without sharing)."""
        return layer * self.distinct_layers // self.num_layers

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads

    @property
    def attention_width(self) -> int:
        """Width of the concatenated heads: the QKV projection's output per q, k, v; the hidden size unless
        `attention_head_dim` says otherwise."""
        return self.num_heads * self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_to_multiple_of) * self.pad_vocab_to_multiple_of

    def non_embedding_params(self) -> int:
        """Weights applied per token (a shared layer counts each time it runs): the 6N of model FLOPs."""
        h, a, f = self.hidden_size, self.attention_width, self.ffn_size
        per_layer = 4 * h * a + 3 * a + h + 2 * h * f + f + h + 4 * h  # attention, MLP, two LayerNorms
        return self.num_layers * per_layer


class DataConfig(_Strict):
    shards: str = Field(
        min_length=1, description="directory written by `plmscale prep shards` (has manifest.json)"
    )
    instances: str | None = Field(
        None,
        description="pre-masked training instances (`plmscale prep instances`) instead of masking on the "
        "fly; the shards still give the tokenizer and the held-out split",
    )
    eval_instances: str | None = Field(
        None,
        description="held-out instances (`plmscale prep instances --split valid`) for training's eval "
        "instead of the shards' valid split: scores the pair head too (pair_accuracy)",
    )
    train_split: str = "train"
    valid_split: str = "valid"
    seq_length: int = Field(gt=2)
    verify_checksums: bool = True


class ObjectiveConfig(_Strict):
    """`name` picks a registered objective; `params` are validated by that objective's own model."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class ParallelConfig(_Strict):
    tensor_parallel: int = Field(1, ge=1)
    pipeline_parallel: int = Field(1, ge=1)
    pipeline_partition: list[int] | None = Field(
        None, description="transformer layers per pipeline stage, first to last; default: an even split"
    )


class OptimizerConfig(_Strict):
    lr: float = Field(gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.98), strict=False)  # a YAML list; its items stay strict
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(ge=0, description="at least 1 to launch: DeepSpeed warms up over max(2, this)")
    decay: Literal["linear", "cosine"] = "linear"
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"each of Adam's betas must be in [0, 1), got {list(betas)}")
        return betas


class TrainConfig(_Strict):
    deepspeed_config: str = Field(min_length=1, description="path under ds_configs/ (ZeRO settings only)")
    micro_batch_size: int = Field(gt=0, description="sequences per process per micro-step")
    global_batch_size: int = Field(gt=0, description="sequences per optimizer step, all ranks")
    train_steps: int = Field(gt=0)
    seed: int = Field(1234, ge=0, le=2**63 - 1, description="numpy and torch seeds take 0 .. 2**63 - 1")
    precision: Literal["fp32", "bf16"] = "fp32"
    output_dir: str = Field(min_length=1)
    log_interval: int = Field(10, gt=0)
    eval_interval: int = Field(100, gt=0)
    eval_batches: int = Field(
        8, gt=0, description="held-out global batches per evaluation: the same sequences in every layout"
    )
    save_interval: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    reshardable_checkpoints: bool = Field(
        True,
        description="also save each checkpoint's layout-free state (plmscale/training/reshard.py), so that "
        "the run can resume at another TP x PP x DP or ZeRO stage; costs a gather and ~12 bytes a parameter",
    )
    activation_checkpointing: int = Field(
        0,
        ge=0,
        description="0: off; k: keep only the input of every k-th transformer layer and recompute its "
        "activations in the backward pass (1: every layer)",
    )
    on_nonfinite: Literal["skip", "stop"] = Field(
        "stop", description="a non-finite loss or gradient norm skips the update or stops the run"
    )
    max_skipped_steps: int = Field(
        10, ge=1, description="with on_nonfinite: skip, consecutive skipped steps that stop the run"
    )
    loss_spike_factor: float | None = Field(
        None,
        gt=1,
        description="if set, a loss above this factor x the median loss of the last loss_spike_window "
        "steps stops the run (the weights that made it are not saved)",
    )
    loss_spike_window: int = Field(100, gt=0)
    peak_flops: float = Field(
        989e12, gt=0, description="peak FLOP/s of one device, for MFU (default: H100/H200 dense bf16)"
    )
    init_from: str | None = Field(
        None,
        exclude_if=lambda value: value is None,
        description="model directory whose weights start the run (`plmscale import`, a finished run); "
        "its model section must match this one (dropout and init_std aside)",
    )


class DistillLossConfig(_Strict):
    """One entry of `distill.losses`: a registered loss (plmscale/distill/losses/), its weight, and its own
    keys, which that loss validates."""

    model_config = ConfigDict(extra="allow")
    name: str
    weight: float = Field(1.0, ge=0)


class DistillConfig(_Strict):
    """Teacher -> student: the student (the recipe's `model`, shallower and/or narrower) starts from
    `student_layers` of the teacher's layers (default: evenly spaced), sliced to its width, and learns from
    `losses` (default: the teacher's temperature-softened outputs, weight alpha, plus the hard loss)."""

    teacher: str = Field(description="a model directory written by `plmscale train`")
    student_layers: list[int] | None = None
    temperature: float | None = Field(None, gt=0, description="of the default soft loss; default 2.0")
    alpha: float | None = Field(None, ge=0, le=1, description="weight of the default soft loss; default 0.5")
    losses: list[DistillLossConfig] | None = Field(
        None, description="weighted losses, e.g. [{name: logits, temperature: 2}, {name: hidden, weight: 1}]"
    )
    teacher_cache: str | None = Field(
        None,
        description="a cache of the teacher's top-k logits (`plmscale distill-cache`), read instead of running "
        "the teacher: logits and hard losses only",
    )

    @model_validator(mode="after")
    def _losses_or_alpha(self) -> DistillConfig:
        given = [key for key in ("temperature", "alpha") if getattr(self, key) is not None]
        if self.losses is not None and given:
            raise ValueError(f"distill.{given[0]} sets the default losses; with distill.losses, weight each")
        if self.losses is not None and not self.losses:
            raise ValueError("distill.losses must not be empty")
        return self

    def loss_entries(self) -> list[tuple[str, float, dict[str, Any]]]:
        """(name, weight, the loss's own keys) of each loss, the defaults spelled out."""
        if self.losses is None:
            alpha, temperature = self.alpha if self.alpha is not None else 0.5, self.temperature or 2.0
            return [("logits", alpha, {"temperature": temperature}), ("hard", 1 - alpha, {})]
        return [(entry.name, entry.weight, dict(entry.model_extra)) for entry in self.losses]


class RunConfig(_Strict):
    model: ModelConfig
    data: DataConfig
    objective: ObjectiveConfig
    parallel: ParallelConfig = ParallelConfig()
    optimizer: OptimizerConfig
    train: TrainConfig
    distill: DistillConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.model.max_position_embeddings < self.data.seq_length:
            raise ValueError(
                f"data.seq_length={self.data.seq_length} exceeds "
                f"model.max_position_embeddings={self.model.max_position_embeddings}"
            )
        tp = self.parallel.tensor_parallel
        for what, size in (
            ("model.num_heads", self.model.num_heads),
            ("model.ffn_hidden_size", self.model.ffn_size),
            ("the padded vocabulary (model.pad_vocab_to_multiple_of)", self.model.padded_vocab_size),
        ):
            if size % tp:
                raise ValueError(f"parallel.tensor_parallel={tp} must divide {what}={size}")
        if self.model.generator_hidden_fraction is not None:
            gen = self.model.generator_config()
            for what, size in (("heads", gen.num_heads), ("FFN width", gen.ffn_size)):
                if size % tp:
                    raise ValueError(
                        f"parallel.tensor_parallel={tp} must divide the generator's {what} {size} "
                        f"(model.generator_hidden_fraction={self.model.generator_hidden_fraction})"
                    )
        stage = zero_stage(self.train.deepspeed_config)
        if self.parallel.pipeline_parallel > 1 and stage >= 2:
            raise ValueError(
                f"train.deepspeed_config uses ZeRO stage {stage} but parallel.pipeline_parallel="
                f"{self.parallel.pipeline_parallel}: DeepSpeed's pipeline engine supports ZeRO stage 0-1 only"
            )
        self._check_pipeline()
        if self.parallel.pipeline_parallel > 1 and self.model.distinct_layers < self.model.num_layers:
            raise ValueError(
                f"parallel.pipeline_parallel={self.parallel.pipeline_parallel} with model.layer_groups="
                f"{self.model.layer_groups}: a layer shared across stages would need its weights and "
                "gradients tied between stages; use tensor_parallel and ZeRO"
            )
        if self.distill and self.model.layer_groups is not None:
            raise ValueError("distill: a student with shared layers (model.layer_groups) is not supported")
        self._check_pipeline_heads()
        if self.train.activation_checkpointing > self.model.num_layers:
            raise ValueError(
                f"train.activation_checkpointing={self.train.activation_checkpointing} exceeds "
                f"model.num_layers={self.model.num_layers} (k checkpoints every k-th layer)"
            )
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.train.micro_batch_size}"
            )
        if self.distill and self.distill.student_layers is not None and not self.distill.student_layers:
            raise ValueError("distill.student_layers must not be empty")
        if self.distill and (
            self.model.span_boundary_head or self.model.generator_hidden_fraction is not None
        ):
            raise ValueError(
                "distill: the distillation loss covers a trunk's token loss only, not SpanBERT's boundary head "
                "(model.span_boundary_head) or ELECTRA's pair of models (model.generator_hidden_fraction)"
            )
        return self

    def _check_pipeline(self) -> None:
        pp, layers, partition = (
            self.parallel.pipeline_parallel,
            self.model.num_layers,
            self.parallel.pipeline_partition,
        )
        if partition is not None:
            if len(partition) != pp or min(partition) < 1 or sum(partition) != layers:
                raise ValueError(
                    f"parallel.pipeline_partition={partition} must give each of the "
                    f"parallel.pipeline_parallel={pp} stages at least one layer, {layers} (model.num_layers) in all"
                )
        elif layers % pp:
            raise ValueError(
                f"parallel.pipeline_parallel={pp} must divide model.num_layers={layers} "
                "(or set parallel.pipeline_partition)"
            )

    def _check_pipeline_heads(self) -> None:
        """Pipeline stages pass hidden states, masks and span boundaries; ELECTRA needs more."""
        pp = self.parallel.pipeline_parallel
        if pp > 1 and self.model.generator_hidden_fraction is not None:
            raise ValueError(
                f"parallel.pipeline_parallel={pp} with model.generator_hidden_fraction (ELECTRA): the "
                "generator's samples feed the discriminator's first layer, a second pass through every "
                "stage that DeepSpeed's pipeline schedule has no place for; use tensor_parallel and ZeRO"
            )

    def warnings(self, world_size: int) -> list[str]:
        """What is legal but likely a mistake, for a given number of processes."""
        found = []
        micro_batches, pp = self.check_world(world_size), self.parallel.pipeline_parallel
        if pp > 1 and micro_batches < pp:
            found.append(
                f"{micro_batches} micro-batch(es) per step for {pp} pipeline stages: the pipeline is idle "
                f"{(pp - 1) / (micro_batches + pp - 1):.0%} of the step; raise train.global_batch_size or "
                "lower train.micro_batch_size"
            )
        return found

    def check_world(self, world_size: int) -> int:
        """Checks what depends on the number of processes; returns the gradient-accumulation steps."""
        tp, pp = self.parallel.tensor_parallel, self.parallel.pipeline_parallel
        if world_size % (tp * pp):
            raise ConfigError(
                f"parallel.tensor_parallel={tp} x parallel.pipeline_parallel={pp} must divide the "
                f"world size {world_size}"
            )
        dp = world_size // (tp * pp)
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.train.micro_batch_size} x data-parallel size {dp}"
            )
        return self.train.global_batch_size // per_step

    @property
    def guarded_optimizer(self) -> bool:
        """ZeRO-0 in fp32 steps the bare torch optimizer, which neither reports the gradient norm nor skips
        a non-finite update: plmscale passes its own there (plmscale/training/guard.py), which clips too."""
        return zero_stage(self.train.deepspeed_config) == 0 and self.train.precision == "fp32"

    def deepspeed_config(self, world_size: int) -> dict[str, Any]:
        """The DeepSpeed JSON: the ZeRO file from ds_configs/ plus what this recipe owns."""
        grad_accum = self.check_world(world_size)
        ds = load_deepspeed_json(self.train.deepspeed_config)
        opt, steps = self.optimizer, self.train.train_steps
        if opt.decay == "linear":
            scheduler = {
                "type": "WarmupDecayLR",
                "params": {
                    "total_num_steps": steps,
                    "warmup_min_lr": 0.0,
                    "warmup_max_lr": opt.lr,
                    "warmup_num_steps": opt.warmup_steps,
                    "warmup_type": "linear",
                },
            }
        else:
            scheduler = {
                "type": "WarmupCosineLR",
                "params": {
                    "total_num_steps": steps,
                    "warmup_min_ratio": 0.0,
                    "warmup_num_steps": opt.warmup_steps,
                    "cos_min_ratio": opt.min_lr_ratio,
                    "warmup_type": "linear",
                },
            }
        offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        ds.update(
            train_micro_batch_size_per_gpu=self.train.micro_batch_size,
            gradient_accumulation_steps=grad_accum,
            train_batch_size=self.train.global_batch_size,
            gradient_clipping=opt.grad_clip,
            optimizer={
                "type": "AdamW",
                "params": {
                    "lr": opt.lr,
                    "betas": list(opt.betas),
                    "eps": opt.eps,
                    "weight_decay": opt.weight_decay,
                    # torch's AdamW unless ZeRO-Offload wants DeepSpeed's CPU Adam
                    "torch_adam": offload == "none",
                    # its fused kernel: one pass over each tensor instead of one per operation
                    **({"fused": True} if offload == "none" else {}),
                },
            },
            scheduler=scheduler,
            bf16={"enabled": self.train.precision == "bf16"},
        )
        if self.guarded_optimizer:
            del ds["optimizer"]
            ds["gradient_clipping"] = 0.0
        ds.setdefault("steps_per_print", 10**9)  # plmscale logs itself
        ds.setdefault("wall_clock_breakdown", False)
        return ds


def resolve_path(path: str) -> Path:
    """Paths in recipes are relative to the working directory, falling back to the repository root."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return REPO_ROOT / candidate


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ConfigError(f"key(s) {twice} given twice (JSON keeps the last silently)")
    return dict(pairs)


def load_deepspeed_json(path: str) -> dict[str, Any]:
    """The ZeRO settings file, checked for what needs no DeepSpeed import; plmscale/preflight.py checks
    every key against DeepSpeed's own config models."""
    file = resolve_path(path)
    if file.is_dir():
        raise ConfigError(f"train.deepspeed_config={path}: is a directory, not a DeepSpeed JSON file")
    try:
        ds = json.loads(file.read_text(), object_pairs_hook=_no_duplicate_keys)
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed_config: file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        where = f" at line {err.lineno}: {err.msg}" if isinstance(err, json.JSONDecodeError) else ""
        raise ConfigError(f"{file}: invalid JSON{where}") from None
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{file}: the top level must be a JSON object of DeepSpeed settings")
    owned = sorted(RECIPE_OWNED_DS_KEYS & ds.keys())
    if owned:
        raise ConfigError(
            f"{file}: key(s) {owned} are set by the recipe; remove them from the DeepSpeed JSON"
        )
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f'{file}: zero_optimization must be an object such as {{"stage": 2}}')
    stage = zero.get("stage", 0)
    if type(stage) is not int or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{file}: zero_optimization.stage must be 0-3, got {stage!r}")
    return ds


def zero_stage(path: str) -> int:
    return load_deepspeed_json(path).get("zero_optimization", {}).get("stage", 0)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`train.train_steps=50`-style overrides; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        try:
            node[leaf] = parse_yaml(value)
        except (yaml.YAMLError, DuplicateKeyError) as err:
            raise ConfigError(f"override {item!r}: invalid YAML value: {_one_line(err)}") from None
    return raw


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _problems(err: ValidationError, section: tuple[str, ...] = ()) -> str:
    """pydantic's errors as `section.key: message; ...`."""
    problems = []
    for error in err.errors():
        key = ".".join(str(p) for p in (*section, *error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        problems.append(message if message.startswith(key) else f"{key}: {message}")  # validators name keys
    return "; ".join(problems)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Loads and validates a recipe; every error names the file and the key."""
    file = Path(path)
    try:
        raw = parse_yaml(file.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"config file not found: {file}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: invalid YAML: {_one_line(err)}") from None
    except DuplicateKeyError as err:
        raise ConfigError(f"{file}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections")
    try:
        raw = apply_overrides(raw, overrides or [])
        for name, section in raw.items():
            if not isinstance(section, dict):
                raise ConfigError(f"{name}: must be a section (a mapping of keys), got {section!r}")
        deepspeed_json = raw.get("train", {}).get("deepspeed_config")
        if isinstance(deepspeed_json, str) and deepspeed_json:
            load_deepspeed_json(deepspeed_json)  # its errors name it, not the validator below
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{file}: {_problems(err)}") from None
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None
    from plmscale.objectives import available, get_objective, get_objective_class

    try:  # the objective validates its own params
        objective = get_objective(config.objective.name, config.objective.params, config.model)
    except ValidationError as err:
        raise ConfigError(f"{file}: {_problems(err, ('objective', 'params'))}") from None
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{file}: objective: {err.args[0]}") from None
    for key in ("instances", "eval_instances"):
        if getattr(config.data, key) and not objective.instance_fields:
            trained = [name for name in available() if get_objective_class(name).instance_fields]
            raise ConfigError(
                f"{file}: data.{key} serves the {', '.join(trained)} objectives, not {objective.name!r}"
            )
    _check_schedule(file, config)
    if config.train.init_from:
        _check_init_from(file, config)
    if config.distill:
        _check_distill_losses(file, config)
    if config.distill and objective.pair_task:
        raise ConfigError(
            f"{file}: distill: the distillation loss covers the token loss only, not objective "
            f"{objective.name!r}'s pair loss; use objective mlm (the student keeps the teacher's pair head)"
        )
    return config


def _check_distill_losses(file: Path, config: RunConfig) -> None:
    """Each loss's own keys; what needs the teacher's shape is checked before launch (plmscale/preflight.py)."""
    from plmscale.distill.losses import loss_class, validated_params

    for index, (name, _, params) in enumerate(config.distill.loss_entries()):
        key = f"distill.losses.{index}"
        try:
            validated_params(name, params, key)
        except ValueError as err:
            raise ConfigError(f"{file}: {err}") from None
        if config.distill.teacher_cache and not loss_class(name, key).from_cache:
            raise ConfigError(
                f"{file}: {key}.name={name} reads the teacher's layers, which distill.teacher_cache "
                "does not hold (its top-k logits only): needs the live teacher"
            )
        if loss_class(name, key).internals and config.parallel.pipeline_parallel > 1:
            raise ConfigError(
                f"{file}: {key}.name={name} reads the student's layers, which pipeline stages split: "
                "needs parallel.pipeline_parallel=1"
            )


def _check_schedule(file: Path, config: RunConfig) -> None:
    """What launching needs of the schedule (not part of RunConfig's validation: model directories saved by
    runs that warmed up longer than they trained still load)."""
    warmup, steps = config.optimizer.warmup_steps, config.train.train_steps
    if warmup < 1:  # WarmupDecayLR and WarmupCosineLR raise on warmup_num_steps <= 0
        raise ConfigError(
            f"{file}: optimizer.warmup_steps={warmup}: DeepSpeed's warm-up schedulers need >= 1"
        )
    if warmup > steps:
        raise ConfigError(f"{file}: optimizer.warmup_steps={warmup} exceeds train.train_steps={steps}")


def _check_init_from(file: Path, config: RunConfig) -> None:
    """The starting weights must be those of the network the recipe builds; only training-time settings
    (dropout, the init scale) may differ."""
    directory = Path(config.train.init_from)
    if config.distill and config.distill.student_layers is not None:
        raise ConfigError(
            f"{file}: distill.student_layers picks the teacher layers a student starts from; with "
            "train.init_from it starts from those weights (a pruned model's recovery)"
        )
    if not (directory / "config.yaml").is_file() or not (directory / "model.safetensors").is_file():
        raise ConfigError(
            f"{file}: train.init_from: {directory} is not a model directory (config.yaml, model.safetensors)"
        )
    theirs = ModelConfig.model_validate(yaml.safe_load((directory / "config.yaml").read_text())["model"])
    free = {"hidden_dropout", "attention_dropout", "init_std"}
    for key in ModelConfig.model_fields:
        if key not in free and getattr(theirs, key) != getattr(config.model, key):
            raise ConfigError(
                f"{file}: model.{key}={getattr(config.model, key)!r} but train.init_from={directory} has "
                f"{getattr(theirs, key)!r}"
            )


def save_config(config: RunConfig, path: str | Path) -> None:
    """As a recipe that `load_config` reads back: unset optional keys and sections are left out."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False))
