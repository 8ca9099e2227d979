"""The prediction layer: soft targets at a temperature (Hinton et al.; DistilBERT, TinyBERT's last stage),
and the objective's own hard loss on the labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from plmscale.distill.losses.base import DistillLoss, Params, Views


class Logits(DistillLoss):
    """T^2 * KL(teacher_T || student_T) at each target position, the vocabulary gathered over its shards."""

    name = "logits"
    per = "targets"
    internals = False

    class Params(Params):
        temperature: float = Field(2.0, gt=0)

    def forward(self, views: Views) -> torch.Tensor:
        t = self.params.temperature
        student = views.spec.gather_logits(views.logits).float()
        teacher = views.teacher_spec.gather_logits(views.teacher_logits).float()
        return F.kl_div(
            F.log_softmax(student / t, dim=-1),
            F.log_softmax(teacher / t, dim=-1),
            log_target=True,
            reduction="sum",
        ) * (t * t)


class Hard(DistillLoss):
    """The objective's loss on the labels (MLM, next token)."""

    name = "hard"
    per = "targets"
    internals = False

    def forward(self, views: Views) -> torch.Tensor:
        return views.objective.loss(views.logits, views.batch, views.spec)[0]
