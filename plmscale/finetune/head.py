"""The sequence-level head fine-tuning puts on the pre-trained trunk, and the task kinds it serves.

`SequenceClassifier` is the trunk (`TransformerLM`, unchanged: its MLM head stays as trained and unused)
plus `ClassificationHead`, BERT's: the pooler (dense + tanh on the final [CLS] state), dropout, and a linear
layer to one logit per class, or to one number for regression. This is exactly `BertForSequenceClassification`
/ `MegatronBertForSequenceClassification`, which the export relies on. A trunk pre-trained with NSP / SOP
(`model.pair_head`) hands its trained pooler to the head, as BERT's fine-tuning starts from it.

A task kind, registered by name, says how many outputs the head has, the loss (a sum and a count), how logits
become predictions and which metrics score them.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from plmscale.finetune import metrics
from plmscale.model import Capture, TransformerLM


class ClassificationHead(nn.Module):
    def __init__(self, hidden_size: int, num_outputs: int, dropout: float, init_std: float):
        super().__init__()
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_outputs)
        for layer in (self.pooler, self.classifier):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.tanh(self.pooler(cls_hidden))))


class SequenceClassifier(nn.Module):
    def __init__(self, trunk: TransformerLM, num_outputs: int, dropout: float):
        super().__init__()
        cfg = trunk.cfg
        if cfg.kind != "encoder":
            raise ValueError(f"fine-tuning needs an encoder (BERT family) model, not model.kind={cfg.kind}")
        self.trunk = trunk
        self.head = ClassificationHead(cfg.hidden_size, num_outputs, dropout, cfg.init_std)
        if trunk.pair_head is not None:
            self.head.pooler.load_state_dict(trunk.pair_head.pooler.state_dict())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        capture: Capture | None = None,
    ) -> torch.Tensor:
        hidden = self.trunk.hidden_states(input_ids, attention_mask, token_type_ids, capture)
        return self.head(hidden[:, 0])

    def trained_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """What the classifier's logits depend on: the trunk less its pre-training heads, and the head."""
        unused = ("trunk.head.", "trunk.pair_head.")
        return [(name, p) for name, p in self.named_parameters() if not name.startswith(unused)]


_KINDS: dict[str, type[TaskKind]] = {}


def register(cls: type[TaskKind]) -> type[TaskKind]:
    _KINDS[cls.name] = cls
    return cls


def task_kind(name: str, labels: list[str] | None) -> TaskKind:
    return _KINDS[name](labels)


class TaskKind:
    name: ClassVar[str]

    def __init__(self, labels: list[str] | None):
        self.labels = labels

    @property
    def num_outputs(self) -> int:
        raise NotImplementedError

    def targets(self, labels: list) -> torch.Tensor:
        """Example labels as the tensor the loss compares with."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed loss, number of examples)."""
        raise NotImplementedError

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, predicted: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError


@register
class Classification(TaskKind):
    """Cross-entropy over the classes; accuracy, macro-F1, and the F1 of the second class of a binary task
    (GLUE's positive class: "1" of MRPC, QQP)."""

    name = "classification"

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    def targets(self, labels: list) -> torch.Tensor:
        index = {name: i for i, name in enumerate(self.labels)}
        return torch.tensor([index[label] for label in labels])

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        return F.cross_entropy(logits.float(), targets, reduction="sum"), targets.numel()

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def scores(self, predicted: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        out = {"accuracy": metrics.accuracy(predicted, targets)}
        if len(self.labels) == 2:
            out["f1"] = metrics.f1(predicted, targets, positive=1)
        return out | {"macro_f1": metrics.macro_f1(predicted, targets, len(self.labels))}


@register
class Regression(TaskKind):
    """Squared error of one output; Pearson and Spearman correlation (STS-B) and the mean squared error."""

    name = "regression"
    num_outputs = 1

    def targets(self, labels: list) -> torch.Tensor:
        return torch.tensor(labels, dtype=torch.float32)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        return F.mse_loss(logits.float().squeeze(-1), targets, reduction="sum"), targets.numel()

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().squeeze(-1)

    def scores(self, predicted: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return {
            "pearson": metrics.pearson(predicted, targets),
            "spearman": metrics.spearman(predicted, targets),
            "mse": (predicted.double() - targets.double()).square().mean().item(),
        }
