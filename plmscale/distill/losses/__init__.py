"""Distillation losses, registered by name: `distill.losses` in a recipe is a weighted list of them.

    logits      soft targets at a temperature          hard        the objective's loss on the labels
    hidden      layer outputs, MSE or cosine           embedding   the embeddings' output
    attention   scores (MSE) or distributions (KL)     minilm      MiniLM v1: attention + value relation
    minilm_v2   MiniLM v2: Q-Q, K-K, V-V relations over relation heads

Adding one means adding a `DistillLoss` (plmscale/distill/losses/base.py) and naming it here.
"""

from __future__ import annotations

from pydantic import ValidationError

from plmscale.config import ModelConfig
from plmscale.distill.losses.attention import Attention
from plmscale.distill.losses.base import DistillLoss, Views
from plmscale.distill.losses.hidden import Embedding, Hidden
from plmscale.distill.losses.logits import Hard, Logits
from plmscale.distill.losses.minilm import MiniLM, MiniLMv2

LOSSES: dict[str, type[DistillLoss]] = {
    cls.name: cls for cls in (Logits, Hard, Hidden, Embedding, Attention, MiniLM, MiniLMv2)
}

__all__ = ["LOSSES", "DistillLoss", "Views", "build_loss", "loss_class", "validated_params"]


def loss_class(name: str, key: str) -> type[DistillLoss]:
    if name not in LOSSES:
        raise ValueError(f"{key}.name: unknown distillation loss {name!r}; available: {', '.join(LOSSES)}")
    return LOSSES[name]


def validated_params(name: str, params: dict, key: str):
    """The loss's own parameters, checked by its `Params` model; errors name the key."""
    cls = loss_class(name, key)
    try:
        return cls.Params.model_validate(params)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in (key, *first["loc"]))
        raise ValueError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None


def build_loss(name: str, params: dict, student: ModelConfig, teacher: ModelConfig, key: str) -> DistillLoss:
    """Checks the loss against both shapes (layer maps, heads, widths); errors name the key."""
    return loss_class(name, key)(validated_params(name, params, key), student, teacher, key)
