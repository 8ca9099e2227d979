"""One masker for every masked-LM scheme; the schemes differ only in the units they mask together.

token  BERT: single tokens.
word   BERT-wwm: whole words (a word-start position and the positions up to the next one); with word starts
       from jieba this is Chinese BERT-wwm (`data_prep.words`).
span   SpanBERT: runs of whole words, lengths ~ Geometric(p) renormalized on 1..span_max (mean 3.8 words
       for p=0.2, max 10), the span boundaries kept for the span-boundary objective.
ngram  ALBERT: spans of n whole words, n <= 3 with p(n) proportional to 1/n (SpanBERT's procedure with
       ALBERT's lengths).
ernie  ERNIE 1.0: the budget split between entity, phrase and basic units (tokens; whole words when word
       starts are given, as ERNIE's English basic level).

Unmaskable positions (specials by default) end words, so no unit contains or crosses one.

Every scheme spends the same budget, min(max_predictions, max(1, round(len * mask_prob))) positions, as
Google's `create_pretraining_data.py` does (the length counts [CLS] and [SEP]). Chosen positions become
[MASK] / a random ordinary token / stay as they are, 80/10/10: per token for token and word units (as
Google's code draws it), per unit for span and ernie (SpanBERT and ERNIE replace a unit consistently).
The offline instance builder and the training-time objective (`plmscale.objectives.mlm`) both call this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from plmscale.tokenizer import MASK_ID, WORD_START, Tokenizer

FIRST_ORDINARY_ID = MASK_ID + 1  # specials are never masked nor drawn as random replacements
ERNIE_LEVELS = ("token", "phrase", "entity")


class MaskingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    unit: Literal["token", "word", "span", "ernie"] = "token"
    mask_prob: float = Field(0.15, gt=0, lt=1, description="share of the sequence's positions predicted")
    replace_mask: float = Field(0.8, ge=0, le=1, description="of chosen positions, share set to [MASK]")
    replace_random: float = Field(0.1, ge=0, le=1, description="share set to a random ordinary token")
    max_predictions: int | None = Field(None, gt=0, description="Google's max_predictions_per_seq")
    span_p: float = Field(0.2, gt=0, le=1, description="SpanBERT: geometric parameter of span lengths")
    span_max: int = Field(10, ge=1, description="SpanBERT: longest span, in words")
    span_lengths: Literal["geometric", "inverse"] = Field(
        "geometric",
        description="span lengths ~ Geometric(span_p) (SpanBERT), or p(n) ~ 1/n (ALBERT's n-grams)",
    )
    ernie_mix: dict[str, float] = Field(
        default_factory=lambda: {"token": 0.5, "phrase": 0.25, "entity": 0.25},
        description="ERNIE: share of the budget per level; what a level cannot fill goes to tokens",
    )

    @model_validator(mode="after")
    def _shares(self) -> MaskingConfig:
        if self.replace_mask + self.replace_random > 1:
            raise ValueError("replace_mask + replace_random must not exceed 1")
        if not set(self.ernie_mix) <= set(ERNIE_LEVELS) or min(self.ernie_mix.values(), default=0) < 0:
            raise ValueError(f"ernie_mix takes non-negative shares of {ERNIE_LEVELS}")
        if abs(sum(self.ernie_mix.values()) - 1) > 1e-6:
            raise ValueError("ernie_mix shares must sum to 1")
        return self


PRESETS: dict[str, MaskingConfig] = {
    "mlm": MaskingConfig(),
    "wwm": MaskingConfig(unit="word"),  # word starts from SentencePiece's U+2581 marker
    "wwm_zh": MaskingConfig(unit="word"),  # word starts from jieba (data_prep.words.chinese_word_starts)
    "span": MaskingConfig(unit="span"),
    "ngram": MaskingConfig(unit="span", span_lengths="inverse", span_max=3),
    "ernie": MaskingConfig(unit="ernie"),
}


@dataclass(frozen=True)
class Masked:
    input_ids: np.ndarray  # int64, the tokens with masking applied
    positions: np.ndarray  # int64, sorted masked positions
    labels: np.ndarray  # int64, the original token at each position
    spans: np.ndarray  # int64 [n, 2], [start, end) of each masked unit; SBO boundaries are start-1 and end


@dataclass(frozen=True)
class MaskedBatch(Masked):
    """Many sequences masked at once, back to back: positions and spans are within their own sequence,
    `position_counts[i]` and `span_counts[i]` say how many of each belong to sequence i."""

    position_counts: np.ndarray
    span_counts: np.ndarray
    # ernie: each span's level, an index into ERNIE_LEVELS, so held-out scoring can tell entity and
    # phrase units from basic ones; None for the other units
    span_levels: np.ndarray | None = None


def word_start_table(tokenizer: Tokenizer) -> np.ndarray:
    """Per vocabulary id: does the piece begin a word (SentencePiece's U+2581 marker)? Specials stand alone."""
    table = np.array([tokenizer.id_to_piece(i).startswith(WORD_START) for i in range(tokenizer.vocab_size)])
    table[:FIRST_ORDINARY_ID] = True
    return table


def word_units(maskable: np.ndarray, word_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of each whole word made only of maskable positions; unmaskable positions end words."""
    first = word_starts | ~maskable
    first[1:] |= ~maskable[:-1]
    if len(first):
        first[0] = True
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], len(maskable))
    keep = maskable[starts]  # a unit is one unmaskable position or only maskable ones
    return starts[keep], ends[keep]


def fill(lengths: np.ndarray, budget, groups: np.ndarray | None = None) -> np.ndarray:
    """Which units Google's greedy takes walking them in order: each one that still fits the budget.

    `groups` (non-decreasing, default all 0) splits the units into sequences, group g with its own
    `budget[g]`. Vectorized: every round takes, per group, the longest prefix of still-fitting units and
    skips the first one that overshoots, so it runs as many rounds as a group overshoots (usually one or
    two), however many sequences the batch holds.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    groups = np.zeros(n, dtype=np.int64) if groups is None else groups
    left = np.array(budget, dtype=np.int64, ndmin=1)
    group_start, group_size = _group_bounds(groups, len(left))
    group_first, group_end = group_start[groups], group_start + group_size
    index = np.arange(n)
    taken, active = np.zeros(n, dtype=bool), np.ones(n, dtype=bool)
    while True:
        room = left[groups]
        candidate = active & (lengths <= room) & (room > 0)
        if not candidate.any():
            return taken
        size = np.where(candidate, lengths, 0)
        total = np.cumsum(size)
        fits = candidate & (total - total[group_first] + size[group_first] <= room)  # sums within a group
        taken |= fits
        left -= np.bincount(groups[fits], lengths[fits], minlength=len(left)).astype(np.int64)
        over = np.flatnonzero(candidate & ~fits)
        resume = group_end.copy()  # a group that did not overshoot is done ...
        first_over, seen = np.unique(groups[over], return_index=True)
        resume[first_over] = over[seen] + 1  # ... one that did goes on after its first overshoot
        active &= index >= resume[groups]


def _as_spans(candidates: list[tuple[int, int]] | None) -> np.ndarray:
    """Candidate units sorted by start; one that overlaps an earlier one is dropped."""
    spans = np.asarray(candidates if candidates else np.zeros((0, 2)), dtype=np.int64).reshape(-1, 2)
    spans = spans[np.lexsort((-spans[:, 1], spans[:, 0]))]
    keep, end = [], -1
    for i, (start, stop) in enumerate(spans.tolist()):
        if start >= end and stop > start:
            keep.append(i)
            end = stop
    return spans[keep]


def _group_bounds(groups: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Index of each group's first item and its item count, for items sorted by group."""
    size = np.bincount(groups, minlength=n_groups)
    return np.cumsum(size) - size, size


def _shuffle_within(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An order of the items that keeps the (sorted) groups in place and shuffles each one: one radix
    argsort of (group, 32 random bits) packed in an int64, 10x faster than a lexsort of the two."""
    key = (groups.astype(np.int64) << 32) | rng.integers(0, 1 << 32, len(groups), dtype=np.int64)
    return np.argsort(key, kind="stable")


class Masker:
    """Masks a batch of sequences in one vectorized pass (or one sequence); all randomness comes from the
    generator passed in, so a batch's masks depend on the seed and the batch only."""

    def __init__(self, config: MaskingConfig, vocab_size: int):
        self.config, self.vocab_size = config, vocab_size
        lengths = np.arange(1, config.span_max + 1)
        weights = (
            config.span_p * (1 - config.span_p) ** (lengths - 1)
            if config.span_lengths == "geometric"
            else 1 / lengths
        )
        self.span_cdf = np.cumsum(weights / weights.sum())

    def budget(self, length):
        """Positions to predict in a sequence of `length` (an int, or an array of lengths)."""
        count = np.maximum(1, np.round(np.asarray(length) * self.config.mask_prob).astype(np.int64))
        if self.config.max_predictions:
            count = np.minimum(count, self.config.max_predictions)
        return count if count.ndim else int(count)

    def mask(
        self,
        tokens: np.ndarray,
        rng: np.random.Generator,
        *,
        maskable: np.ndarray | None = None,
        word_starts: np.ndarray | None = None,
        phrases: list[tuple[int, int]] | None = None,
        entities: list[tuple[int, int]] | None = None,
    ) -> Masked:
        """Mask one sequence: `mask_batch` with a batch of one."""
        batch = self.mask_batch(
            tokens, [len(tokens)], rng, maskable=maskable, word_starts=word_starts, phrases=phrases,
            entities=entities,
        )  # fmt: skip
        return Masked(batch.input_ids, batch.positions, batch.labels, batch.spans)

    def mask_batch(
        self,
        tokens: np.ndarray,
        lengths,
        rng: np.random.Generator,
        *,
        maskable: np.ndarray | None = None,
        word_starts: np.ndarray | None = None,
        phrases: list[tuple[int, int]] | None = None,
        entities: list[tuple[int, int]] | None = None,
    ) -> MaskedBatch:
        """Mask sequences of `lengths` given back to back in `tokens`, each with its own budget.

        `maskable` defaults to every non-special token. `word_starts` is needed by the word and span units;
        ernie uses it, when given, to make its basic units whole words (ERNIE's English), and takes the
        [start, end) of phrases and entities in `tokens` (one crossing two sequences is ignored).
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        maskable = tokens >= FIRST_ORDINARY_ID if maskable is None else np.asarray(maskable, dtype=bool)
        unit, budgets = self.config.unit, self.budget(lengths)
        if unit in ("word", "span") and word_starts is None:
            raise ValueError(f"unit={unit!r} needs word_starts")
        if word_starts is not None:
            word_starts = np.array(word_starts, dtype=bool)
            word_starts[offsets[:-1][lengths > 0]] = True  # no word crosses into the next sequence
        sequence = np.repeat(np.arange(len(lengths)), lengths)
        if unit == "token":
            spans = self._tokens(maskable, sequence, budgets, rng)
        elif unit == "word":
            spans = self._words(maskable, word_starts, sequence, budgets, rng)
        elif unit == "span":
            spans = self._spans(maskable, word_starts, sequence, budgets, rng)
        else:
            spans = self._ernie_batch(maskable, word_starts, offsets, budgets, rng, phrases, entities)
            spans, levels = spans[:, :2], spans[:, 2]
            masked = self._replace(tokens, spans, offsets, sequence, per_unit=True, rng=rng)
            return dataclasses.replace(masked, span_levels=levels)
        return self._replace(tokens, spans, offsets, sequence, per_unit=unit == "span", rng=rng)

    @staticmethod
    def _tokens(maskable, sequence, budgets, rng: np.random.Generator) -> np.ndarray:
        """`budget` positions per sequence, uniformly among its maskable ones."""
        candidates = np.flatnonzero(maskable)
        groups = sequence[candidates]
        order = _shuffle_within(groups, rng)
        rank = np.arange(len(order)) - _group_bounds(groups, len(budgets))[0][groups]
        chosen = np.sort(candidates[order][rank < budgets[groups]])
        return np.stack([chosen, chosen + 1], axis=1)

    @staticmethod
    def _words(maskable, word_starts, sequence, budgets, rng: np.random.Generator) -> np.ndarray:
        """Google's whole-word masking: walk each sequence's words in random order, take what fits."""
        starts, ends = word_units(maskable, word_starts)
        groups = sequence[starts]
        order = _shuffle_within(groups, rng)
        chosen = np.sort(order[fill((ends - starts)[order], budgets, groups)])
        return np.stack([starts[chosen], ends[chosen]], axis=1)

    def _spans(self, maskable, word_starts, sequence, budgets, rng: np.random.Generator) -> np.ndarray:
        """SpanBERT, each round one span per sequence still under budget: draw a length in words, then a
        start uniformly among the words where that many free words follow without crossing an unmaskable
        position (the length shrinks to the longest free run); the last span stops at the budget."""
        starts, ends = word_units(maskable, word_starts)
        n, n_seq = len(starts), len(budgets)
        groups = sequence[starts]
        joined = np.zeros(n, dtype=bool)  # word i continues the run of word i-1
        joined[1:] = (starts[1:] == ends[:-1]) & (groups[1:] == groups[:-1])
        word_start, word_count = _group_bounds(groups, n_seq)
        has_words = word_count > 0
        taken = np.zeros(n, dtype=bool)
        masked = np.zeros(n_seq, dtype=np.int64)
        found, held = [], n_seq  # sequences whose words the arrays still hold
        while True:
            free = self._free_words(joined, taken)
            longest = np.zeros(n_seq, dtype=np.int64)
            if len(free):
                longest[has_words] = np.maximum.reduceat(free, word_start[has_words])
            live = np.flatnonzero((masked < budgets) & (longest > 0))
            if not len(live):
                break
            if len(live) < held // 2:  # most sequences are done: drop their words, so rounds get cheaper
                keep = np.zeros(n_seq, dtype=bool)
                keep[live] = True
                words = keep[groups]
                starts, ends, groups, joined, taken, free = (
                    array[words] for array in (starts, ends, groups, joined, taken, free)
                )
                word_start, word_count = _group_bounds(groups, n_seq)
                has_words, held = word_count > 0, len(live)
            draw = np.searchsorted(self.span_cdf, rng.random(len(live)), side="right") + 1
            want = np.zeros(n_seq, dtype=np.int64)
            want[live] = np.minimum(np.minimum(draw, len(self.span_cdf)), longest[live])
            valid = np.flatnonzero((free >= want[groups]) & (want[groups] > 0))
            counts = np.bincount(groups[valid], minlength=n_seq)
            first_valid = np.cumsum(counts) - counts
            word = valid[first_valid[live] + (rng.random(len(live)) * counts[live]).astype(np.int64)]
            length = want[live]
            start = starts[word]
            end = np.minimum(ends[word + length - 1], start + budgets[live] - masked[live])
            found.append(np.stack([start, end], axis=1))
            masked[live] += end - start
            taken[np.repeat(word - np.cumsum(length) + length, length) + np.arange(length.sum())] = True
        spans = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
        return spans[np.argsort(spans[:, 0])]

    @staticmethod
    def _free_words(joined: np.ndarray, taken: np.ndarray) -> np.ndarray:
        """Per word: how many untaken words follow contiguously from it, itself included (0 if taken)."""
        n = len(taken)
        open_ = ~taken
        run_start = open_.copy()
        run_start[1:] &= ~(joined[1:] & open_[:-1])
        run_end = open_.copy()
        run_end[:-1] &= ~(joined[1:] & open_[1:])
        last = np.flatnonzero(run_end)
        run = np.cumsum(run_start) - 1
        free = np.zeros(n, dtype=np.int64)
        index = np.flatnonzero(open_)
        free[index] = last[run[index]] - index + 1
        return free

    def _ernie_batch(self, maskable, word_starts, offsets, budgets, rng, phrases, entities) -> np.ndarray:
        """ERNIE's units are chosen sequence by sequence, each from the phrases and entities inside it;
        rows [start, end, level] (level: index into ERNIE_LEVELS)."""
        phrases, entities = _as_spans(phrases), _as_spans(entities)
        chosen = [np.zeros((0, 3), dtype=np.int64)]
        for i, budget in enumerate(budgets.tolist()):
            a, b = int(offsets[i]), int(offsets[i + 1])
            inside = [units[(units[:, 0] >= a) & (units[:, 1] <= b)] - a for units in (phrases, entities)]
            starts = None if word_starts is None else word_starts[a:b]
            chosen.append(self._ernie(maskable[a:b], starts, budget, rng, *inside) + [a, a, 0])
        return np.concatenate(chosen)

    def _ernie(self, maskable, word_starts, budget, rng, phrases, entities) -> np.ndarray:
        """Entity, then phrase units, each up to its share of the budget; basic units take the rest."""
        chosen, levels, taken = [], [], np.zeros(len(maskable), dtype=bool)
        for level, candidates in (("entity", entities), ("phrase", phrases)):
            blocked = np.concatenate([[0], np.cumsum(taken | ~maskable)])  # free inside: no count change
            candidates = candidates[blocked[candidates[:, 1]] == blocked[candidates[:, 0]]]
            order = rng.permutation(len(candidates))
            quota = int(round(budget * self.config.ernie_mix.get(level, 0.0)))
            units = candidates[order[fill(np.diff(candidates[order], axis=1)[:, 0], quota)]]
            for start, end in units.tolist():
                taken[start:end] = True
            chosen.append(units)
            levels.append(np.full(len(units), ERNIE_LEVELS.index(level)))
        free = maskable & ~taken
        basic = word_starts if word_starts is not None else np.ones(len(free), dtype=bool)
        starts, ends = word_units(free, basic)
        order = rng.permutation(len(starts))
        pick = order[fill((ends - starts)[order], budget - int(taken.sum()))]
        chosen.append(np.stack([starts[pick], ends[pick]], axis=1))
        levels.append(np.full(len(pick), ERNIE_LEVELS.index("token")))
        spans = np.concatenate([np.concatenate(chosen), np.concatenate(levels)[:, None]], axis=1)
        return spans[np.argsort(spans[:, 0])]

    def _replace(self, tokens, spans, offsets, sequence, *, per_unit: bool, rng) -> MaskedBatch:
        """80/10/10 over the chosen units' positions; positions and spans made sequence-relative."""
        lengths = spans[:, 1] - spans[:, 0]
        total = int(lengths.sum())
        positions = np.ascontiguousarray(spans[:, 0])
        if total > len(spans):  # expand the multi-token units
            positions = np.repeat(positions - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
        draws = np.repeat(rng.random(len(spans)), lengths) if per_unit else rng.random(total)
        cfg = self.config
        to_mask = positions[draws < cfg.replace_mask]
        to_random = positions[(draws >= cfg.replace_mask) & (draws < cfg.replace_mask + cfg.replace_random)]
        input_ids = tokens.copy()
        input_ids[to_mask] = MASK_ID
        input_ids[to_random] = rng.integers(FIRST_ORDINARY_ID, self.vocab_size, len(to_random))
        n_seq = len(offsets) - 1
        position_seq, span_seq = sequence[positions], sequence[spans[:, 0]]
        return MaskedBatch(
            input_ids=input_ids,
            positions=positions - offsets[position_seq],
            labels=tokens[positions],
            spans=spans - offsets[span_seq][:, None],
            position_counts=np.bincount(position_seq, minlength=n_seq),
            span_counts=np.bincount(span_seq, minlength=n_seq),
        )
