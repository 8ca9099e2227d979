"""Pre-training objectives, registered by name. Adding one means adding one module here.

An objective is a data transform (`make_example`: a window of tokens -> model inputs and labels), the head
it needs (by model kind) and its loss terms, each a (sum, count) so the trainer can normalize every term by
its global number of targets across micro-batches and ranks (one term for most; MLM + pair for BERT/ALBERT).
"""

from __future__ import annotations

import importlib
import pkgutil

from plmscale.objectives.base import IGNORE_INDEX, LossTerm, Objective, term_metrics

_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    if cls.name in _REGISTRY:
        raise ValueError(f"objective {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def available() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_objective_class(name: str) -> type[Objective]:
    _discover()
    if name not in _REGISTRY:
        raise KeyError(f"unknown objective {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_objective(name: str, params: dict, model_cfg) -> Objective:
    cls = get_objective_class(name)
    if model_cfg.kind not in cls.model_kinds:
        raise ValueError(
            f"objective {name!r} needs model.kind in {sorted(cls.model_kinds)}, not {model_cfg.kind!r}"
        )
    return cls(cls.Params.model_validate(params), model_cfg)


__all__ = [
    "IGNORE_INDEX",
    "LossTerm",
    "Objective",
    "available",
    "get_objective",
    "get_objective_class",
    "register",
    "term_metrics",
]
