"""The recipe's sections besides the model and distillation: data, objective, parallel layout, optimizer
and the training loop. Each checks its own keys; what spans sections is RunConfig's (plmscale/config/run.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from plmscale.config.base import StrictModel


class DataConfig(StrictModel):
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


class ObjectiveConfig(StrictModel):
    """`name` picks a registered objective; `params` are validated by that objective's own model."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class ParallelConfig(StrictModel):
    tensor_parallel: int = Field(1, ge=1)
    pipeline_parallel: int = Field(1, ge=1)
    pipeline_partition: list[int] | None = Field(
        None, description="transformer layers per pipeline stage, first to last; default: an even split"
    )


class OptimizerConfig(StrictModel):
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


class TrainConfig(StrictModel):
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
