"""Student initialization from teacher layers and the distillation loss."""

import copy

import pytest
import torch

from plmscale.config import ModelConfig
from plmscale.distill import DistillationLoss, default_student_layers, student_state_from_teacher
from plmscale.distill.student import check_student_config
from plmscale.model import TransformerLM
from plmscale.objectives import IGNORE_INDEX, get_objective

TEACHER = ModelConfig(kind="encoder", vocab_size=200, hidden_size=32, num_layers=4, num_heads=4,
                      max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
STUDENT = TEACHER.model_copy(update={"num_layers": 2})


def test_default_layers_are_spread_and_end_with_the_last():
    assert default_student_layers(4, 2) == [1, 3]
    assert default_student_layers(12, 6) == [1, 3, 5, 7, 9, 11]
    assert default_student_layers(12, 4) == [2, 5, 8, 11]


def test_student_starts_from_the_chosen_teacher_layers():
    torch.manual_seed(0)
    teacher = TransformerLM(TEACHER)
    state = student_state_from_teacher(teacher.state_dict(), [1, 3])
    student = TransformerLM(STUDENT)
    student.load_state_dict(state)  # strict: exactly the student's keys
    assert torch.equal(student.layers["0"].attn.qkv.weight, teacher.layers["1"].attn.qkv.weight)
    assert torch.equal(student.layers["1"].mlp.fc_out.bias, teacher.layers["3"].mlp.fc_out.bias)
    assert torch.equal(student.word_embeddings.weight, teacher.word_embeddings.weight)
    assert torch.equal(student.head.dense.weight, teacher.head.dense.weight)


def test_student_config_must_match_the_teacher_but_for_depth():
    check_student_config(TEACHER, STUDENT, [1, 3])
    with pytest.raises(ValueError, match="model.hidden_size"):
        check_student_config(TEACHER, STUDENT.model_copy(update={"hidden_size": 64}), [1, 3])
    with pytest.raises(ValueError, match="student_layers"):
        check_student_config(TEACHER, STUDENT, [1, 2, 3])
    with pytest.raises(ValueError, match="outside"):
        check_student_config(TEACHER, STUDENT, [1, 4])


def test_distillation_loss_mixes_soft_and_hard_terms():
    torch.manual_seed(0)
    teacher, student = TransformerLM(TEACHER), TransformerLM(STUDENT)
    objective = get_objective("mlm", {}, TEACHER)
    ids = torch.randint(5, 200, (2, 16))
    labels = torch.where(torch.rand(2, 16) < 0.3, ids, IGNORE_INDEX)
    batch = {"input_ids": ids, "labels": labels}
    logits = student(**objective.model_inputs(batch))
    hard, count = objective.loss(logits, batch, student.spec)

    only_hard, n = DistillationLoss(teacher, objective, temperature=2.0, alpha=0.0)(
        logits, batch, student.spec
    )
    assert n == count and torch.allclose(only_hard, hard)
    # A student identical to its teacher has no soft loss left.
    twin = copy.deepcopy(student)
    same, _ = DistillationLoss(twin, objective, 2.0, alpha=1.0)(logits, batch, student.spec)
    assert same.abs().item() < 1e-4
    soft, _ = DistillationLoss(teacher, objective, 2.0, alpha=1.0)(logits, batch, student.spec)
    mixed, _ = DistillationLoss(teacher, objective, 2.0, alpha=0.5)(logits, batch, student.spec)
    assert soft.item() > 0.01
    assert mixed.item() == pytest.approx(0.5 * soft.item() + 0.5 * hard.item(), rel=1e-5)
    mixed.backward()
    assert student.layers["0"].attn.qkv.weight.grad.abs().sum() > 0
