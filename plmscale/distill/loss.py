"""The distillation loss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * the objective's hard loss.

Both terms are summed over the objective's target positions (masked tokens for MLM, every next token for
causal LM) and share its count, so the trainer normalizes them like any other loss. Logits are gathered
over the vocabulary shards only at those positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plmscale.objectives import Objective


class DistillationLoss:
    def __init__(self, teacher: nn.Module, objective: Objective, temperature: float, alpha: float):
        self.teacher = teacher.eval().requires_grad_(False)
        self.objective, self.temperature, self.alpha = objective, temperature, alpha

    def __call__(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor], spec
    ) -> tuple[torch.Tensor, int]:
        hard_sum, count = self.objective.loss(logits, batch, spec)
        with torch.no_grad():
            teacher_logits = spec.gather_logits(self.teacher(**self.objective.model_inputs(batch))).float()
        student_logits = spec.gather_logits(logits).float()
        t = self.temperature
        soft_sum = F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits / t, dim=-1),
            log_target=True,
            reduction="sum",
        ) * (t * t)
        return self.alpha * soft_sum + (1 - self.alpha) * hard_sum, count
