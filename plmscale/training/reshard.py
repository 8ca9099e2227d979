"""Checkpoints that resume in another layout: each checkpoint's training state by whole-model parameter name.

A DeepSpeed checkpoint is a picture of one layout: per-rank files of flat ZeRO partitions of tensor-parallel
shards of pipeline stages. Next to it, every checkpoint gets `TAG/layout_free/`:

    meta.json                              step, Adam's step, LR scheduler, engine counters, the layout it
                                           was saved in, the run config, the tensor files and their sizes
    {fp32,exp_avg,exp_avg_sq}.stageNN.safetensors
                                           per pipeline stage, by whole-model parameter name (the names of
                                           `TransformerLM`): fp32 master weights and Adam's two moments,
                                           unsharded (tensor-parallel shards joined along `partition_dim`,
                                           ZeRO partitions gathered); a weight tied across stages once

No pickle: safetensors and JSON. A run that resumes in the layout it was saved in loads DeepSpeed's files as
before; one whose TP, PP (or its partition), DP, ZeRO stage or precision changed skips them and loads this
state into its freshly built engine through DeepSpeed's own accessors (`safe_set_full_fp32_param`,
`safe_set_full_optimizer_state`; for ZeRO-0 in fp32, the torch optimizer's state), then sets Adam's step,
the LR schedule and the engine's counters. Nothing else needs carrying over: the data order and masks are a
function of (seed, global sample position) and dropout of (seed, step) (plmscale/data/loader.py,
trainer._dropout_seed), and a kept global batch keeps the position whatever the DP size and accumulation.

Why not DeepSpeed's universal checkpoint (`ds_to_universal` + `load_universal_checkpoint`)? It stores and
looks up each parameter under the engine's module name, and a pipelined plmscale model's names carry
DeepSpeed's stage prefixes (`tied_modules.word_embeddings.`, `1.`; see parallel/state_dict.py) that change
with the number of stages, as do its per-layer weight files, while a non-pipelined model has none: the
converter and the loader would both have to be taught the renames. It needs the `universal_checkpoint_info`
patterns for every row-, column- and vocabulary-parallel weight, a separate offline conversion before any
changed launch, and it restores weights only through a ZeRO or BF16 optimizer, so not into ZeRO-0 in fp32
(DeepSpeed 0.19.8). Every plmscale
parameter already has a stable whole-model name and a marked `partition_dim`, so the layout-free form is
written directly, at each save, and a restart on another number of nodes needs no conversion step.

Cost: one gather per checkpoint and ~12 bytes per parameter on disk (besides DeepSpeed's files), written by
TP rank 0 / DP rank 0 of each pipeline stage, holding one state of its stage at a time in host memory.
`train.reshardable_checkpoints: false` turns the tensors off (meta.json is still written);
`plmscale checkpoint convert` writes them later, for a checkpoint written without them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save_file

from plmscale.config import ConfigError, RunConfig
from plmscale.parallel.state_dict import named_model_parameters
from plmscale.training.layout import DIRECTORY, META, Layout, read_meta

FORMAT = 1
STATES = ("fp32", "exp_avg", "exp_avg_sq")  # AdamW's: what plmscale's deepspeed_config always asks for


def save(engine, tag_dir: Path, step: int, config: RunConfig, tensors: bool | None = None) -> None:
    """Writes `tag_dir/layout_free/` for the state the engine holds after `step` optimizer steps; the tensors
    unless `tensors` (default: train.reshardable_checkpoints) is false. Collective: call on all ranks."""
    out = tag_dir / DIRECTORY
    tensors = config.train.reshardable_checkpoints if tensors is None else tensors
    files = _write_tensors(engine, out) if tensors else []
    if dist.get_rank() == 0:
        optimizer, scheduler = _base_optimizer(engine), engine.lr_scheduler
        missing = [name for name in files if not (out / name).is_file()]
        if missing:
            raise RuntimeError(f"{out}: {missing} were not written (is the checkpoint directory shared?)")
        meta = {
            "format": FORMAT,
            "step": step,
            "optimizer_step": _optimizer_step(optimizer),
            "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
            "engine": {k: getattr(engine, k) for k in ("global_steps", "global_samples", "skipped_steps")},
            "layout": asdict(Layout.of(config, dist.get_world_size())),
            "config": config.model_dump(mode="json"),
            "tensors": tensors,
            "files": {name: (out / name).stat().st_size for name in files},
        }
        out.mkdir(parents=True, exist_ok=True)
        temporary = out / f".{META}.tmp"
        temporary.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(temporary, out / META)  # present only once everything it lists is
    dist.barrier()


def _write_tensors(engine, out: Path) -> list[str]:
    """Each stage's TP rank 0 / DP rank 0 writes its stage's states; returns every stage's file names."""
    stage, stages = _pipeline_rank_and_size()
    writer = (
        parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    )
    params = list(_own_parameters(engine.module))
    _check_reachable(params)
    _link_moments(engine)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    for key in STATES:
        gathered = {}
        for name, param in params:
            full = _join_tensor_parallel(param, _local_state(engine, param, key))
            if writer:
                gathered[name] = full.cpu().contiguous()
        if writer:
            save_file(gathered, str(out / _file_name(key, stage)), metadata={"format": f"plmscale/{FORMAT}"})
    dist.barrier()
    return [_file_name(key, s) for s in range(stages) for key in STATES]


def _file_name(key: str, stage: int) -> str:
    return f"{key}.stage{stage:02d}.safetensors"


def _pipeline_rank_and_size() -> tuple[int, int]:
    return (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )


def _own_parameters(module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """This stage's parameters, less those an earlier stage holds too (the last stage's tied embedding)."""
    params = list(named_model_parameters(module))
    stage, stages = _pipeline_rank_and_size()
    earlier = set()
    if stages > 1:
        held = [None] * stages
        group = parallel_state.get_pipeline_model_parallel_group()
        dist.all_gather_object(held, [name for name, _ in params], group=group)
        earlier = set().union(*held[:stage])
    return ((name, param) for name, param in params if name not in earlier)


def _local_state(engine, param: torch.nn.Parameter, key: str) -> torch.Tensor:
    """This rank's tensor-parallel shard of `param`'s fp32 master weight or Adam moment, whole over the
    data-parallel ranks (collective over them under ZeRO)."""
    value = safe_get_full_fp32_param(param) if key == "fp32" else safe_get_full_optimizer_state(param, key)
    if value is None:  # ZeRO-0 in fp32: the parameter is its own master; the torch optimizer has its moments
        state = engine.optimizer.state.get(param, {})
        value = param if key == "fp32" else state.get(key, torch.zeros_like(param))  # none: never had a grad
    return value.detach().float().reshape(param.ds_shape if hasattr(param, "ds_id") else param.shape)


def _check_reachable(params) -> None:
    """Every fp32 master is DeepSpeed's (ZeRO, BF16 optimizer) or the parameter itself (ZeRO-0 in fp32)."""
    for name, param in params:
        if not (hasattr(param, "ds_id") or hasattr(param, "_hp_mapping") or param.dtype == torch.float32):
            raise ConfigError(  # refused before launch too: layout.check_layout_free
                f"{name}: with precision bf16 and ZeRO-0 DeepSpeed's fp32 master weights cannot be reached by "
                "parameter; use ZeRO-1 or train.reshardable_checkpoints: false"
            )


def _is_tensor_parallel(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _join_tensor_parallel(param: torch.nn.Parameter, shard: torch.Tensor) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    if group.size() == 1 or not _is_tensor_parallel(param):
        return shard
    pieces = [torch.empty_like(shard) for _ in range(group.size())]
    dist.all_gather(pieces, shard.contiguous(), group=group)
    return torch.cat(pieces, dim=param.partition_dim)


def load(engine, tag_dir: Path) -> dict:
    """Loads the layout-free state into a freshly initialized engine of any layout; returns meta.json.
    Collective: call on all ranks."""
    meta = read_meta(tag_dir)
    out = tag_dir / DIRECTORY
    if meta is None or not meta["tensors"]:
        raise ConfigError(f"{out} holds no layout-free tensors; run `plmscale checkpoint convert` for it")
    for name, size in meta["files"].items():
        actual = (out / name).stat().st_size if (out / name).is_file() else None
        if actual != size:
            raise ValueError(
                f"{out / name}: {actual} bytes on disk, {size} written: the checkpoint is damaged"
            )
    _check_reachable(named_model_parameters(engine.module))
    optimizer = _base_optimizer(engine)
    _create_adam_state(engine)
    _link_moments(engine)
    reader = _Reader(out, meta["files"])
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for name, param in named_model_parameters(engine.module):
            for key in STATES:
                value = reader.shard(key, name, param, tp_rank, tp_size)
                if key == "fp32":
                    _set_weight(engine, param, value)
                elif hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
                    safe_set_full_optimizer_state(param, value, key)
                else:
                    engine.optimizer.state[param][key].copy_(value)
    for state in optimizer.state.values():
        step = meta["optimizer_step"]
        state["step"] = torch.full_like(state["step"], step) if torch.is_tensor(state["step"]) else step
    if meta["lr_scheduler"] is not None:
        scheduler = engine.lr_scheduler
        scheduler.load_state_dict(meta["lr_scheduler"])
        # loading restores the iteration only; stepping to it writes its learning rate into the optimizer
        scheduler.step(scheduler.last_batch_iteration)
    for key, value in meta["engine"].items():
        setattr(engine, key, value)
    dist.barrier()
    return meta


class _Reader:
    """The tensor files of a layout-free state; reads only this rank's tensor-parallel shard of each."""

    def __init__(self, out: Path, files: dict[str, int]):
        self.handles = {name: safe_open(str(out / name), framework="pt") for name in files}
        self.out = out
        self.where = {}  # (state, parameter) -> the file holding it
        for name, handle in self.handles.items():
            self.where |= {(name.split(".")[0], tensor): handle for tensor in handle.keys()}  # noqa: SIM118

    def shard(self, key: str, name: str, param, tp_rank: int, tp_size: int) -> torch.Tensor:
        if (key, name) not in self.where:
            raise KeyError(f"{self.out}: no {key} for parameter {name}; it was saved from another model")
        piece = self.where[key, name].get_slice(name)
        shape = list(piece.get_shape())
        index = [slice(None)] * len(shape)
        if tp_size > 1 and _is_tensor_parallel(param):
            size = shape[param.partition_dim] // tp_size
            index[param.partition_dim] = slice(tp_rank * size, (tp_rank + 1) * size)
            shape[param.partition_dim] = size
        want = list(param.ds_shape if hasattr(param, "ds_id") else param.shape)
        if shape != want:
            raise ValueError(f"{self.out}: {key} of {name} gives a shard of {shape}, the model wants {want}")
        return piece[tuple(index)]


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO / BF16 wrapper (itself for ZeRO-0 in fp32)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _optimizer_step(optimizer: torch.optim.Optimizer) -> int:
    steps = {int(state["step"]) for state in optimizer.state.values() if "step" in state}
    if len(steps) > 1:
        raise RuntimeError(f"the optimizer's parameters are at different steps {sorted(steps)}")
    return steps.pop() if steps else 0


def _link_moments(engine) -> None:
    """Under ZeRO-1/2 and BF16, a parameter's slice of the flat Adam moments is a view in its `_hp_mapping`,
    which DeepSpeed (0.19) links once, after its first param group's first step, when the second group has
    no moments yet: linked here instead, for every parameter, before moments are read or written."""
    optimizer = _base_optimizer(engine)
    for _, param in named_model_parameters(engine.module):
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            flat = optimizer.param_groups[mapping.param_group_index]["params"][0]
            mapping.set_optim_state_fragment(flat, optimizer.state[flat])


def _create_adam_state(engine) -> None:
    """Adam creates its moments at its first step. One step with zero gradients at zero learning rate
    creates them without moving a weight (AdamW decays by lr x weight_decay: zero too); they are then
    overwritten, and so is the step count. ZeRO-3 hands the torch optimizer its flat partitions only while
    it steps them, so they are handed over here for that step."""
    optimizer = _base_optimizer(engine)
    held = [group["params"] for group in optimizer.param_groups]
    rates = [group["lr"] for group in optimizer.param_groups]
    partitions = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if partitions is not None:
        optimizer.param_groups[0]["params"] = list(partitions)
    zeroed = []
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for param in group["params"]:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
                zeroed.append(param)
    optimizer.step()
    for group, params, rate in zip(optimizer.param_groups, held, rates, strict=True):
        group["params"], group["lr"] = params, rate
    for param in zeroed:
        param.grad = None


def _set_weight(engine, param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """The fp32 master (ZeRO's partition of it) and the model's working copy (under ZeRO-3, its partition)."""
    safe_set_full_fp32_param(param, value)  # no-op for ZeRO-0 in fp32, whose master is the parameter
    if hasattr(param, "ds_id"):
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value)
    else:
        param.data.copy_(value)
