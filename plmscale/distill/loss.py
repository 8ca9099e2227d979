"""Distillation: the teacher and a run's weighted losses (`distill.losses`), each its own loss term.

Each loss returns a sum over what it scores (the objective's targets, or the batch's real tokens) and is one
term of the step, named after it, so that the trainer normalizes it by its own global count: the optimized
loss is sum_i weight_i * sum_i / count_i. The student records only what some loss reads (`capture`), the
teacher likewise; with none, both run their plain forward.
"""

from __future__ import annotations

import torch
from torch import nn

from plmscale.config import DistillConfig, ModelConfig
from plmscale.distill.losses import DistillLoss, Views, build_loss, loss_class
from plmscale.model import Capture
from plmscale.objectives import LossTerm, Objective


def request(captures: list[Capture]) -> tuple[bool, frozenset[int]] | None:
    """(hidden states?, attention layers) that the given captures ask for together; None for nothing."""
    hidden = any(c.hidden for c in captures)
    layers = frozenset().union(*(c.attention_layers for c in captures))
    return (hidden, layers) if hidden or layers else None


def term_names(losses: list[str]) -> list[str]:
    """The loss terms' names: each loss's, numbered from its second use (hidden, hidden_2)."""
    return [name if not (k := losses[:i].count(name)) else f"{name}_{k + 1}" for i, name in enumerate(losses)]


def term_counts(cfg: DistillConfig, objective: Objective, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each term's count, known before the forward pass (on every pipeline stage, teacher or not): the
    objective's targets, or the real tokens of the batch."""
    targets = objective.target_count(batch)
    mask = batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    names = [name for name, _, _ in cfg.loss_entries()]
    return {
        term: targets if loss_class(name, term).per == "targets" else tokens
        for term, name in zip(term_names(names), names, strict=True)
    }


class Distillation:
    """Called like an objective's `loss_terms` with the student's logits: runs the teacher on the batch and
    returns each weighted loss as a term; `capture()` first, for a student forward that records what the
    losses read."""

    def __init__(
        self,
        cfg: DistillConfig,
        teacher: nn.Module | None,
        objective: Objective,
        losses: list[tuple[float, DistillLoss]],
    ):
        self.cfg, self.objective = cfg, objective
        # None with a teacher cache: the teacher's top-k logits come with the batch
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        names = term_names([loss.name for _, loss in losses])
        self.losses: dict[str, tuple[float, DistillLoss]] = dict(zip(names, losses, strict=True))
        # Learned parameters of the losses (projections), trained with the student: empty for most runs.
        self.trainable = nn.ModuleDict(
            {name: loss for name, (_, loss) in self.losses.items() if any(True for _ in loss.parameters())}
        )
        self._student_request = request([loss.student_capture for _, loss in self.losses.values()])
        self._teacher_request = request([loss.teacher_capture for _, loss in self.losses.values()])
        self._pending: Capture | None = None

    @classmethod
    def from_config(
        cls,
        cfg: DistillConfig,
        teacher: nn.Module | None,
        teacher_cfg: ModelConfig,
        student_cfg: ModelConfig,
        objective: Objective,
    ) -> Distillation:
        losses = [
            (weight, build_loss(name, params, student_cfg, teacher_cfg, f"distill.losses.{index}"))
            for index, (name, weight, params) in enumerate(cfg.loss_entries())
        ]
        return cls(cfg, teacher, objective, losses)

    def capture(self) -> Capture | None:
        """What the student's next forward pass records (None: nothing), read by the next call."""
        self._pending = Capture(*self._student_request) if self._student_request else None
        return self._pending

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], spec) -> dict[str, LossTerm]:
        student, self._pending = self._pending or Capture(), None
        teacher = Capture(*self._teacher_request) if self._teacher_request else None
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(**self.objective.model_inputs(batch), capture=teacher)
        mask = batch.get("attention_mask")
        views = Views(
            batch=batch,
            objective=self.objective,
            spec=spec,
            teacher_spec=self.teacher.spec if self.teacher is not None else spec,
            logits=logits,
            teacher_logits=teacher_logits,
            student=student,
            teacher=teacher or Capture(),
            tokens=mask.bool() if mask is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool),
        )
        counts = term_counts(self.cfg, self.objective, batch)
        return {
            name: LossTerm(weight * loss(views), counts[name]) for name, (weight, loss) in self.losses.items()
        }
