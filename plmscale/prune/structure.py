"""Structured pruning: keep the most important heads, FFN neurons and layers, and cut the weights to them.

Every kept layer keeps the same number of heads and neurons (its own most important ones), so the pruned
model is described by the same config as any other: `num_heads` heads of the original width
(`model.attention_head_dim`), `ffn_hidden_size` neurons, `num_layers` layers. One shape per model is what
tensor parallelism (which shards whole heads and neurons evenly), pipeline stages, distillation and the
Hugging Face export all assume; per-layer counts would need a shape per layer in each of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from plmscale.config import ModelConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class Kept:
    """What survives: `layers` (original indices, in order), and for each of them its `heads` and `neurons`
    (original indices, ascending)."""

    layers: list[int]
    heads: list[list[int]]
    neurons: list[list[int]]


def most_important(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` highest scores, ascending (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:count])


def pruned_config(cfg: ModelConfig, kept: Kept) -> ModelConfig:
    """`cfg` with the kept shape; heads keep their width, now stated (`attention_head_dim`) if it is no
    longer hidden_size / num_heads."""
    heads = len(kept.heads[0])
    return ModelConfig.model_validate(
        cfg.model_dump()
        | {
            "num_layers": len(kept.layers),
            "num_heads": heads,
            "attention_head_dim": None if heads * cfg.head_dim == cfg.hidden_size else cfg.head_dim,
            "ffn_hidden_size": len(kept.neurons[0]),
        }
    )


def _cut(name: str, tensor: torch.Tensor, heads: list[int], neurons: list[int], cfg: ModelConfig):
    """A layer's tensor restricted to the kept heads (the fused QKV rows are [head, (q, k, v), head_dim],
    the output projection's columns [head, head_dim]) and the kept neurons."""
    if name in ("attn.qkv.weight", "attn.qkv.bias"):
        return tensor.view(cfg.num_heads, -1, *tensor.shape[1:])[heads].flatten(0, 1)
    if name == "attn.proj.weight":
        return tensor.view(tensor.shape[0], cfg.num_heads, -1)[:, heads].flatten(1)
    if name in ("mlp.fc_in.weight", "mlp.fc_in.bias"):
        return tensor[neurons]
    if name == "mlp.fc_out.weight":
        return tensor[:, neurons]
    return tensor


def prune_state(state: dict[str, torch.Tensor], cfg: ModelConfig, kept: Kept) -> dict[str, torch.Tensor]:
    """The weights of the pruned model: kept layer j is original layer `kept.layers[j]`, cut to its kept
    heads and neurons; embeddings, final LayerNorm and heads unchanged."""
    new_index = {old: new for new, old in enumerate(kept.layers)}
    out = {}
    for name, tensor in state.items():
        match = _LAYER.match(name)
        if match is None:
            out[name] = tensor.clone()
            continue
        old = int(match[1])
        if old in new_index:
            j = new_index[old]
            out[f"layers.{j}.{match[2]}"] = _cut(
                match[2], tensor, kept.heads[j], kept.neurons[j], cfg
            ).clone()
    return out
