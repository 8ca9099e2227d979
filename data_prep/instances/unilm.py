"""UniLM instances (Dong et al. 2019): one masked sequence, four attention regimes.

A document is cut into chunks of whole sentences (long documents give several chunks); each chunk is one
instance, assigned a mode with the configured proportions (the paper's 1/6, 1/6, 1/3, 1/3 by default):

    0 left_to_right, 1 right_to_left:  [CLS] A [SEP]             segments all 0
    2 bidirectional, 3 seq2seq:        [CLS] A [SEP] B [SEP]     segments 0 up to the first [SEP], then 1

where B continues A (cut at a random sentence boundary; the paper's next-sentence task is left out).
15 % of the maskable tokens are masked BERT's way (80 % [MASK], 10 % a random token, 10 % kept); special
tokens never are, and in seq2seq only the target segment B is maskable, as in the paper.

The training side (`plmscale.objectives.unilm`, which numbers the modes) builds the attention mask from
`mode` and `segments` with the rule of
`attention_mask`: row i may attend column j when

    left_to_right: j <= i        right_to_left: j >= i        bidirectional: always
    seq2seq:       j is in the source, or i and j are both in the target and j <= i

so the source sees only the source, and the target sees the source and the target up to itself.
"""

from __future__ import annotations

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset
from pydantic import Field, model_validator

from data_prep.instances.base import (
    DocumentSource,
    InstanceType,
    Params,
    Vocabulary,
    field_values,
    register,
    sentence_chunks,
)
from plmscale.objectives.unilm import BIDIRECTIONAL, LEFT_TO_RIGHT, MODES, RIGHT_TO_LEFT, SEQ2SEQ


def attention_mask(mode: int, segments: np.ndarray) -> np.ndarray:
    """[n, n] bool, True where row i may attend column j."""
    n = len(segments)
    earlier = np.tri(n, dtype=bool)  # j <= i
    if mode == LEFT_TO_RIGHT:
        return earlier
    if mode == RIGHT_TO_LEFT:
        return earlier.T
    if mode == BIDIRECTIONAL:
        return np.ones((n, n), dtype=bool)
    if mode == SEQ2SEQ:
        target = np.asarray(segments) == 1
        return ~target[None, :] | (target[:, None] & target[None, :] & earlier)
    raise ValueError(f"unknown UniLM mode {mode}")


class UniLMParams(Params):
    max_seq_length: int = Field(512, ge=4)
    left_to_right: float = Field(1 / 6, ge=0)
    right_to_left: float = Field(1 / 6, ge=0)
    bidirectional: float = Field(1 / 3, ge=0)
    seq2seq: float = Field(1 / 3, ge=0)
    mask_prob: float = Field(0.15, ge=0, le=1)
    mask_token_prob: float = Field(0.8, ge=0, le=1)
    random_token_prob: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> UniLMParams:
        if sum(getattr(self, mode) for mode in MODES) <= 0:
            raise ValueError("at least one UniLM mode needs a positive proportion")
        if self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError("mask_token_prob + random_token_prob must be at most 1")
        return self

    @property
    def proportions(self) -> np.ndarray:
        """The four mode proportions in `MODES` order, normalized to sum to 1."""
        weights = np.array([getattr(self, mode) for mode in MODES])
        return weights / weights.sum()


@register
class UniLM(InstanceType):
    name = "unilm"
    fields = {
        "tokens": np.int32,
        "segments": np.int8,
        "mode": np.int8,
        "mask_positions": np.int32,
        "mask_labels": np.int32,
    }
    Params = UniLMParams

    def build(
        self, doc: int, source: DocumentSource, rng: np.random.Generator
    ) -> list[dict[str, np.ndarray]]:
        # room for two segments' specials whatever the mode, so chunking does not depend on it
        chunks = sentence_chunks(source.sentences(doc), self.params.max_seq_length - 3)
        return [self._instance(chunk, rng) for chunk in chunks]

    def _instance(self, chunk: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        p, v = self.params, self.vocab
        mode = int(rng.choice(4, p=p.proportions))
        if mode in (LEFT_TO_RIGHT, RIGHT_TO_LEFT):
            tokens = np.concatenate([[v.cls_id], *chunk, [v.sep_id]])
            segments = np.zeros(len(tokens), dtype=np.int8)
        else:
            if len(chunk) > 1:
                cut = int(rng.integers(1, len(chunk)))
                a, b = np.concatenate(chunk[:cut]), np.concatenate(chunk[cut:])
            else:  # one sentence: cut inside it
                cut = int(rng.integers(1, len(chunk[0]))) if len(chunk[0]) > 1 else 1
                a, b = chunk[0][:cut], chunk[0][cut:]
            tokens = np.concatenate([[v.cls_id], a, [v.sep_id], b, [v.sep_id]])
            segments = np.repeat(np.array([0, 1], dtype=np.int8), [len(a) + 2, len(b) + 1])

        maskable = (tokens != v.cls_id) & (tokens != v.sep_id)
        if mode == SEQ2SEQ:
            maskable &= segments == 1
        candidates = np.flatnonzero(maskable)
        count = int(p.mask_prob * len(candidates) + rng.random())
        positions = np.sort(rng.choice(candidates, size=count, replace=False))
        labels = tokens[positions]
        tokens = tokens.copy()
        draw = rng.random(count)
        replace = draw < p.mask_token_prob
        randomize = ~replace & (draw < p.mask_token_prob + p.random_token_prob)
        tokens[positions[replace]] = v.mask_id
        tokens[positions[randomize]] = rng.integers(v.mask_id + 1, v.size, size=int(randomize.sum()))
        return {
            "tokens": tokens.astype(np.int32),
            "segments": segments,
            "mode": np.array([mode], dtype=np.int8),
            "mask_positions": positions.astype(np.int32),
            "mask_labels": labels.astype(np.int32),
        }

    @classmethod
    def statistics(cls, instances: dict[str, IndexedDataset], vocab: Vocabulary) -> dict[str, float]:
        modes = field_values(instances["mode"]).astype(np.int64)
        lengths = instances["tokens"].sequence_lengths.astype(np.int64)
        tokens, segments = field_values(instances["tokens"]), field_values(instances["segments"])
        owner = np.repeat(np.arange(len(lengths)), lengths)
        seq2seq = modes[owner] == SEQ2SEQ
        maskable = (tokens != vocab.cls_id) & (tokens != vocab.sep_id) & (~seq2seq | (segments == 1))

        counts = instances["mask_positions"].sequence_lengths.astype(np.int64)
        at = field_values(instances["mask_positions"]) + np.repeat(np.cumsum(lengths) - lengths, counts)
        labels, shown = field_values(instances["mask_labels"]), tokens[at]
        masked = max(len(at), 1)
        stats = {"instances": float(len(modes))}
        stats |= {
            f"share_{mode}": float((modes == i).mean()) if len(modes) else 0.0 for i, mode in enumerate(MODES)
        }
        return stats | {
            "masked_fraction": len(at) / max(int(maskable.sum()), 1),
            "mask_token_share": float((shown == vocab.mask_id).sum()) / masked,
            "random_token_share": float(((shown != vocab.mask_id) & (shown != labels)).sum()) / masked,
            "kept_token_share": float((shown == labels).sum()) / masked,
            "seq2seq_source_masked": float((seq2seq[at] & (segments[at] == 0)).sum()),
        }
