"""One masker for every masked-LM scheme; the schemes differ only in the units they mask together.

token  BERT: single tokens.
word   BERT-wwm: whole words (a word-start position and the positions up to the next one); with word starts
       from jieba this is Chinese BERT-wwm (`data_prep.words`).
span   SpanBERT: runs of whole words, lengths ~ Geometric(p) renormalized on 1..span_max (mean 3.8 words
       for p=0.2, max 10), the span boundaries kept for the span-boundary objective.
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
    "ernie": MaskingConfig(unit="ernie"),
}


@dataclass(frozen=True)
class Masked:
    input_ids: np.ndarray  # int64, the tokens with masking applied
    positions: np.ndarray  # int64, sorted masked positions
    labels: np.ndarray  # int64, the original token at each position
    spans: np.ndarray  # int64 [n, 2], [start, end) of each masked unit; SBO boundaries are start-1 and end


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


def fill(lengths: np.ndarray, budget: int) -> np.ndarray:
    """Which units Google's greedy takes walking them in order: each one that still fits the budget.

    Vectorized: every round takes the longest prefix of still-fitting units, so it runs at most as many
    rounds as the budget has positions left when a unit first overshoots (usually one or two).
    """
    taken = np.zeros(len(lengths), dtype=bool)
    left, first = budget, 0
    while left > 0:
        rest = first + np.flatnonzero(lengths[first:] <= left)
        if not len(rest):
            break
        count = int((np.cumsum(lengths[rest]) <= left).sum())
        taken[rest[:count]] = True
        left -= int(lengths[rest[:count]].sum())
        if count == len(rest):
            break
        first = int(rest[count]) + 1
    return taken


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


class Masker:
    """Masks one sequence per call; all randomness comes from the generator passed in."""

    def __init__(self, config: MaskingConfig, vocab_size: int):
        self.config, self.vocab_size = config, vocab_size
        lengths = np.arange(1, config.span_max + 1)
        weights = config.span_p * (1 - config.span_p) ** (lengths - 1)
        self.span_cdf = np.cumsum(weights / weights.sum())

    def budget(self, length: int) -> int:
        count = max(1, int(round(length * self.config.mask_prob)))
        return min(count, self.config.max_predictions or count)

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
        """Mask `tokens`; `maskable` defaults to every non-special token. `word_starts` is needed by the word
        and span units; ernie uses it, when given, to make its basic units whole words (ERNIE's English)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        maskable = tokens >= FIRST_ORDINARY_ID if maskable is None else np.asarray(maskable, dtype=bool)
        unit, budget = self.config.unit, self.budget(len(tokens))
        if unit in ("word", "span") and word_starts is None:
            raise ValueError(f"unit={unit!r} needs word_starts")
        if word_starts is not None:
            word_starts = np.asarray(word_starts, dtype=bool)
        if unit == "token":
            spans = self._tokens(maskable, budget, rng)
        elif unit == "word":
            spans = self._words(maskable, word_starts, budget, rng)
        elif unit == "span":
            spans = self._spans(maskable, word_starts, budget, rng)
        else:
            spans = self._ernie(maskable, word_starts, budget, rng, _as_spans(phrases), _as_spans(entities))
        return self._replace(tokens, spans, per_unit=unit in ("span", "ernie"), rng=rng)

    @staticmethod
    def _tokens(maskable: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
        candidates = np.flatnonzero(maskable)
        chosen = np.sort(candidates[rng.permutation(len(candidates))[:budget]])
        return np.stack([chosen, chosen + 1], axis=1)

    @staticmethod
    def _words(maskable, word_starts, budget: int, rng: np.random.Generator) -> np.ndarray:
        starts, ends = word_units(maskable, word_starts)
        order = rng.permutation(len(starts))
        chosen = np.sort(order[fill((ends - starts)[order], budget)])
        return np.stack([starts[chosen], ends[chosen]], axis=1)

    def _spans(self, maskable, word_starts, budget: int, rng: np.random.Generator) -> np.ndarray:
        """SpanBERT: draw a length in words, then a start uniformly among the words where that many free
        words follow without crossing an unmaskable position; the last span stops at the budget."""
        starts, ends = word_units(maskable, word_starts)
        n = len(starts)
        run = np.concatenate([[0], np.cumsum(starts[1:] != ends[:-1])])  # contiguous words share a run
        free = np.searchsorted(run, run, side="right") - np.arange(n)  # free words from each word on
        lengths = np.minimum(
            np.searchsorted(self.span_cdf, rng.random(budget), side="right") + 1, len(self.span_cdf)
        )
        picks = rng.random(budget)
        spans, masked = [], 0
        for length, pick in zip(lengths.tolist(), picks.tolist(), strict=True):
            if masked >= budget or n == 0:
                break
            length = min(length, int(free.max()))
            if length == 0:
                break
            valid = np.flatnonzero(free >= length)
            word = int(valid[int(pick * len(valid))])
            start, end = int(starts[word]), int(ends[word + length - 1])
            end = min(end, start + budget - masked)
            spans.append((start, end))
            masked += end - start
            free[word : word + length] = 0
            free[:word] = np.minimum(free[:word], word - np.arange(word))  # runs before now end at `word`
        return np.array(sorted(spans), dtype=np.int64).reshape(-1, 2)

    def _ernie(self, maskable, word_starts, budget, rng, phrases, entities) -> np.ndarray:
        """Entity, then phrase units, each up to its share of the budget; basic units take the rest."""
        chosen, taken = [], np.zeros(len(maskable), dtype=bool)
        for level, candidates in (("entity", entities), ("phrase", phrases)):
            candidates = candidates[(candidates[:, 0] >= 0) & (candidates[:, 1] <= len(taken))]
            blocked = np.concatenate([[0], np.cumsum(taken | ~maskable)])  # free inside: no count change
            candidates = candidates[blocked[candidates[:, 1]] == blocked[candidates[:, 0]]]
            order = rng.permutation(len(candidates))
            quota = int(round(budget * self.config.ernie_mix.get(level, 0.0)))
            units = candidates[order[fill(np.diff(candidates[order], axis=1)[:, 0], quota)]]
            for start, end in units.tolist():
                taken[start:end] = True
            chosen.append(units)
        free = maskable & ~taken
        basic = word_starts if word_starts is not None else np.ones(len(free), dtype=bool)
        starts, ends = word_units(free, basic)
        order = rng.permutation(len(starts))
        pick = order[fill((ends - starts)[order], budget - int(taken.sum()))]
        chosen.append(np.stack([starts[pick], ends[pick]], axis=1))
        spans = np.concatenate(chosen)
        return spans[np.argsort(spans[:, 0])]

    def _replace(self, tokens, spans, *, per_unit: bool, rng: np.random.Generator) -> Masked:
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
        return Masked(input_ids, positions, tokens[positions], spans)
