"""The unigram-frequency baseline: the held-out loss and accuracy of predicting every target by its frequency
in the training split alone, blind to its context. A model that learned nothing from context scores about
this (its loss and its accuracy, which is that of always guessing the most frequent token); the distance
above it is what the model learned from the words around a target.
"""

from __future__ import annotations

import numpy as np
import torch

from plmscale.data import PackedStream
from plmscale.data.masking import FIRST_ORDINARY_ID

MAX_COUNTED_TOKENS = 50_000_000  # a unigram distribution is settled long before; a big corpus is not re-read


def training_frequencies(
    shards_dir: str, split: str = "train", max_tokens: int = MAX_COUNTED_TOKENS
) -> np.ndarray:
    """Token counts over the vocabulary, from the split's documents in stream order (each followed by its
    [SEP], as training reads them), up to `max_tokens` tokens."""
    stream = PackedStream.from_manifest(shards_dir, split, verify=False)
    counts = np.zeros(stream.vocab_size, dtype=np.int64)
    counted = 0
    for doc in range(len(stream.doc_length)):
        if counted >= max_tokens:
            break
        tokens = np.append(stream.document(doc), stream.separator)
        counts += np.bincount(tokens, minlength=stream.vocab_size)
        counted += len(tokens)
    return counts


class FrequencyBaseline:
    """p(token) = (count + 1) / (total + vocabulary) over the tokens that can be targets (add-one, so an
    unseen token costs a finite loss): masked-token objectives never target the special tokens."""

    def __init__(self, counts: np.ndarray, specials_are_targets: bool):
        smoothed = counts.astype(np.float64) + 1
        if not specials_are_targets:
            smoothed[:FIRST_ORDINARY_ID] = 0
        self.tokens = int(counts.sum())
        probs = smoothed / smoothed.sum()
        self.log_probs = torch.from_numpy(np.log(probs, out=np.full_like(probs, -np.inf), where=probs > 0))
        self.guess = int(smoothed.argmax())  # the accuracy-maximizing constant answer

    def score(self, targets: torch.Tensor) -> tuple[float, int]:
        """(summed loss, correct guesses) on these target ids."""
        return float(-self.log_probs[targets].sum()), int((targets == self.guess).sum())
