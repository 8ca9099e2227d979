"""A shallower student that starts from a subset of its teacher's layers (DistilBERT's initialization)."""

from __future__ import annotations

import re

import torch

from plmscale.config import ModelConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


def default_student_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, always ending with the last one (e.g. 12 -> 6: 1, 3, ..., 11)."""
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def check_student_config(teacher: ModelConfig, student: ModelConfig, layers: list[int]) -> None:
    """The student may differ from its teacher only in depth (and dropout)."""
    same = {"num_layers", "hidden_dropout", "attention_dropout"}
    diff = [
        k for k in ModelConfig.model_fields if k not in same and getattr(teacher, k) != getattr(student, k)
    ]
    if diff:
        raise ValueError(f"model.{diff[0]} differs from the teacher's ({getattr(teacher, diff[0])})")
    if student.num_layers != len(layers):
        raise ValueError(
            f"model.num_layers={student.num_layers} but distill.student_layers has {len(layers)}"
        )
    bad = [i for i in layers if not 0 <= i < teacher.num_layers]
    if bad:
        raise ValueError(f"distill.student_layers {bad} outside the teacher's 0..{teacher.num_layers - 1}")


def student_state_from_teacher(
    teacher_state: dict[str, torch.Tensor], layers: list[int]
) -> dict[str, torch.Tensor]:
    """Student layer j <- teacher layer layers[j]; embeddings, final LayerNorm and head copied whole."""
    source_of = {teacher: student for student, teacher in enumerate(layers)}
    state = {}
    for name, tensor in teacher_state.items():
        match = _LAYER.match(name)
        if match is None:
            state[name] = tensor.clone()
        elif int(match[1]) in source_of:
            state[f"layers.{source_of[int(match[1])]}.{match[2]}"] = tensor.clone()
    return state
