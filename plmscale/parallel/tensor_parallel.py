"""Tensor parallelism from megatron-core's `tensor_parallel` layers, filling the model's layer spec.

Weights are created on the CPU from the full ("master") initialization and then split, so a model built
with any tensor-parallel size from one seed holds the same full weights. That makes layouts comparable.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from torch import nn

from plmscale.config import ModelConfig
from plmscale.model import Electra, TransformerLM, build_model
from plmscale.model.layers import LocalLayers, normal_init


class _Column(ColumnParallelLinear):
    """Megatron's linear layers return (output, bias); the model wants the output only. Without tensor
    parallelism the same parameters run through `F.linear`: one matmul that adds the bias, where
    megatron-core adds it in a pass of its own and reshapes around its autograd function."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.tp_group.size() == 1:
            return F.linear(x, self.weight if weight is None else weight, self.bias)
        return super().forward(x, weight)[0]


class _Row(RowParallelLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group.size() == 1:
            return F.linear(x, self.weight, self.bias)
        return super().forward(x)[0]


class _GatherLastDim(torch.autograd.Function):
    """All-gather over the last dimension; backward keeps this rank's slice.

    megatron-core's `gather_from_tensor_model_parallel_region` allocates on `torch.cuda.current_device()`,
    so it cannot run on the CPU; this one allocates where its input lives.
    """

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        pieces = [torch.empty_like(shard) for _ in range(group.size())]
        dist.all_gather(pieces, shard.contiguous(), group=group)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        return grad.chunk(group.size(), dim=-1)[dist.get_rank(group)].contiguous(), None


class MegatronLayers:
    """The layer spec backed by megatron-core; needs `parallel_state` initialized."""

    def __init__(self, params_dtype: torch.dtype = torch.float32):
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.config = ModelParallelConfig(
            tensor_model_parallel_size=self.group.size(),
            use_cpu_initialization=True,
            perform_initialization=True,
            params_dtype=params_dtype,
            sequence_parallel=False,
            gradient_accumulation_fusion=False,
        )

    def embedding(self, num: int, dim: int, std: float) -> nn.Module:
        return VocabParallelEmbedding(
            num, dim, init_method=normal_init(std), config=self.config, tp_group=self.group
        )

    def column_linear(self, in_features: int, out_features: int, std: float) -> nn.Module:
        return _Column(
            in_features,
            out_features,
            config=self.config,
            init_method=normal_init(std),
            bias=True,
            gather_output=False,
            tp_group=self.group,
        )

    def row_linear(self, in_features: int, out_features: int, std: float) -> nn.Module:
        return _Row(
            in_features,
            out_features,
            config=self.config,
            init_method=normal_init(std),
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=self.group,
        )

    def output_projection(self, in_features: int, vocab: int, bias: bool) -> nn.Module:
        return _Column(
            in_features,
            vocab,
            config=self.config,
            init_method=normal_init(0.0),
            bias=bias,
            gather_output=False,
            skip_weight_param_allocation=True,
            tp_group=self.group,
        )

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.group.size() == 1:  # the whole vocabulary here: torch's fused kernel, no copy
            return LocalLayers.cross_entropy(self, logits, labels)
        # megatron-core works on the logits in place; hand it a copy so callers can still use theirs
        return vocab_parallel_cross_entropy(logits.to(torch.float32, copy=True), labels)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return _GatherLastDim.apply(logits, self.group) if self.group.size() > 1 else logits


def build_parallel_model(
    cfg: ModelConfig, params_dtype: torch.dtype = torch.float32
) -> TransformerLM | Electra:
    """The one place where the model meets tensor parallelism."""
    return build_model(cfg, MegatronLayers(params_dtype))
