"""Hidden states (DistilBERT's cosine, TinyBERT's MSE through a learned projection) and the embeddings'
output (TinyBERT), each token's student state mapped to the teacher's width."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from plmscale.config import ModelConfig
from plmscale.distill.losses.base import DistillLoss, LayerMap, Params, Views, layer_pairs, projection
from plmscale.model import Capture


def distance(student: torch.Tensor, teacher: torch.Tensor, metric: str) -> torch.Tensor:
    """Per token: the mean squared error over the features, or 1 - cosine similarity."""
    if metric == "mse":
        return (student - teacher).pow(2).mean(-1)
    return 1 - F.cosine_similarity(student, teacher, dim=-1)


class Hidden(DistillLoss):
    """Summed over the mapped layers' outputs; one projection for all of them (TinyBERT's)."""

    name = "hidden"

    class Params(Params):
        metric: Literal["mse", "cosine"] = "mse"
        layers: LayerMap = "uniform"

    def __init__(self, params, student: ModelConfig, teacher: ModelConfig, key: str):
        super().__init__(params, student, teacher, key)
        # hidden_states[0] is the embeddings' output, [i + 1] layer i's
        self.pairs = [(s + 1, t + 1) for s, t in self.layer_pairs(student, teacher, f"{key}.layers")]
        self.student_capture, self.teacher_capture = Capture(hidden=True), Capture(hidden=True)
        self.project = projection(student, teacher)

    def layer_pairs(self, student, teacher, key):
        return layer_pairs(self.params.layers, student, teacher, key)

    def forward(self, views: Views) -> torch.Tensor:
        total = 0.0
        for s, t in self.pairs:
            student = self.project(views.student.hidden_states[s]).float()
            teacher = views.teacher.hidden_states[t].float()
            total = total + (distance(student, teacher, self.params.metric) * views.tokens).sum()
        return total


class Embedding(Hidden):
    """The embeddings' output (word + position + segment, after its LayerNorm if any)."""

    name = "embedding"

    class Params(Params):
        metric: Literal["mse", "cosine"] = "mse"

    def layer_pairs(self, student, teacher, key):
        return [(-1, -1)]
