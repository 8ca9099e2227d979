"""Full (unsharded) state dicts from a sharded model, and back.

A parameter that megatron-core marks `tensor_model_parallel` is split along its `partition_dim` over the
tensor-parallel group; every other parameter is replicated. Under ZeRO-3 the parameters are first gathered
from the data-parallel ranks.
"""

from __future__ import annotations

import contextlib

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn


def _is_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def _zero3_gathered(model: nn.Module):
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(params) if params else contextlib.nullcontext()


def full_state_dict(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every rank gets the whole model's parameters (or their gradients), in fp32 on the CPU.

    Collective: call on all ranks.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    tp = group.size()
    result = {}
    with _zero3_gathered(model):
        for name, param in model.named_parameters():
            tensor = (param.grad if grads else param).detach().float()
            if tp > 1 and _is_sharded(param):
                shards = [torch.empty_like(tensor) for _ in range(tp)]
                dist.all_gather(shards, tensor.contiguous(), group=group)
                tensor = torch.cat(shards, dim=param.partition_dim)
            result[name] = tensor.cpu().clone()
    return result


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies this rank's shard of each full tensor into the (not yet DeepSpeed-wrapped) model."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    params = dict(model.named_parameters())
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
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
