"""What every distillation loss provides, and what they share: layer mappings, whole-model attention heads,
relations and a KL over masked rows.

A loss reads the student's and the teacher's outputs (`Views`) and returns a sum over what it scores: the
objective's targets (`per = "targets"`: the logits and the hard loss) or the batch's real tokens
(`per = "tokens"`: every loss inside the model, per query token for attention). The trainer divides each
sum by its global count, as for any loss term. A loss that reads internals says which (`student_capture`,
`teacher_capture`), so that a forward pass records only those; a loss with learned parameters (a projection
from the student's width to the teacher's) owns them as a module, trained with the student.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Strict
from torch import nn

from plmscale.config import ModelConfig
from plmscale.model import Capture
from plmscale.model.layers import LayerSpec
from plmscale.objectives import Objective


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# `uniform`: student layer m <- teacher layer g(m) = (m + 1) * N / M - 1 (TinyBERT's g(m) = m * N / M, counted
# from 0), `last`: last <- last, or explicit [student, teacher] pairs of layer indices (0-based).
LayerMap = Literal["uniform", "last"] | list[Annotated[tuple[int, int], Strict(False)]]  # YAML lists


def layer_pairs(
    layers: LayerMap, student: ModelConfig, teacher: ModelConfig, key: str
) -> list[tuple[int, int]]:
    m, n = student.num_layers, teacher.num_layers
    if layers == "uniform":
        pairs = [(i, round((i + 1) * n / m) - 1) for i in range(m)]
    elif layers == "last":
        pairs = [(m - 1, n - 1)]
    else:
        pairs = [(s, t) for s, t in layers]
    if not pairs:
        raise ValueError(f"{key}: an explicit layer map needs at least one [student, teacher] pair")
    for s, t in pairs:
        if not (0 <= s < m and 0 <= t < n):
            raise ValueError(
                f"{key}: pair [{s}, {t}] outside the student's layers 0..{m - 1} or the teacher's 0..{n - 1}"
            )
    return pairs


@dataclass
class Views:
    """One micro-batch seen by the student and its teacher. Logits are vocabulary shards (at the target
    positions); captures hold this rank's heads. `tokens` is the [batch, seq] mask of real tokens. With a
    teacher cache, `teacher_logits` is None and the batch holds the teacher's top-k (plmscale/distill/cache.py)."""

    batch: dict[str, torch.Tensor]
    objective: Objective
    spec: LayerSpec
    teacher_spec: LayerSpec
    logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    student: Capture
    teacher: Capture
    tokens: torch.Tensor


class DistillLoss(nn.Module):
    """A module so that its learned parameters, if any, train with the student."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = Params
    per: ClassVar[Literal["targets", "tokens"]] = "tokens"
    # Reads the student's internals: the whole student must run in this process (no pipeline stages).
    internals: ClassVar[bool] = True
    # Needs of the teacher no more than its top-k logits, which an offline cache holds (distill.teacher_cache).
    from_cache: ClassVar[bool] = False

    def __init__(self, params: BaseModel, student: ModelConfig, teacher: ModelConfig, key: str):
        super().__init__()
        self.params, self.key = params, key
        self.student_capture = Capture()
        self.teacher_capture = Capture()

    def forward(self, views: Views) -> torch.Tensor:
        raise NotImplementedError


def projection(student: ModelConfig, teacher: ModelConfig) -> nn.Module:
    """TinyBERT's learned map from the student's width to the teacher's; none when they are equal."""
    if student.hidden_size == teacher.hidden_size:
        return nn.Identity()
    linear = nn.Linear(student.hidden_size, teacher.hidden_size)
    nn.init.normal_(linear.weight, std=student.init_std)
    nn.init.zeros_(linear.bias)
    return linear


def whole_heads(heads: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """[batch, local heads, seq, head_dim] -> [batch, seq, all heads * head_dim], gathered over the
    tensor-parallel ranks (each holds whole heads, in order); the gradient goes back to this rank's heads."""
    b, h, s, d = heads.shape
    return spec.gather_logits(heads.transpose(1, 2).reshape(b, s, h * d)).float()


def relation(a: torch.Tensor, b: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled dot products of [batch, seq, width] states split into `heads` heads: [batch, heads, seq, seq].
    With a layer's queries and keys over its attention heads, the attention scores."""
    batch, seq, width = a.shape
    a = a.view(batch, seq, heads, width // heads).transpose(1, 2)
    b = b.view(batch, seq, heads, width // heads).transpose(1, 2)
    return a @ b.transpose(-1, -2) / (width // heads) ** 0.5


def masked_kl(student: torch.Tensor, teacher: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) of each row of [batch, heads, seq, seq] scores over the keys
    each query attends to: [batch, heads, seq]."""
    if attend is not None:
        low = torch.finfo(student.dtype).min  # finite: no inf - inf at the masked keys
        student, teacher = student.masked_fill(~attend, low), teacher.masked_fill(~attend, low)
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    kl = log_t.exp() * (log_t - log_s)
    return (kl if attend is None else kl.masked_fill(~attend, 0.0)).sum(-1)


def per_token(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, heads, seq] per-query values -> their mean over heads, summed over the real tokens."""
    return (rows.mean(1) * tokens).sum()
