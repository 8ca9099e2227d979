"""A student shallower and/or narrower than its teacher, started from the teacher's weights.

Student layer j starts from teacher layer `layers[j]` (DistilBERT's initialization). A tensor of the same
shape is copied; a smaller one is cut from the teacher's: the first hidden features, the first attention
heads (and the first dimensions of each head), the first FFN neurons; a tensor larger than the teacher's in
any dimension keeps the student's random initialization. The fused QKV projection is cut per head, as its
rows are laid out [heads, (q, k, v), head_dim].
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from plmscale.config import ModelConfig

_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")
# The model's shape may differ from the teacher's in these keys (and in its training-time settings).
SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "attention_head_dim", "ffn_hidden_size")
_FREE = {*SHAPE_KEYS, "hidden_dropout", "attention_dropout", "init_std"}


def default_student_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, always ending with the last one (e.g. 12 -> 6: 1, 3, ..., 11)."""
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def check_student_config(teacher: ModelConfig, student: ModelConfig, layers: list[int]) -> None:
    """The student may differ from its teacher only in shape (depth, width, heads, FFN) and dropout."""
    diff = [
        k for k in ModelConfig.model_fields if k not in _FREE and getattr(teacher, k) != getattr(student, k)
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


def _per_head(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The tensor with its attention-head dimension split into (heads, ..., head_dim)."""
    h, d = cfg.num_heads, cfg.head_dim
    if name.endswith("attn.qkv.weight"):
        return tensor.view(h, 3, d, -1)
    if name.endswith("attn.qkv.bias"):
        return tensor.view(h, 3, d)
    if name.endswith("attn.proj.weight"):
        return tensor.view(-1, h, d)
    return tensor


def _cut(name: str, teacher: torch.Tensor, student: torch.Tensor, t_cfg: ModelConfig, s_cfg: ModelConfig):
    """The teacher's tensor, or its leading slice in the student's shape; None where the student is larger."""
    if teacher.shape == student.shape:
        return teacher.clone()
    source, target = _per_head(name, teacher, t_cfg), _per_head(name, student, s_cfg)
    if source.dim() != target.dim() or any(s > t for s, t in zip(target.shape, source.shape, strict=True)):
        return None
    return source[tuple(slice(0, size) for size in target.shape)].reshape(student.shape).clone()


def student_state_from_teacher(
    teacher_state: dict[str, torch.Tensor],
    student_state: dict[str, torch.Tensor],
    layers: list[int],
    teacher: ModelConfig,
    student: ModelConfig,
) -> tuple[dict[str, torch.Tensor], Counter]:
    """Student layer j <- teacher layer layers[j]; embeddings, final LayerNorm and heads from the teacher's.
    Returns the student's state and how many tensors were copied, sliced and left random."""
    state, how = {}, Counter()
    for name, own in student_state.items():
        match = _LAYER.match(name)
        source = f"layers.{layers[int(match[1])]}.{match[2]}" if match else name
        taken = _cut(name, teacher_state[source], own, teacher, student) if source in teacher_state else None
        if taken is None:
            how["random"] += 1
            state[name] = own.clone()
        else:
            how["copied" if taken.shape == teacher_state[source].shape else "sliced"] += 1
            state[name] = taken
    return state, how
