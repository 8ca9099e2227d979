"""The fine-tuning hyperparameters (BERT's recipe: AdamW, linear warm-up and decay), free of heavy imports so
that the command line can show their defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    max_seq_length: int = 128
    dropout: float = 0.1  # of the head; the trunk keeps its own model.hidden_dropout
    seed: int = 0


# TinyBERT's task stage: embeddings, layer outputs and attention scores, then the task logits at T = 1.
TINYBERT_TASK_LOSSES = (
    {"name": "embedding", "weight": 1.0},
    {"name": "hidden", "weight": 1.0},
    {"name": "attention", "weight": 1.0},
    {"name": "logits", "weight": 1.0, "temperature": 1.0},
)


@dataclass(frozen=True)
class DistillSettings:
    """Task distillation (plmscale.finetune.distill): the fine-tuned teacher and `distill.losses` entries."""

    teacher: str
    losses: tuple[dict, ...] = TINYBERT_TASK_LOSSES
    # epochs of the intermediate-layer losses alone before the prediction-layer ones (TinyBERT's order);
    # None: as many as the prediction phase's where the losses have both kinds; 0: all losses together
    intermediate_epochs: int | None = None
