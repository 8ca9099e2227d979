"""Causal language modelling (GPT): predict every next token of a packed window."""

from __future__ import annotations

import numpy as np

from plmscale.objectives import register
from plmscale.objectives.base import Objective


@register
class CausalLM(Objective):
    name = "causal_lm"
    model_kinds = {"decoder"}

    def window_length(self, seq_length: int) -> int:
        return seq_length + 1

    def make_example(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"input_ids": tokens[:-1], "labels": tokens[1:]}
