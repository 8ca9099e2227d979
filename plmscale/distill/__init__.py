"""Teacher -> student distillation: student initialization and the distillation losses."""

from plmscale.distill.loss import Distillation
from plmscale.distill.student import default_student_layers, student_state_from_teacher

__all__ = ["Distillation", "default_student_layers", "student_state_from_teacher"]
