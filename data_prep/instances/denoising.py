"""BART denoising instances (Lewis et al. 2019): a noised source, the original as target.

A document is cut into chunks of whole sentences (`sentence_chunks`); each chunk is one instance. The
noisings are applied in this order, each switchable:

- sentence permutation: the chunk's sentences are shuffled;
- text infilling: `mask_ratio` of the tokens are covered by spans whose lengths are drawn from
  Poisson(`poisson_lambda`) until the budget is reached (the last span trimmed to fit); spans do not
  overlap, each is replaced by ONE [MASK], and a zero-length span inserts a [MASK] where it lands;
- token deletion: `delete_ratio` of the tokens, drawn from those infilling left, are removed;
- document rotation: the source is rotated to begin at a uniformly drawn token.

Counts are rounded stochastically (floor of x + u) so every fraction is unbiased even on short chunks.
Source and target are framed as [CLS] ... [SEP]; `span_lengths` records the infilled spans in source
order, which is what `statistics` needs to check the figures against the paper.
"""

from __future__ import annotations

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset
from pydantic import model_validator

from data_prep.instances.base import (
    DocumentSource,
    InstanceType,
    Params,
    Vocabulary,
    field_values,
    register,
    sentence_chunks,
)


class DenoisingParams(Params):
    max_seq_length: int = 512
    mask_ratio: float = 0.3
    poisson_lambda: float = 3.0
    permute_sentences: bool = True
    delete_ratio: float = 0.0
    rotate: bool = False

    @model_validator(mode="after")
    def _check(self) -> DenoisingParams:
        if self.max_seq_length < 3:
            raise ValueError("max_seq_length must leave room for [CLS], [SEP] and a token")
        if self.poisson_lambda <= 0:
            raise ValueError("poisson_lambda must be positive")
        if min(self.mask_ratio, self.delete_ratio) < 0 or self.mask_ratio + self.delete_ratio > 1:
            raise ValueError("mask_ratio and delete_ratio must be >= 0 and sum to at most 1")
        return self


@register
class Denoising(InstanceType):
    name = "denoising"
    fields = {"source": np.int32, "target": np.int32, "span_lengths": np.int32}
    Params = DenoisingParams

    def build(
        self, doc: int, source: DocumentSource, rng: np.random.Generator
    ) -> list[dict[str, np.ndarray]]:
        budget = self.params.max_seq_length - 2
        return [
            self._instance(chunk, budget, rng) for chunk in sentence_chunks(source.sentences(doc), budget)
        ]

    def _instance(
        self, chunk: list[np.ndarray], budget: int, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        p, cls, sep = self.params, self.vocab.cls_id, self.vocab.sep_id
        target = np.concatenate(chunk)
        order = rng.permutation(len(chunk)) if p.permute_sentences else range(len(chunk))
        tokens = np.concatenate([chunk[i] for i in order])
        n = len(tokens)
        n_infill = int(p.mask_ratio * n + rng.random())
        n_delete = min(int(p.delete_ratio * n + rng.random()), n - n_infill)
        # zero-length spans lengthen the source: redraw in the (vanishingly rare) case it would overflow
        lengths = self._span_lengths(n_infill, rng)
        while len(lengths) - n_infill - n_delete > budget - n:
            lengths = self._span_lengths(n_infill, rng)

        # span i lands after gaps[i] of the n - n_infill tokens it leaves; spans in one gap are adjacent
        gaps = np.sort(rng.integers(0, n - n_infill + 1, size=len(lengths)))
        infilled = np.zeros(n, dtype=bool)
        infilled[np.repeat(gaps, lengths) + np.arange(n_infill)] = True
        left = tokens[~infilled]
        kept = np.ones(len(left), dtype=bool)
        kept[rng.choice(len(left), size=n_delete, replace=False)] = False
        before = np.concatenate([[0], np.cumsum(kept)])  # surviving tokens before each gap
        noised = np.insert(left[kept], before[gaps], self.vocab.mask_id)
        if p.rotate and len(noised):
            noised = np.roll(noised, -int(rng.integers(len(noised))))
        return {
            "source": np.concatenate([[cls], noised, [sep]]).astype(np.int32),
            "target": np.concatenate([[cls], target, [sep]]).astype(np.int32),
            "span_lengths": lengths.astype(np.int32),
        }

    def _span_lengths(self, total: int, rng: np.random.Generator) -> np.ndarray:
        """Poisson lengths drawn until they cover `total` tokens, the last one trimmed to fit."""
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        lam = self.params.poisson_lambda
        draws = rng.poisson(lam, size=int(total / lam) + 8)
        while draws.sum() < total:
            draws = np.concatenate([draws, rng.poisson(lam, size=int(total / lam) + 8)])
        last = int(np.searchsorted(np.cumsum(draws), total))  # first index reaching the budget
        lengths = draws[: last + 1].copy()
        lengths[-1] -= lengths.sum() - total
        return lengths

    @classmethod
    def statistics(cls, instances: dict[str, IndexedDataset], vocab: Vocabulary) -> dict[str, float]:
        source_len = instances["source"].sequence_lengths.astype(np.int64) - 2
        target_len = instances["target"].sequence_lengths.astype(np.int64) - 2
        spans = field_values(instances["span_lengths"]).astype(np.int64)
        n_spans = instances["span_lengths"].sequence_lengths.astype(np.int64)
        tokens, infilled = max(int(target_len.sum()), 1), int(spans.sum())
        # target = source - one [MASK] per span + infilled tokens + deleted tokens
        deleted = int(target_len.sum() - infilled - (source_len.sum() - n_spans.sum()))
        return {
            "instances": float(len(source_len)),
            "infilled_fraction": infilled / tokens,
            "mean_span_length": float(spans.mean()) if len(spans) else 0.0,
            "zero_length_span_share": float((spans == 0).mean()) if len(spans) else 0.0,
            "deleted_fraction": deleted / tokens,
            "source_target_length_ratio": float(source_len.sum()) / tokens,
        }
