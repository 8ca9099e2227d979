"""Resumable checkpoints through DeepSpeed's engine, plus the final consolidated model directory.

DeepSpeed saves the sharded model, optimizer and LR-scheduler state and the `latest` tag; plmscale adds
the step (which alone fixes the data order, see plmscale/data/loader.py) and the resolved run config.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from plmscale.config import RunConfig
from plmscale.training import reshard
from plmscale.training.layout import layout_changed, read_meta, resume_line


def save(engine, directory: Path, step: int, config: RunConfig, keep: int, is_main: bool) -> None:
    """Saves after `step` optimizer steps; keeps the newest `keep` checkpoints."""
    client_state = {
        "step": step,
        "config": config.model_dump(mode="json"),
        # lets DeepSpeed's ds_to_universal convert this checkpoint for a different parallel layout
        "universal_checkpoint_info": {"universal_checkpoint_version": 0.2},
    }
    engine.save_checkpoint(str(directory), tag=f"step_{step:08d}", client_state=client_state)
    reshard.save(engine, directory / f"step_{step:08d}", step, config)  # h-reshard: layout-free state
    dist.barrier()
    if is_main:
        tags = sorted(p for p in directory.glob("step_*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old)
    dist.barrier()


# What a checkpoint cannot be continued under if it changed (train.train_steps, say, may grow).
_MUST_MATCH = ("model", "objective", "parallel", "data.seq_length", "train.seed", "train.global_batch_size")


def _lookup(config: dict, dotted: str) -> dict:
    section, _, key = dotted.partition(".")
    return (
        {dotted: config[section][key]} if key else {f"{section}.{k}": v for k, v in config[section].items()}
    )


def resume(engine, directory: Path, config: RunConfig) -> int:
    """Loads the latest checkpoint if there is one; returns the number of optimizer steps already done."""
    if not (directory / "latest").is_file():
        return 0
    # h-reshard: a checkpoint saved in another layout (parallel.*, ZeRO stage) loads its layout-free state
    tag = directory / (directory / "latest").read_text().strip()
    moved = layout_changed(tag, config, dist.get_world_size())
    if moved:
        path, client_state = tag, read_meta(tag)
    else:
        path, client_state = engine.load_checkpoint(str(directory))
    if path is None:
        raise RuntimeError(f"{directory}/latest names a checkpoint that could not be loaded")
    saved, current = client_state["config"], config.model_dump(mode="json")
    for field in _MUST_MATCH:
        for key, value in _lookup(current, field).items():
            was = _lookup(saved, field).get(key)
            if was != value and not (moved and field == "parallel"):
                raise ValueError(
                    f"{path} was written with {key}={was!r}, not {value!r}; use a new train.output_dir"
                )
    if moved:
        reshard.load(engine, tag)
    if dist.get_rank() == 0:
        print(resume_line(tag, int(client_state["step"]), config, dist.get_world_size()), flush=True)
    return int(client_state["step"])
