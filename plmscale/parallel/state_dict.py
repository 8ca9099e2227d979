"""Full (unsharded) state dicts from a sharded model, and back.

A parameter that megatron-core marks `tensor_model_parallel` is split along its `partition_dim` over the
tensor-parallel group; every other parameter is replicated. Under ZeRO-3 the parameters are first gathered
from the data-parallel ranks. A pipelined model holds one stage per rank, under the whole model's names
behind DeepSpeed's prefix (the layer index, or `tied_modules.KEY`); its stages are gathered over the
pipeline group.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule
from megatron.core import parallel_state
from torch import nn

_PIPELINE_PREFIX = re.compile(r"^(?:tied_modules\.\w+|\d+)\.")


def _is_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _zero3_gathered(model: nn.Module):
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(params) if params else contextlib.nullcontext()


def named_model_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name in the whole `TransformerLM`, parameter) of the parameters this rank holds."""
    if not isinstance(model, PipelineModule):
        yield from model.named_parameters()
        return
    for name, param in model.named_parameters():
        yield _PIPELINE_PREFIX.sub("", name), param


def full_state_dict(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every rank gets the whole model's parameters (or their gradients), in fp32 on the CPU.

    Collective: call on all ranks.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    tp = group.size()
    result = {}
    with _zero3_gathered(model):
        for name, param in named_model_parameters(model):
            tensor = (param.grad if grads else param).detach().float()
            if tp > 1 and _is_sharded(param):
                shards = [torch.empty_like(tensor) for _ in range(tp)]
                dist.all_gather(shards, tensor.contiguous(), group=group)
                tensor = torch.cat(shards, dim=param.partition_dim)
            result[name] = tensor.cpu().clone()
    if isinstance(model, PipelineModule) and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, result, group=parallel_state.get_pipeline_model_parallel_group())
        result = {name: tensor for stage in stages for name, tensor in stage.items()}
    return result


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies this rank's shard of each full tensor into the (not yet DeepSpeed-wrapped) model; a pipeline
    stage takes the tensors of its own part."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    params = dict(named_model_parameters(model))
    missing = params.keys() - state.keys()
    unexpected = set() if isinstance(model, PipelineModule) else state.keys() - params.keys()
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    with torch.no_grad():
        for name, param in params.items():
            tensor = state[name]
            if tp > 1 and _is_sharded(param):
                tensor = tensor.chunk(tp, dim=param.partition_dim)[rank]
            if tensor.shape != param.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit {tuple(param.shape)}")
            param.copy_(tensor)
