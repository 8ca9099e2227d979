"""Attention, head by head: TinyBERT's MSE of the scores before the softmax, or the KL of the distributions
after it, over mapped layers. The student needs as many heads as the teacher (MiniLM v2's relations do not)."""

from __future__ import annotations

from typing import Literal

import torch

from plmscale.config import ModelConfig
from plmscale.distill.losses.base import (
    DistillLoss,
    LayerMap,
    Params,
    Views,
    layer_pairs,
    masked_kl,
    per_token,
    relation,
    whole_heads,
)
from plmscale.model import Capture


def same_heads(student: ModelConfig, teacher: ModelConfig, key: str) -> None:
    if student.num_heads != teacher.num_heads:
        raise ValueError(
            f"{key} compares attention head by head: model.num_heads={student.num_heads} but the teacher has "
            f"{teacher.num_heads} (minilm_v2's relation heads are free)"
        )


def attention_scores(capture: Capture, layer: int, spec, heads: int) -> torch.Tensor:
    """A captured layer's q k^T / sqrt(head_dim), all heads: [batch, heads, seq, seq]."""
    q, k, _ = capture.qkv[layer]
    return relation(whole_heads(q, spec), whole_heads(k, spec), heads)


def score_error(student: torch.Tensor, teacher: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
    """Mean squared difference of the scores over the keys each query attends to: [batch, heads, seq]
    (TinyBERT's element-wise MSE, whatever the sequence length)."""
    squared = (student - teacher).pow(2)
    if attend is None:
        return squared.mean(-1)
    return squared.masked_fill(~attend, 0.0).sum(-1) / attend.sum(-1).clamp(min=1)


class Attention(DistillLoss):
    """Per query token: the mean over heads of the mean squared score error over its keys (`scores`) or of
    the KL between the teacher's and the student's attention distributions (`probs`); summed over mapped
    layers."""

    name = "attention"

    class Params(Params):
        form: Literal["scores", "probs"] = "scores"
        layers: LayerMap = "uniform"

    def __init__(self, params, student: ModelConfig, teacher: ModelConfig, key: str):
        super().__init__(params, student, teacher, key)
        same_heads(student, teacher, key)
        self.heads = student.num_heads
        self.pairs = layer_pairs(params.layers, student, teacher, f"{key}.layers")
        self.student_capture = Capture(attention_layers={s for s, _ in self.pairs})
        self.teacher_capture = Capture(attention_layers={t for _, t in self.pairs})

    def forward(self, views: Views) -> torch.Tensor:
        total, attend = 0.0, views.student.attend
        for s, t in self.pairs:
            student = attention_scores(views.student, s, views.spec, self.heads)
            teacher = attention_scores(views.teacher, t, views.teacher_spec, self.heads)
            if self.params.form == "scores":
                rows = score_error(student, teacher, attend)
            else:
                rows = masked_kl(student, teacher, attend)
            total = total + per_token(rows, views.tokens)
        return total
