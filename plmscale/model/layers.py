"""The layer spec: which implementation fills each parallelisable slot of the model.

Model code asks the spec for its linear layers, embeddings, output projection and cross-entropy and never
learns how (or whether) they are sharded. `LocalLayers` is plain PyTorch (export, evaluation, the unsharded
reference in tests); `plmscale.parallel.tensor_parallel.MegatronLayers` fills the same slots with
megatron-core's tensor-parallel layers. Both create parameters with the same names and, for tensor-parallel
size 1, the same shapes, so state dicts move between them.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class LayerSpec(Protocol):
    def embedding(self, num: int, dim: int, std: float) -> nn.Module:
        """Vocabulary embedding (may be sharded over the vocabulary)."""

    def column_linear(self, in_features: int, out_features: int, std: float) -> nn.Module:
        """Replicated input -> output sharded over its last dimension."""

    def row_linear(self, in_features: int, out_features: int, std: float) -> nn.Module:
        """Input sharded over its last dimension -> replicated output."""

    def output_projection(self, in_features: int, vocab: int, bias: bool) -> nn.Module:
        """Called as `(hidden, weight)` with the (tied) embedding weight; returns vocabulary-shard logits."""

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss from vocabulary-shard logits."""

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits from vocabulary-shard logits (differentiable)."""


def activation(name: str):
    """`model.activation`: exact GELU, or the tanh approximation GPT-2 was trained with (gelu_new)."""
    approximate = {"gelu": "none", "gelu_tanh": "tanh"}[name]
    return lambda x: F.gelu(x, approximate=approximate)


def normal_init(std: float):
    return lambda weight: nn.init.normal_(weight, mean=0.0, std=std)


class TiedOutput(nn.Module):
    """Logits from a weight owned elsewhere (the word embedding), plus an optional own bias."""

    def __init__(self, vocab: int, bias: bool):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab)) if bias else None

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, weight, self.bias)


class LocalLayers:
    """Unsharded PyTorch layers."""

    def embedding(self, num: int, dim: int, std: float) -> nn.Module:
        layer = nn.Embedding(num, dim)
        normal_init(std)(layer.weight)
        return layer

    def _linear(self, in_features: int, out_features: int, std: float) -> nn.Module:
        layer = nn.Linear(in_features, out_features)
        normal_init(std)(layer.weight)
        nn.init.zeros_(layer.bias)
        return layer

    column_linear = row_linear = _linear

    def output_projection(self, in_features: int, vocab: int, bias: bool) -> nn.Module:
        return TiedOutput(vocab, bias)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none").view(
            labels.shape
        )

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
