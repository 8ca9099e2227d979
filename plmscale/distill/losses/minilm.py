"""MiniLM's self-attention distillation from one teacher layer into the student's last layer.

v1 (Wang et al., 2020): the attention distributions and the value relation softmax(V V^T / sqrt(d)), head
by head. v2 (Wang et al., 2021): the query-query, key-key and value-value relations, each layer's queries
(keys, values) concatenated over its heads and split again into `relation_heads` heads, so that the
student's attention heads and width are free; the teacher layer is free too (an upper-middle layer
works best for large teachers). Each relation's KL is taken per query token and averaged over heads.
"""

from __future__ import annotations

import torch
from pydantic import Field

from plmscale.config import ModelConfig
from plmscale.distill.losses.attention import attention_scores, same_heads
from plmscale.distill.losses.base import (
    DistillLoss,
    Params,
    Views,
    masked_kl,
    per_token,
    relation,
    whole_heads,
)
from plmscale.model import Capture


def teacher_layer(layer: int | None, teacher: ModelConfig, key: str) -> int:
    if layer is None:
        return teacher.num_layers - 1
    if not 0 <= layer < teacher.num_layers:
        raise ValueError(f"{key}={layer} outside the teacher's layers 0..{teacher.num_layers - 1}")
    return layer


def _last_layer_against(loss: DistillLoss, student: ModelConfig, teacher: ModelConfig, key: str) -> None:
    """MiniLM's pairing: the student's last layer against `teacher_layer`, the only layers captured."""
    loss.layers = (
        student.num_layers - 1,
        teacher_layer(loss.params.teacher_layer, teacher, f"{key}.teacher_layer"),
    )
    loss.student_capture = Capture(attention_layers={loss.layers[0]})
    loss.teacher_capture = Capture(attention_layers={loss.layers[1]})


class MiniLM(DistillLoss):
    """Attention-distribution KL + value-relation KL; the student has as many heads as the teacher."""

    name = "minilm"

    class Params(Params):
        teacher_layer: int | None = Field(None, ge=0, description="default: the last")

    def __init__(self, params, student: ModelConfig, teacher: ModelConfig, key: str):
        super().__init__(params, student, teacher, key)
        same_heads(student, teacher, key)
        self.heads = student.num_heads
        _last_layer_against(self, student, teacher, key)

    def forward(self, views: Views) -> torch.Tensor:
        s, t = self.layers
        attend = views.student.attend
        attention = masked_kl(
            attention_scores(views.student, s, views.spec, self.heads),
            attention_scores(views.teacher, t, views.teacher_spec, self.heads),
            attend,
        )
        v_s, v_t = (
            whole_heads(views.student.qkv[s][2], views.spec),
            whole_heads(views.teacher.qkv[t][2], views.teacher_spec),
        )
        values = masked_kl(relation(v_s, v_s, self.heads), relation(v_t, v_t, self.heads), attend)
        return per_token(attention, views.tokens) + per_token(values, views.tokens)


class MiniLMv2(DistillLoss):
    """Q-Q + K-K + V-V relation KL over `relation_heads` heads."""

    name = "minilm_v2"

    class Params(Params):
        relation_heads: int = Field(gt=0)
        teacher_layer: int | None = Field(None, ge=0, description="default: the last")

    def __init__(self, params, student: ModelConfig, teacher: ModelConfig, key: str):
        super().__init__(params, student, teacher, key)
        for who, cfg in (("model.hidden_size", student), ("the teacher's hidden_size", teacher)):
            if cfg.hidden_size % params.relation_heads:
                raise ValueError(
                    f"{key}.relation_heads={params.relation_heads} must divide {who}={cfg.hidden_size}"
                )
        _last_layer_against(self, student, teacher, key)

    def forward(self, views: Views) -> torch.Tensor:
        s, t = self.layers
        heads, total = self.params.relation_heads, 0.0
        for student, teacher in zip(views.student.qkv[s], views.teacher.qkv[t], strict=True):
            a, b = whole_heads(student, views.spec), whole_heads(teacher, views.teacher_spec)
            rows = masked_kl(relation(a, a, heads), relation(b, b, heads), views.student.attend)
            total = total + per_token(rows, views.tokens)
        return total
