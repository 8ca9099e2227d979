"""Teacher -> student distillation: student initialization and the distillation loss."""

from plmscale.distill.loss import DistillationLoss
from plmscale.distill.student import default_student_layers, student_state_from_teacher

__all__ = ["DistillationLoss", "default_student_layers", "student_state_from_teacher"]
