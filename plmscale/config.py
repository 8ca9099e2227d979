"""One typed config tree for every plmscale run, loaded from YAML and validated before any process starts.

A recipe (`launch/recipes/*.yaml`) names a DeepSpeed JSON under `ds_configs/` for the ZeRO settings only;
everything the recipe owns (batch sizes, optimizer, schedule, clipping, precision) is merged into it by
`deepspeed_config`, so each value has one source of truth.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
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
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """The transformer trunk. `kind` picks the attention mask and the head: encoder = bidirectional + MLM
    head (exported as Megatron-BERT), decoder = causal + LM head (exported as GPT-2). An encoder with
    `pair_head` also has BERT's pooler and 2-way classifier on [CLS] (objectives mlm_nsp, mlm_sop)."""

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
    layernorm_eps: float = Field(1e-5, gt=0)
    hidden_dropout: float = Field(0.1, ge=0, lt=1)
    attention_dropout: float = Field(0.1, ge=0, lt=1)
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must divide model.hidden_size={self.hidden_size}"
            )
        if self.pair_head and self.kind != "encoder":
            raise ValueError("model.pair_head needs model.kind: encoder")
        return self

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_to_multiple_of) * self.pad_vocab_to_multiple_of

    def non_embedding_params(self) -> int:
        h, f = self.hidden_size, self.ffn_size
        per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # attention, MLP, two LayerNorms
        return self.num_layers * per_layer


class DataConfig(_Strict):
    shards: str = Field(description="directory written by `plmscale prep shards` (has manifest.json)")
    instances: str | None = Field(
        None,
        description="pre-masked training instances (`plmscale prep instances`) instead of masking on the "
        "fly; the shards still give the tokenizer and the held-out split",
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
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(ge=0)
    decay: Literal["linear", "cosine"] = "linear"
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")


class TrainConfig(_Strict):
    deepspeed_config: str = Field(description="path under ds_configs/ (ZeRO settings only)")
    micro_batch_size: int = Field(gt=0, description="sequences per process per micro-step")
    global_batch_size: int = Field(gt=0, description="sequences per optimizer step, all ranks")
    train_steps: int = Field(gt=0)
    seed: int = 1234
    precision: Literal["fp32", "bf16"] = "fp32"
    output_dir: str
    log_interval: int = Field(10, gt=0)
    eval_interval: int = Field(100, gt=0)
    eval_batches: int = Field(8, gt=0)
    save_interval: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
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


class DistillConfig(_Strict):
    """Teacher -> student: the student keeps `student_layers` of the teacher's layers (default: every
    other one) and learns from the teacher's temperature-softened outputs plus the hard loss."""

    teacher: str = Field(description="a model directory written by `plmscale train`")
    student_layers: list[int] | None = None
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the soft (teacher) loss")


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
        stage = zero_stage(self.train.deepspeed_config)
        if self.parallel.pipeline_parallel > 1 and stage >= 2:
            raise ValueError(
                f"train.deepspeed_config uses ZeRO stage {stage} but parallel.pipeline_parallel="
                f"{self.parallel.pipeline_parallel}: DeepSpeed's pipeline engine supports ZeRO stage 0-1 only"
            )
        if self.parallel.pipeline_parallel > 1:
            raise ValueError("parallel.pipeline_parallel > 1 is not implemented yet; use 1")
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.train.micro_batch_size}"
            )
        if self.distill and self.distill.student_layers is not None and not self.distill.student_layers:
            raise ValueError("distill.student_layers must not be empty")
        return self

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


def load_deepspeed_json(path: str) -> dict[str, Any]:
    file = resolve_path(path)
    try:
        ds = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed_config: file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: invalid JSON at line {err.lineno}: {err.msg}") from None
    owned = sorted(RECIPE_OWNED_DS_KEYS & ds.keys())
    if owned:
        raise ConfigError(
            f"{file}: key(s) {owned} are set by the recipe; remove them from the DeepSpeed JSON"
        )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{file}: zero_optimization.stage must be 0-3, got {stage!r}")
    return ds


def zero_stage(path: str) -> int:
    return load_deepspeed_json(path).get("zero_optimization", {}).get("stage", 0)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`train.train_steps=50`-style overrides; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Loads and validates a recipe; every error names the file and the key."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{file}: {problems}") from None
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None
    from plmscale.objectives import get_objective  # the objective validates its own params

    try:
        objective = get_objective(config.objective.name, config.objective.params, config.model)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{file}: objective: {err}") from None
    if config.data.instances:
        _check_instances(file, config.data.instances, objective)
    if config.distill and objective.pair_task:
        raise ConfigError(
            f"{file}: distill: the distillation loss covers the token loss only, not objective "
            f"{objective.name!r}'s pair loss; use objective mlm (the student keeps the teacher's pair head)"
        )
    return config


def _check_instances(file: Path, directory: str, objective) -> None:
    """An instance set must carry the fields the objective trains on (pair labels: only nsp / sop sets have
    them, and each means another task), read from its manifest before any process starts. A set not built
    yet is reported when training opens it, as missing shards are."""
    from data_prep.manifest import MANIFEST
    from plmscale.data.instances import InstanceSetError, load_instance_manifest
    from plmscale.objectives import available, get_objective_class

    if not objective.instance_fields:
        trained = [name for name in available() if get_objective_class(name).instance_fields]
        raise ConfigError(
            f"{file}: data.instances trains the {', '.join(trained)} objectives, not {objective.name!r}"
        )
    if not (Path(directory) / MANIFEST).is_file():
        return
    try:
        manifest = load_instance_manifest(directory, verify=False)
    except InstanceSetError as err:
        raise ConfigError(f"{file}: data.instances: {err}") from None
    try:
        objective.check_instances(manifest)
    except ValueError as err:
        raise ConfigError(f"{file}: {err}") from None


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
