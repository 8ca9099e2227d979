"""The DeepSpeed JSON a run launches with. A recipe names a file under `ds_configs/` for the ZeRO settings
only; everything the recipe owns (batch sizes, optimizer, schedule, clipping, precision) is merged into it
here, so that each value has one source of truth."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from plmscale.config.base import ConfigError, resolve_path

if TYPE_CHECKING:
    from plmscale.config.run import RunConfig


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


def derive_deepspeed_config(config: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON: the ZeRO file from ds_configs/ plus what the recipe owns."""
    grad_accum = config.check_world(world_size)
    ds = load_deepspeed_json(config.train.deepspeed_config)
    opt, steps = config.optimizer, config.train.train_steps
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
        train_micro_batch_size_per_gpu=config.train.micro_batch_size,
        gradient_accumulation_steps=grad_accum,
        train_batch_size=config.train.global_batch_size,
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
        bf16={"enabled": config.train.precision == "bf16"},
    )
    if config.guarded_optimizer:
        del ds["optimizer"]
        ds["gradient_clipping"] = 0.0
    ds.setdefault("steps_per_print", 10**9)  # plmscale logs itself
    ds.setdefault("wall_clock_breakdown", False)
    return ds
