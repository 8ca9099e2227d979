"""SpanBERT: span masking plus the span-boundary objective (SBO), single segments, no NSP.

Every token of a masked span [s, e) is predicted twice: by the MLM head from its own final state, and by the
span-boundary head (`plmscale.model.heads.SpanBoundaryHead`) from the states of the boundary tokens x[s-1]
and x[e] and its offset in the span. The loss is SpanBERT's MLM + SBO, two terms, each summed over its
targets and divided by its own global count by the trainer.

The spans come from the masker (`unit: span`, the geometric span lengths of the paper) on the fly, or from
instances built offline (`plmscale prep instances --objective span`), whose `spans` field keeps them. A
span never contains [CLS] or [SEP], so both boundaries lie inside the sequence.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import model_validator

from plmscale.objectives import register
from plmscale.objectives.base import LossTerm
from plmscale.objectives.mlm import MaskedLM, MLMParams


class SpanBoundaryParams(MLMParams):
    """MLM's params, SpanBERT's span masking by default."""

    @model_validator(mode="before")
    @classmethod
    def _span_by_default(cls, data):
        return {"unit": "span"} | data if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _spans(self) -> SpanBoundaryParams:
        if self.unit != "span":
            raise ValueError(
                f"unit={self.unit!r}: the span-boundary objective predicts masked spans from their "
                "boundaries; set unit: span (SpanBERT's masking)"
            )
        return self


def span_boundaries(spans: np.ndarray, length: int) -> np.ndarray:
    """[length, 2]: for each position inside one of `spans` ([n, 2] of [start, end)), the positions of its
    span's left and right boundary tokens, start - 1 and end; -1 at every other position."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    starts, ends = spans[:, 0], spans[:, 1]
    if len(spans) and (starts.min() < 1 or ends.max() > length - 1):
        raise ValueError(f"a masked span of {spans.tolist()} has a boundary outside the {length} positions")
    sizes = ends - starts
    positions = np.repeat(starts - np.cumsum(sizes) + sizes, sizes) + np.arange(int(sizes.sum()))
    boundaries = np.full((length, 2), -1, dtype=np.int64)
    boundaries[positions] = np.repeat(np.stack([starts - 1, ends], axis=1), sizes, axis=0)
    return boundaries


@register
class SpanBoundaryMaskedLM(MaskedLM):
    name = "mlm_sbo"
    Params = SpanBoundaryParams
    instance_fields = MaskedLM.instance_fields | {"spans"}

    def __init__(self, params: SpanBoundaryParams, model_cfg):
        super().__init__(params, model_cfg)
        if not model_cfg.span_boundary_head:
            raise ValueError(
                f"objective {self.name!r} trains SpanBERT's span-boundary head: set model.span_boundary_head: true"
            )

    def make_example(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        example, masked = self.masked_example(tokens, rng)
        return example | {"span_boundaries": span_boundaries(masked.spans, len(example["input_ids"]))}

    def instance_sample(self, sample: dict[str, np.ndarray], instance: dict[str, np.ndarray]) -> dict:
        return sample | {"span_boundaries": span_boundaries(instance["spans"], len(sample["input_ids"]))}

    def target_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"mlm": self.target_count(batch), "sbo": int((batch["span_boundaries"][..., 0] >= 0).sum())}

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return super().model_inputs(batch) | {"span_boundaries": batch["span_boundaries"]}

    def loss_terms(
        self, outputs, batch: dict[str, torch.Tensor], spec, count_correct: bool = False
    ) -> dict[str, LossTerm]:
        logits, sbo_logits = outputs
        targets = batch["labels"][batch["span_boundaries"][..., 0] >= 0]
        losses = spec.cross_entropy(sbo_logits, targets)
        hits = None
        if count_correct:
            hits = int((spec.gather_logits(sbo_logits).argmax(-1) == targets).sum())
        return {
            "mlm": self.token_term(logits, batch, spec, count_correct),
            "sbo": LossTerm(losses.sum(), targets.numel(), hits),
        }
