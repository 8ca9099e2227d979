"""ERNIE 1.0's phrase- and entity-level units: a collocation table learnt from the corpus, an entity list
given by the user, and the matcher that finds their occurrences in a token sequence.

Both are keyed by token ids, so matching is a dict lookup per candidate; matches start and end on word
boundaries (the same word starts the masker uses) and never overlap, the longest match winning.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from plmscale.tokenizer import WORD_START, Tokenizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core warns that Transformer Engine and Apex are absent
    from megatron.core.datasets.indexed_dataset import IndexedDataset

FORMAT = "plmscale-phrases/1"
READ_CHUNK = 4096  # sentences read from a shard at a time


def longest_matches(
    tokens: np.ndarray, word_starts: np.ndarray, keys: set[tuple[int, ...]] | dict, max_len: int
) -> list[tuple[int, int]]:
    """Left to right, at each word start the longest key ending on a word boundary; skip past a match."""
    toks = np.asarray(tokens).tolist()
    bounds = np.append(np.flatnonzero(word_starts), len(toks)).tolist()
    matches, i = [], 0
    while i < len(bounds) - 1:
        start, j = bounds[i], i + 1
        while j < len(bounds) - 1 and bounds[j + 1] - start <= max_len:
            j += 1
        while j > i and tuple(toks[start : bounds[j]]) not in keys:
            j -= 1
        if j > i:
            matches.append((start, bounds[j]))
            i = j
        else:
            i += 1
    return matches


def iter_sentences(prefixes: list[str]) -> Iterator[np.ndarray]:
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)
        for first in range(0, len(dataset), READ_CHUNK):
            yield from dataset[first : min(first + READ_CHUNK, len(dataset))]


class PhraseTable:
    """Word bigrams and trigrams that co-occur far more often than chance (PMI), as token-id tuples."""

    def __init__(self, scores: dict[tuple[int, ...], float]):
        self.scores = scores
        self.max_len = max(map(len, scores), default=0)

    @classmethod
    def build(
        cls,
        prefixes: list[str],
        word_starts: Callable[[np.ndarray], np.ndarray],
        *,
        min_count: int = 5,
        threshold: float = 3.0,
        top_k: int = 100_000,
    ) -> PhraseTable:
        """Count words (runs of pieces from one word start to the next) and their bigrams and trigrams over
        the shards at `prefixes`; keep n-grams seen `min_count` times whose PMI per word junction,
        (log p(w1..wn) - sum log p(wi)) / (n - 1), is at least `threshold`, the `top_k` highest."""
        ids: dict[tuple[int, ...], int] = {}
        unigrams, ngrams = Counter(), Counter()
        for sentence in iter_sentences(prefixes):
            toks = sentence.tolist()
            cuts = sorted({0, len(toks), *np.flatnonzero(word_starts(sentence)).tolist()})
            words = [ids.setdefault(tuple(toks[a:b]), len(ids)) for a, b in zip(cuts, cuts[1:], strict=False)]
            unigrams.update(words)
            ngrams.update(zip(words, words[1:], strict=False))
            ngrams.update(zip(words, words[1:], words[2:], strict=False))
        total = math.log(max(1, sum(unigrams.values())))
        log_unigram = {w: math.log(c) - total for w, c in unigrams.items()}
        scored = []
        for gram, count in ngrams.items():
            if count >= min_count:
                joint = math.log(count) - total
                pmi = (joint - sum(log_unigram[w] for w in gram)) / (len(gram) - 1)
                if pmi >= threshold:
                    scored.append((pmi, gram))
        words_of = {i: w for w, i in ids.items()}
        scored.sort(key=lambda item: (-item[0], item[1]))
        return cls({sum((words_of[w] for w in gram), ()): pmi for pmi, gram in scored[:top_k]})

    def find(self, tokens: np.ndarray, word_starts: np.ndarray) -> list[tuple[int, int]]:
        return longest_matches(tokens, word_starts, self.scores, self.max_len)

    def save(self, path: str | Path) -> None:
        rows = [[list(key), score] for key, score in self.scores.items()]
        Path(path).write_text(json.dumps({"format": FORMAT, "ngrams": rows}))

    @classmethod
    def load(cls, path: str | Path) -> PhraseTable:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a plmscale phrase table (format {data.get('format')!r})")
        return cls({tuple(key): score for key, score in data["ngrams"]})


class EntityMatcher:
    """A user's entity list (one per line), each tokenized as a word of running text is: after a space.
    An entity whose first piece is the bare marker (common for CJK) also matches without it."""

    def __init__(self, entities: set[tuple[int, ...]]):
        self.entities = entities
        self.max_len = max(map(len, entities), default=0)

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: Tokenizer) -> EntityMatcher:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
        marker = tokenizer.sp.piece_to_id(WORD_START)  # [UNK]'s id when the vocabulary lacks it
        entities = set()
        for ids in tokenizer.encode([line for line in lines if line]):
            entities.add(tuple(ids))
            if len(ids) > 1 and ids[0] == marker != tokenizer.unk_id:
                entities.add(tuple(ids[1:]))
        return cls(entities)

    def find(self, tokens: np.ndarray, word_starts: np.ndarray) -> list[tuple[int, int]]:
        return longest_matches(tokens, word_starts, self.entities, self.max_len)
