"""Task distillation, TinyBERT's second stage: a student learns a task from a teacher fine-tuned on it.

    plmscale finetune --model student=S_DIR --teacher FINETUNED_TEACHER --task TASK --output DIR

The losses are `distill.losses`'s (plmscale/distill/losses/), the same names, weights and keys, read here
from the classifiers: `embedding`, `hidden`, `attention`, `minilm`, `minilm_v2` compare the trunks'
internals on the task's texts (summed over real tokens), `logits` the task logits at a temperature
(T^2 * KL(teacher_T || student_T): TinyBERT's soft cross-entropy less the teacher's entropy, so the same
gradients; for regression, the squared error to the teacher's prediction), `hard` the task's own loss on the
labels (both summed over examples). Each is normalized by its own count, as in pre-training distillation.

TinyBERT trains the intermediate layers first, then the prediction layer: `intermediate_epochs` epochs of
the internal losses alone (the student's head untouched; by default as many as `epochs`) precede `epochs` of
the prediction losses alone, each phase with its own warm-up and decay; with 0, all losses train together
(on the demo's task, measurably worse: the internal losses outweigh the logits').
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from plmscale.config import DistillLossConfig, ModelConfig
from plmscale.distill.loss import request, term_names
from plmscale.distill.losses import DistillLoss, Views, build_loss
from plmscale.errors import UserError
from plmscale.finetune.head import SequenceClassifier, TaskKind, task_kind
from plmscale.finetune.settings import DistillSettings
from plmscale.finetune.task import Task, file_digest
from plmscale.finetune.train import read_results
from plmscale.model import Capture
from plmscale.model_dir import TOKENIZER, load_run_config

KEY = "--distill-losses"


def parse_losses(text: str) -> tuple[dict, ...]:
    """`--distill-losses`: a YAML list as in a recipe's `distill.losses`, inline or in a file."""
    source = Path(text) if not text.lstrip().startswith("[") else None
    try:
        raw = yaml.safe_load(source.read_text() if source else text)
    except OSError as err:
        raise UserError(f"{KEY}: cannot read {text}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{KEY}: {source or 'the list'} is not YAML ({str(err).splitlines()[0]})") from None
    if isinstance(raw, dict) and "losses" in raw:  # a file holding `losses:` (or a recipe's distill section)
        raw = raw["losses"]
    if not isinstance(raw, list) or not raw:
        raise UserError(
            f"{KEY}: expected a non-empty list of losses, e.g. '[{{name: logits}}, {{name: hidden}}]'"
        )
    entries = []
    for index, entry in enumerate(raw):
        try:
            entries.append(DistillLossConfig.model_validate(entry).model_dump())
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in (KEY, index, *first["loc"]))
            raise UserError(f"{where}: {first['msg']}") from None
    return tuple(entries)


class PredictionError(DistillLoss):
    """Regression's prediction-layer loss: the squared error to the teacher's prediction."""

    name = "logits"
    per = "targets"
    internals = False

    def forward(self, views: Views) -> torch.Tensor:
        return (views.logits.float() - views.teacher_logits.float()).pow(2).sum()


class LabelLoss:
    """What `hard` reads as the objective: the task's loss on the labels of the batch."""

    def __init__(self, kind: TaskKind):
        self.kind = kind

    def loss(self, logits: torch.Tensor, batch: dict, spec) -> tuple[torch.Tensor, int]:
        return self.kind.loss(logits, batch["labels"])


def build_losses(
    settings: DistillSettings, student: ModelConfig, teacher: ModelConfig, kind: TaskKind
) -> dict[str, tuple[float, DistillLoss]]:
    """Each entry's term name (hidden, hidden_2, ...), weight and loss, checked against both shapes."""
    entries = [
        (e["name"], e["weight"], {k: v for k, v in e.items() if k not in ("name", "weight")})
        for e in settings.losses
    ]
    losses = {}
    for index, (term, (name, weight, params)) in enumerate(
        zip(term_names([name for name, _, _ in entries]), entries, strict=True)
    ):
        key = f"{KEY}.{index}"
        if name == "logits" and kind.name == "regression":
            if params:
                raise UserError(
                    f"{key}: a regression task's `logits` loss is the squared error, with no keys"
                )
            losses[term] = (weight, PredictionError(None, student, teacher, key))
            continue
        try:
            losses[term] = (weight, build_loss(name, params, student, teacher, key))
        except ValueError as err:
            raise UserError(str(err)) from None
    return losses


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    losses: tuple[str, ...]  # term names trained in this phase


def plan_phases(losses: dict[str, tuple[float, DistillLoss]], settings: DistillSettings, epochs: int):
    prediction = tuple(t for t, (_, loss) in losses.items() if loss.per == "targets")
    intermediate = tuple(t for t in losses if t not in prediction)
    first = settings.intermediate_epochs
    if first is None:
        first = epochs if intermediate and prediction else 0
    if not first:
        return [Phase("distillation", epochs, prediction + intermediate)]
    for what, terms in (("intermediate-layer", intermediate), ("prediction-layer", prediction)):
        if not terms:
            raise UserError(
                f"--intermediate-epochs {first} trains the intermediate-layer losses then the prediction-layer "
                f"ones, but {KEY} has no {what} loss"
            )
    return [Phase("intermediate", first, intermediate), Phase("prediction", epochs, prediction)]


def check_distill(settings: DistillSettings, task: Task, student_dir: Path, epochs: int) -> None:
    """Every mistake of a task distillation before any model trains: the teacher, the losses, the phases."""
    check_teacher(settings, task, student_dir)
    kind = task_kind(task.spec.kind, task.labels)
    teacher = load_run_config(settings.teacher).model
    plan_phases(build_losses(settings, load_run_config(student_dir).model, teacher, kind), settings, epochs)


def check_teacher(settings: DistillSettings, task: Task, student_dir: Path) -> dict:
    """The teacher directory's finetune.json when it was fine-tuned on this very task with the student's
    tokenizer; otherwise a UserError naming the file."""
    teacher = Path(settings.teacher)
    results, path = read_results(teacher), teacher / "finetune.json"
    theirs = results["task"]
    if theirs["kind"] != task.spec.kind:
        raise UserError(
            f"{path}: the teacher was fine-tuned for {theirs['kind']}, the task is {task.spec.kind}"
        )
    if theirs["labels"] != task.labels:
        raise UserError(
            f"{path}: the teacher's labels {theirs['labels']} differ from the task's {task.labels}"
        )
    if "sha256" not in theirs:
        raise UserError(
            f"{path}: records no digests of its task's files (an older plmscale); fine-tune it again"
        )
    digests = {split: file_digest(file) for split, file in task.files.items()}
    if theirs["sha256"] != digests:
        raise UserError(
            f"{path}: the teacher was fine-tuned on {theirs['files']['train']}, not on this task's "
            f"{task.files['train']} (the files differ); task distillation needs a teacher of the same task"
        )
    if file_digest(teacher / TOKENIZER) != file_digest(student_dir / TOKENIZER):
        raise UserError(
            f"{teacher / TOKENIZER}: the teacher's tokenizer differs from {student_dir / TOKENIZER}; "
            "both models read the same token ids"
        )
    return results


class TaskDistillation:
    """The teacher classifier and the weighted losses; called with the student on a batch, returns the
    phase's objective: sum of weight * loss sum / its count."""

    def __init__(
        self,
        settings: DistillSettings,
        teacher: SequenceClassifier,
        student_cfg: ModelConfig,
        kind: TaskKind,
        epochs: int,
    ):
        self.teacher = teacher.eval().requires_grad_(False)
        self.label_loss = LabelLoss(kind)
        self.losses = build_losses(settings, student_cfg, teacher.trunk.cfg, kind)
        self.trainable = torch.nn.ModuleDict(
            {term: loss for term, (_, loss) in self.losses.items() if any(True for _ in loss.parameters())}
        )
        self.phases = plan_phases(self.losses, settings, epochs)

    def __call__(
        self, student: SequenceClassifier, batch: dict, targets: torch.Tensor, phase: Phase
    ) -> torch.Tensor:
        losses = [self.losses[term] for term in phase.losses]
        student_request = request([loss.student_capture for _, loss in losses])
        teacher_request = request([loss.teacher_capture for _, loss in losses])
        student_seen = Capture(*student_request) if student_request else Capture()
        teacher_seen = Capture(*teacher_request) if teacher_request else Capture()
        logits = student(**batch, capture=student_seen if student_request else None)
        with torch.no_grad():
            teacher_logits = self.teacher(**batch, capture=teacher_seen if teacher_request else None)
        tokens = batch["attention_mask"].bool()
        views = Views(
            batch=batch | {"labels": targets},
            objective=self.label_loss,
            spec=student.trunk.spec,
            teacher_spec=self.teacher.trunk.spec,
            logits=logits,
            teacher_logits=teacher_logits,
            student=student_seen,
            teacher=teacher_seen,
            tokens=tokens,
        )
        counts = {"targets": targets.numel(), "tokens": int(tokens.sum())}
        return sum(weight * loss(views) / counts[loss.per] for weight, loss in losses)


__all__ = ["Phase", "TaskDistillation", "check_distill", "parse_losses"]
