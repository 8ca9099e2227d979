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
from collections.abc import Callable, Iterable, Iterator
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
    """Word bigrams and trigrams that co-occur far more often than chance (PMI), as token-id tuples.
    `stats` says how the table was counted (see `build`); the driver logs it."""

    def __init__(self, scores: dict[tuple[int, ...], float], stats: dict[str, int] | None = None):
        self.scores = scores
        self.stats = dict(stats or {})
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
        max_entries: int = 10_000_000,
    ) -> PhraseTable:
        """Count words (runs of pieces from one word start to the next) and their bigrams and trigrams over
        the shards at `prefixes`; keep n-grams seen `min_count` times whose PMI per word junction,
        (log p(w1..wn) - sum log p(wi)) / (n - 1), is at least `threshold`, the `top_k` highest.

        Memory is bounded whatever the corpus size as in word2phrase and gensim's `Phrases(max_vocab_size)`:
        the word table and the n-gram counter each hold at most `max_entries` entries. Before a sentence
        that might not fit, the full table's floor rises by one (from 1) and every entry counted fewer times
        is dropped, until it fits (or the table is empty: one sentence can overshoot a bound smaller than its
        2 n-grams a word); n-grams of dropped words go too, as PMI needs every word's count. A dropped
        entry seen again counts from zero, so once a table was pruned its counts are under-estimates and the
        scores approximate (gensim's caveat). The default costs 1-2 GB of n-gram counter (110-160 bytes an
        entry; a full word table, rare, ~3 GB more) and counts at least ~9M words exactly (the embedded
        corpus has 1.1 distinct n-grams a word, fewer as a corpus grows); past that the first prunes drop
        n-grams seen once or twice, far below `min_count`. `stats` records the counts, the prunes and floors,
        and the tables' final and peak sizes."""
        counts = _Counts(max_entries)
        counts.count(iter_sentences(prefixes), word_starts)
        total = math.log(max(1, counts.words))
        log_unigram = {w: math.log(c) - total for w, c in counts.unigrams.items()}
        scored = []
        for gram, count in counts.ngrams.items():
            if count >= min_count:
                joint = math.log(count) - total
                pmi = (joint - sum(log_unigram[w] for w in gram)) / (len(gram) - 1)
                if pmi >= threshold:
                    scored.append((pmi, gram))
        words_of = {i: w for w, i in counts.ids.items()}
        scored.sort(key=lambda item: (-item[0], item[1]))
        scores = {sum((words_of[w] for w in gram), ()): pmi for pmi, gram in scored[:top_k]}
        return cls(scores, counts.stats() | {"kept": len(scores)})

    def find(self, tokens: np.ndarray, word_starts: np.ndarray) -> list[tuple[int, int]]:
        return longest_matches(tokens, word_starts, self.scores, self.max_len)

    def save(self, path: str | Path) -> None:
        rows = [[list(key), score] for key, score in self.scores.items()]
        Path(path).write_text(json.dumps({"format": FORMAT, "ngrams": rows, "stats": self.stats}))

    @classmethod
    def load(cls, path: str | Path) -> PhraseTable:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a plmscale phrase table (format {data.get('format')!r})")
        return cls({tuple(key): score for key, score in data["ngrams"]}, data.get("stats"))


class _Counts:
    """Word ids and their unigram and n-gram counts, each table held to `max_entries` entries by pruning."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.ids: dict[tuple[int, ...], int] = {}  # a word pruned and seen again gets a fresh id
        self.retired = 0  # ids of pruned words: the next new id is len(ids) + retired
        self.unigrams, self.ngrams = Counter(), Counter()
        self.sentences = self.words = self.grams = 0
        self.word_prunes = self.prunes = 0
        self.word_floor = self.floor = 1  # entries counted fewer times were dropped; 1: none
        self.peak_words = self.peak = 0  # the tables only grow between prunes: peaks are taken there

    def count(self, sentences: Iterable[np.ndarray], word_starts: Callable[[np.ndarray], np.ndarray]) -> None:
        """Count the sentences' words and their bigrams and trigrams; one pure-Python loop, hence the locals."""
        ids, unigrams, ngrams, bound = self.ids, self.unigrams, self.ngrams, self.max_entries
        n_sentences = n_words = n_grams = 0
        for sentence in sentences:
            n_sentences += 1
            toks = tuple(sentence.tolist())
            if not toks:
                continue
            cuts = np.asarray(word_starts(sentence)).nonzero()[0].tolist()
            if cuts[:1] != [0]:
                cuts.insert(0, 0)
            cuts.append(len(toks))
            n = len(cuts) - 1
            grams = max(0, 2 * n - 3)
            if len(ids) + n > bound:  # the tables are pruned in place, so the locals stay valid
                self._prune_words(n)
            retired = self.retired
            words = [
                ids.setdefault(toks[a:b], len(ids) + retired) for a, b in zip(cuts, cuts[1:], strict=False)
            ]
            unigrams.update(words)
            if len(ngrams) + grams > bound:
                self._prune_ngrams(grams)
            ngrams.update(zip(words, words[1:], strict=False))
            ngrams.update(zip(words, words[1:], words[2:], strict=False))
            n_words += n
            n_grams += grams
        self.sentences += n_sentences
        self.words += n_words
        self.grams += n_grams

    def _prune_words(self, room: int) -> None:
        """Also drops the n-grams of the pruned words: PMI cannot score them, and their ids never recur."""
        while self.ids and len(self.ids) + room > self.max_entries:
            self.peak_words = max(self.peak_words, len(self.ids))
            self.peak = max(self.peak, len(self.ngrams))
            self.word_prunes += 1
            self.word_floor += 1
            dead = set(_prune(self.unigrams, self.word_floor))
            self.retired += len(dead)
            _delete(self.ids, [word for word, i in self.ids.items() if i in dead])
            _delete(self.ngrams, [gram for gram in self.ngrams if not dead.isdisjoint(gram)])

    def _prune_ngrams(self, room: int) -> None:
        while self.ngrams and len(self.ngrams) + room > self.max_entries:
            self.peak = max(self.peak, len(self.ngrams))
            self.prunes += 1
            self.floor += 1
            _prune(self.ngrams, self.floor)

    def stats(self) -> dict[str, int]:
        return {
            "sentences": self.sentences, "words": self.words, "ngrams": self.grams,
            "max_entries": self.max_entries,
            "word_entries": len(self.ids), "peak_word_entries": max(self.peak_words, len(self.ids)),
            "word_prunes": self.word_prunes, "word_floor": self.word_floor,
            "entries": len(self.ngrams), "peak_entries": max(self.peak, len(self.ngrams)),
            "prunes": self.prunes, "floor": self.floor,
        }  # fmt: skip


def _prune(counts: Counter, floor: int) -> list:
    """Delete the entries counted fewer than `floor` times; returns their keys."""
    dead = [key for key, count in counts.items() if count < floor]
    _delete(counts, dead)
    return dead


def _delete(table: dict, keys: list) -> None:
    """In place: a filtered copy of a table at its bound would double the peak memory."""
    for key in keys:
        del table[key]


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
