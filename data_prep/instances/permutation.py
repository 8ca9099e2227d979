"""Permutation language modelling instances (XLNet, Yang et al. 2019).

A document's tokens are packed back to back into sequences of `max_seq_length` (the last one shorter:
nothing is dropped). Each sequence gets a factorization order `perm_order`, a random permutation of its
positions: `perm_order[t]` is the position predicted at step t. With `span_len` > 1 the order permutes
blocks of `span_len` consecutive positions (kept in reading order inside a block), so the targets come
in contiguous spans, a simple stand-in for XLNet's span-based prediction. Partial prediction: only the
last n/K steps of the order are targets (K = `partial_k`), listed in prediction order in
`target_mapping` (= the tail of `perm_order`), `num_predict` of them.

The attention masks are derived from the order, not stored. With rank[perm_order[t]] = t,

    content stream: i may attend j  iff  rank[j] <= rank[i]   (itself included)
    query stream:   i may attend j  iff  rank[j] <  rank[i]   (sees its position, never its token)

and the query stream is only needed at the `target_mapping` rows. XLNet's own implementation lets the
non-target context attend to all of itself (it is never predicted, so this leaks nothing); a training
side may do the same by treating every rank below n - num_predict as equal.
"""

from __future__ import annotations

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset
from pydantic import Field

from data_prep.instances.base import DocumentSource, InstanceType, Params, Vocabulary, field_values, register


class PermutationParams(Params):
    max_seq_length: int = Field(512, ge=1)
    partial_k: float = Field(6.0, ge=1)
    span_len: int = Field(1, ge=1)


@register
class PermutationLM(InstanceType):
    name = "plm"
    fields = {"tokens": np.int32, "perm_order": np.int32, "target_mapping": np.int32, "num_predict": np.int32}
    Params = PermutationParams

    def build(
        self, doc: int, source: DocumentSource, rng: np.random.Generator
    ) -> list[dict[str, np.ndarray]]:
        sentences = source.sentences(doc)
        tokens = np.concatenate(sentences) if sentences else np.zeros(0, dtype=np.int64)
        size = self.params.max_seq_length
        return [self._instance(tokens[i : i + size], rng) for i in range(0, len(tokens), size)]

    def _instance(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        n, span = len(tokens), self.params.span_len
        blocks = np.arange(0, n, span)[rng.permutation(-(-n // span))]
        order = (blocks[:, None] + np.arange(span)).ravel()
        order = order[order < n]  # the last block may be short
        num_predict = int(n / self.params.partial_k + rng.random())
        return {
            "tokens": tokens.astype(np.int32),
            "perm_order": order.astype(np.int32),
            "target_mapping": order[n - num_predict :].astype(np.int32),
            "num_predict": np.array([num_predict], dtype=np.int32),
        }

    @classmethod
    def statistics(cls, instances: dict[str, IndexedDataset], vocab: Vocabulary) -> dict[str, float]:
        lengths = instances["tokens"].sequence_lengths.astype(np.int64)
        num_predict = field_values(instances["num_predict"]).astype(np.int64)
        count = max(len(lengths), 1)
        return {
            "instances": float(len(lengths)),
            "mean_tokens": float(lengths.sum()) / count,
            "target_share": float(num_predict.sum()) / max(int(lengths.sum()), 1),
            "mean_targets": float(num_predict.sum()) / count,
            "valid_permutations": float(_valid(instances, lengths, num_predict).sum()) / count,
        }


def _valid(instances: dict[str, IndexedDataset], lengths: np.ndarray, num_predict: np.ndarray) -> np.ndarray:
    """Per instance: `perm_order` is a permutation of its positions and `target_mapping` is its tail."""
    if not (
        np.array_equal(instances["perm_order"].sequence_lengths, lengths)
        and np.array_equal(instances["target_mapping"].sequence_lengths, num_predict)
    ):
        return np.zeros(len(lengths), dtype=bool)
    order, targets = field_values(instances["perm_order"]), field_values(instances["target_mapping"])
    start = np.cumsum(lengths) - lengths
    owner = np.repeat(np.arange(len(lengths)), lengths)
    # sorted within its instance, a permutation reads 0, 1, ..., n-1
    wrong = order[np.lexsort((order, owner))] != np.arange(len(order)) - start[owner]
    bad = np.bincount(owner, wrong, minlength=len(lengths)) > 0
    tail_owner = np.repeat(np.arange(len(lengths)), num_predict)
    tail = np.arange(len(targets)) - (np.cumsum(num_predict) - num_predict)[tail_owner]
    tail += (start + lengths - num_predict)[tail_owner]
    bad |= np.bincount(tail_owner, order[tail] != targets, minlength=len(lengths)) > 0
    return ~bad
