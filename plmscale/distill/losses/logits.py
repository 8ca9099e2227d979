"""The prediction layer: soft targets at a temperature (Hinton et al.; DistilBERT, TinyBERT's last stage),
and the objective's own hard loss on the labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from plmscale.distill.cache import IDS, LOGITS
from plmscale.distill.losses.base import DistillLoss, Params, Views


def top_k_kl(student: torch.Tensor, ids: torch.Tensor, top_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over rows, with p the teacher's softmax over its top-k logits alone (renormalized:
    the tail's mass is dropped, the usual sparse top-k distillation) and q the student's full-vocabulary
    softmax read at those k ids. The student is pulled up at the teacher's top k and pushed down everywhere
    else through its normalizer; with k the whole vocabulary it is the exact KL."""
    p_log = F.log_softmax(top_logits.float(), dim=-1)
    q_log = F.log_softmax(student, dim=-1).gather(-1, ids.long())
    return (p_log.exp() * (p_log - q_log)).sum()


class Logits(DistillLoss):
    """T^2 * KL(teacher_T || student_T) at each target position, the vocabulary gathered over its shards;
    from a teacher cache, over the teacher's top k (`top_k_kl`)."""

    name = "logits"
    per = "targets"
    internals = False
    from_cache = True

    class Params(Params):
        temperature: float = Field(2.0, gt=0)

    def forward(self, views: Views) -> torch.Tensor:
        t = self.params.temperature
        student = views.spec.gather_logits(views.logits).float()
        if views.teacher_logits is None:  # read from the cache
            if IDS not in views.batch:  # a pipeline micro-batch without targets: its empty rows were dropped
                return student.sum() * 0.0
            student = student.flatten(0, -2)  # [targets, vocab]: the cache's rows, in the same order
            return top_k_kl(student / t, views.batch[IDS], views.batch[LOGITS].float() / t) * (t * t)
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
    from_cache = True

    def forward(self, views: Views) -> torch.Tensor:
        return views.objective.loss(views.logits, views.batch, views.spec)[0]
