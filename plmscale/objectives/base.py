"""What every objective provides; see plmscale/objectives/__init__.py."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

IGNORE_INDEX = -100


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Objective:
    name: ClassVar[str]
    model_kinds: ClassVar[set[str]]
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel, model_cfg):
        self.params, self.model_cfg = params, model_cfg

    def window_length(self, seq_length: int) -> int:
        """Stream tokens consumed per sample of `seq_length` model positions."""
        raise NotImplementedError

    def make_example(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Model inputs (`input_ids`, optional `attention_mask`, `token_type_ids`) and `labels`."""
        raise NotImplementedError

    @staticmethod
    def target_count(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward arguments; the head runs at target positions only (see `TransformerLM.forward`)."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return inputs | {"target_mask": batch["labels"] != IGNORE_INDEX}

    @staticmethod
    def targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Labels at the target positions, in the order of the model's output rows."""
        labels = batch["labels"]
        return labels[labels != IGNORE_INDEX]

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], spec) -> tuple[torch.Tensor, int]:
        """(summed token loss, number of targets) from vocabulary-shard logits at the target positions."""
        targets = self.targets(batch)
        return spec.cross_entropy(logits, targets).sum(), targets.numel()
