"""The layout of a run (TP x PP x DP, ZeRO stage, precision, batch split) and of the checkpoint it resumes
from, as recorded in the checkpoint's `layout_free/meta.json` (written by plmscale/training/reshard.py).

Light to import (no torch): the pre-launch checks and `plmscale checkpoint info` read it too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from plmscale.config import ConfigError, RunConfig, zero_stage

DIRECTORY, META = "layout_free", "meta.json"


@dataclass(frozen=True)
class Layout:
    """How a run is spread over its processes; `Layout.of(config, world_size)`."""

    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    zero_stage: int
    precision: str
    stage_layers: tuple[int, ...]  # transformer layers per pipeline stage
    micro_batch_size: int
    gradient_accumulation: int

    @classmethod
    def of(cls, config: RunConfig, world_size: int) -> Layout:
        tp, pp = config.parallel.tensor_parallel, config.parallel.pipeline_parallel
        layers = config.parallel.pipeline_partition or [config.model.num_layers // pp] * pp
        return cls(
            tensor_parallel=tp,
            pipeline_parallel=pp,
            data_parallel=world_size // (tp * pp),
            zero_stage=zero_stage(config.train.deepspeed_config),
            precision=config.train.precision,
            stage_layers=tuple(layers),
            micro_batch_size=config.train.micro_batch_size,
            gradient_accumulation=config.check_world(world_size),
        )

    @classmethod
    def from_json(cls, values: dict) -> Layout:
        return cls(**values | {"stage_layers": tuple(values["stage_layers"])})

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel

    def shards_like(self, other: Layout) -> bool:
        """Whether DeepSpeed's per-rank files of one fit the other (the batch split does not matter)."""
        keep = ("micro_batch_size", "gradient_accumulation")
        return {k: v for k, v in asdict(self).items() if k not in keep} == {
            k: v for k, v in asdict(other).items() if k not in keep
        }

    def __str__(self) -> str:
        even = len(set(self.stage_layers)) == 1
        stages = "" if even else f" (layers {'+'.join(map(str, self.stage_layers))})"
        precision = "" if self.precision == "fp32" else f" {self.precision}"
        return (
            f"TP{self.tensor_parallel} x PP{self.pipeline_parallel}{stages} x DP{self.data_parallel} "
            f"ZeRO-{self.zero_stage}{precision}"
        )


def read_meta(tag_dir: Path) -> dict | None:
    """The checkpoint's meta.json, or None for a checkpoint written before plmscale wrote one."""
    path = tag_dir / DIRECTORY / META
    return json.loads(path.read_text()) if path.is_file() else None


def saved_layout(tag_dir: Path) -> Layout | None:
    meta = read_meta(tag_dir)
    return Layout.from_json(meta["layout"]) if meta else None


def layout_changed(tag_dir: Path, config: RunConfig, world_size: int) -> bool:
    """Whether the checkpoint was saved in a layout whose DeepSpeed files this run cannot load."""
    saved = saved_layout(tag_dir)
    return saved is not None and not saved.shards_like(Layout.of(config, world_size))


def resume_line(tag_dir: Path, step: int, config: RunConfig, world_size: int) -> str:
    """What a resumed run says: from which checkpoint, in which layout, and what changed."""
    saved, now = saved_layout(tag_dir), Layout.of(config, world_size)
    if saved is None:
        return f"resumed from {tag_dir} (step {step}) in {now}"
    where = f"in its layout {now}" if saved.shards_like(now) else f"saved as {saved}; now {now}"
    before, after = saved.gradient_accumulation, now.gradient_accumulation
    accumulation = f"{before} -> {after}" if before != after else f"{after}"
    return f"resumed from {tag_dir} (step {step}) {where}; gradient accumulation {accumulation}"


def latest_checkpoint(config: RunConfig) -> Path | None:
    """The checkpoint directory a run of `config` would resume from, if any."""
    checkpoints = Path(config.train.output_dir) / "checkpoints"
    latest = checkpoints / "latest"
    return checkpoints / latest.read_text().strip() if latest.is_file() else None


def check_layout_free(config: RunConfig, world_size: int) -> None:
    """Before launch: the layout-free state can be written (DeepSpeed runs bf16 without ZeRO or pipeline
    stages through its FP16 optimizer, whose fp32 masters are not reachable by parameter), and a run that
    resumes from a checkpoint saved in another layout has that checkpoint's layout-free tensors."""
    if (
        config.train.reshardable_checkpoints
        and config.train.precision == "bf16"
        and zero_stage(config.train.deepspeed_config) == 0
        and config.parallel.pipeline_parallel == 1
    ):
        raise ConfigError(
            "train.reshardable_checkpoints: with precision bf16 and ZeRO-0 DeepSpeed keeps fp32 master weights "
            "that plmscale cannot gather by parameter; use ZeRO-1 (ds_configs/zero1.json) or set "
            "train.reshardable_checkpoints: false"
        )
    tag_dir = latest_checkpoint(config)
    meta = read_meta(tag_dir) if tag_dir else None
    if meta is None or meta["tensors"]:
        return
    saved, now = Layout.from_json(meta["layout"]), Layout.of(config, world_size)
    if not saved.shards_like(now):
        raise ConfigError(
            f"{tag_dir} was saved as {saved} without its layout-free state (train.reshardable_checkpoints: "
            f"false), so it cannot resume as {now}; run `plmscale checkpoint convert` on it with "
            f"{saved.world_size} processes first"
        )
