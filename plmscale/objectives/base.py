"""What every objective provides; see plmscale/objectives/__init__.py."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

IGNORE_INDEX = -100
# The batch field of the targets' flat positions, which the loader adds on the host (`with_target_positions`).
TARGET_POSITIONS = "target_positions"


def target_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The flat positions (row-major over [batch, seq], ascending) of the labels that are targets: those the
    loader found, or found here, for a batch built by hand (on an accelerator, a synchronization: `nonzero`
    reads its size back to the host)."""
    if TARGET_POSITIONS in batch:
        return batch[TARGET_POSITIONS]
    return (batch["labels"] != IGNORE_INDEX).flatten().nonzero().squeeze(1)


def with_target_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` with its target positions, found on the host where the loader builds it: then neither the
    head's selection nor the loss's labels make the device wait for the host."""
    return batch | {TARGET_POSITIONS: target_positions(batch)}


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LossTerm(NamedTuple):
    """One loss of an objective, summed over its `count` targets; `correct` counts the argmax hits when
    asked for, or when they cost nothing (a 2-way classifier)."""

    sum: torch.Tensor
    count: int
    correct: int | None = None


def term_metrics(
    sums: dict[str, float], counts: dict[str, float], correct: dict[str, float], breakdown: tuple = ()
) -> dict:
    """Global per-term totals -> metrics, the same keys in training's evaluation and `plmscale eval`:
    `loss`, the sum of the terms' means (what is optimized), and the first term's `targets` and `accuracy`
    (the masked or next tokens), as for one term; with several terms, each term's `loss/NAME`, the other
    terms' `targets/NAME`, and `NAME_accuracy` for another term whose hits were counted. The `breakdown`
    terms (`Objective.breakdown_terms`, UniLM's modes) are reported so where they have targets, not added
    into `loss`."""
    first, *others = [name for name in counts if name not in breakdown]
    shown = [name for name in counts if name not in breakdown or counts[name]]
    means = {name: sums[name] / max(counts[name], 1) for name in shown}
    metrics = {"loss": sum(means[name] for name in (first, *others)), "targets": counts[first]}
    if len(shown) > 1:
        metrics |= {f"loss/{name}": mean for name, mean in means.items()}
        metrics |= {f"targets/{name}": counts[name] for name in shown if name != first}
    for name, hits in correct.items():
        if name in means:
            metrics["accuracy" if name == first else f"{name}_accuracy"] = hits / max(counts[name], 1)
    return metrics


class Objective:
    name: ClassVar[str]
    model_kinds: ClassVar[set[str]]
    Params: ClassVar[type[BaseModel]] = NoParams
    # Fields of pre-built instances (`data.instances`) it trains on; empty: token streams only.
    instance_fields: ClassVar[frozenset[str]] = frozenset()
    # The sentence-pair task (`nsp`, `sop`) trained beside the token loss, if any.
    pair_task: ClassVar[str | None] = None
    # Terms that `loss_terms` adds when evaluating, each a slice of the first term's targets (UniLM: those
    # of each attention mode): reported per slice, never optimized nor added into the loss.
    breakdown_terms: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: BaseModel, model_cfg):
        self.params, self.model_cfg = params, model_cfg

    def window_length(self, seq_length: int) -> int:
        """Stream tokens consumed per sample of `seq_length` model positions."""
        raise NotImplementedError

    def make_example(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Model inputs (`input_ids`, optional `attention_mask`, `token_type_ids`) and `labels`."""
        raise NotImplementedError

    def instance_sample(self, sample: dict[str, np.ndarray], instance: dict[str, np.ndarray]) -> dict:
        """A padded sample built from a pre-built instance, with what else this objective reads of it."""
        return sample

    def check_instances(self, manifest: dict, key: str = "data.instances") -> None:
        """Raise ValueError, naming the missing fields, if an instance set cannot train this objective."""
        missing = sorted(self.instance_fields - set(manifest["fields"]))
        if missing:
            raise ValueError(
                f"{key}={manifest['directory']} holds {manifest['objective']!r} instances without "
                f"the field(s) {missing} that objective {self.name!r} trains on"
            )

    @staticmethod
    def target_count(batch: dict[str, torch.Tensor]) -> int:
        return target_positions(batch).numel()

    def target_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """Targets of each loss term (see `loss_terms`), counted before the forward pass."""
        return {self.name: self.target_count(batch)}

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward arguments; the head runs at the `target_positions` only (see `TransformerLM.output`), or
        everywhere when every position is a target (causal LM): then there is nothing to gather. Decided by
        the positions' number, a shape: no device-to-host synchronization, wherever the batch is."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        positions = target_positions(batch)
        if positions.numel() == batch["labels"].numel():
            return inputs
        return inputs | {TARGET_POSITIONS: positions}

    @staticmethod
    def targets(batch: dict[str, torch.Tensor], logits: torch.Tensor | None = None) -> torch.Tensor:
        """Labels in the order of the logits' rows: those at the target positions ([targets, vocab]
        logits), or all of them when the head ran at every position ([batch, seq, vocab] logits, which
        `model_inputs` asks for only when every position is a target)."""
        labels = batch["labels"]
        if logits is not None and logits.dim() == labels.dim() + 1:
            return labels
        return labels.flatten().index_select(0, target_positions(batch))

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], spec) -> tuple[torch.Tensor, int]:
        """(summed token loss, number of targets) from vocabulary-shard logits at the target positions."""
        targets = self.targets(batch, logits)
        return spec.cross_entropy(logits, targets).sum(), targets.numel()

    def token_term(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor], spec, count_correct: bool
    ) -> LossTerm:
        """`loss` as a LossTerm; with `count_correct`, the targets whose argmax over the full vocabulary
        is the label (this gathers the vocabulary shards: evaluation only)."""
        loss_sum, count = self.loss(logits, batch, spec)
        if not count_correct:
            return LossTerm(loss_sum, count)
        hits = spec.gather_logits(logits).argmax(-1) == self.targets(batch, logits)
        return LossTerm(loss_sum, count, int(hits.sum()))

    def loss_terms(
        self, outputs, batch: dict[str, torch.Tensor], spec, count_correct: bool = False
    ) -> dict[str, LossTerm]:
        """Each loss term from the model's outputs, keyed as in `target_counts`. The trainer divides every
        term by its own global count and adds them: a mean per term (BERT: mean MLM loss + mean NSP loss),
        exact however the targets fall across micro-batches and ranks."""
        return {self.name: self.token_term(outputs, batch, spec, count_correct)}
