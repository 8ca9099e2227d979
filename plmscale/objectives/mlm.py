"""Masked language modelling with dynamic masking (BERT's 80/10/10 recipe, RoBERTa's fresh masks).

Masks are drawn when a sample is built, from a generator seeded by the sample's position in the global
order: every epoch sees new masks, and a resumed run sees exactly the masks it would have seen. The masks
come from `plmscale.data.masking`, the masker the offline instance builder uses too; whole-word, span and
n-gram units (ALBERT's: n whole words) take word starts from the tokenizer's U+2581 marker. Chinese words
(jieba) and ERNIE's phrases and entities need corpus-level preparation: build those instances offline
(`plmscale prep instances`).
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from plmscale.data.masking import PRESETS, Masked, Masker, MaskingConfig, word_start_table
from plmscale.objectives import register
from plmscale.objectives.base import IGNORE_INDEX, Objective
from plmscale.tokenizer import CLS_ID, SEP_ID, Tokenizer


class MLMParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mask_prob: float = Field(0.15, gt=0, lt=1)
    replace_mask: float = Field(0.8, ge=0, le=1, description="of chosen tokens, share replaced by [MASK]")
    replace_random: float = Field(0.1, ge=0, le=1, description="share replaced by a random token")
    unit: Literal["token", "word", "span", "ngram"] = Field(
        "token", description="BERT, whole-word, SpanBERT or ALBERT's n-gram masking"
    )
    tokenizer: str | None = Field(None, description="SentencePiece model giving word starts (unit word/span)")

    @model_validator(mode="after")
    def _shares(self) -> MLMParams:
        if self.replace_mask + self.replace_random > 1:
            raise ValueError("replace_mask + replace_random must not exceed 1")
        if self.unit != "token" and self.tokenizer is None:
            raise ValueError(
                f"unit={self.unit!r} needs `tokenizer` (the shards' tokenizer.model) for word starts"
            )
        return self


@register
class MaskedLM(Objective):
    name = "mlm"
    model_kinds = {"encoder"}
    Params = MLMParams
    instance_fields = frozenset({"tokens", "mask_positions", "mask_labels"})

    def __init__(self, params: MLMParams, model_cfg):
        super().__init__(params, model_cfg)
        if model_cfg.generator_hidden_fraction is not None and self.name != "electra":
            raise ValueError(
                "model.generator_hidden_fraction builds ELECTRA's discriminator and generator, which "
                f"objective {self.name!r} does not train: use objective electra"
            )
        preset = PRESETS[{"token": "mlm", "word": "wwm"}.get(params.unit, params.unit)]
        masking = MaskingConfig.model_validate(
            preset.model_dump() | params.model_dump(include={"mask_prob", "replace_mask", "replace_random"})
        )
        self.masker = Masker(masking, model_cfg.vocab_size)

    @cached_property
    def word_start(self) -> np.ndarray | None:
        """Per vocabulary id, does its piece start a word (units word and span). Read when masking first, so
        that a recipe validates without its files; `plmscale.preflight` checks the tokenizer before launch."""
        return None if self.params.unit == "token" else word_start_table(Tokenizer(self.params.tokenizer))

    def window_length(self, seq_length: int) -> int:
        return seq_length - 2  # room for [CLS] and [SEP]

    def make_example(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.masked_example(tokens, rng)[0]

    def masked_example(
        self, tokens: np.ndarray, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], Masked]:
        """`make_example` and the masker's output it came from (the masked units, for SpanBERT)."""
        input_ids = np.concatenate([[CLS_ID], tokens, [SEP_ID]]).astype(np.int64)
        word_starts = None if self.word_start is None else self.word_start[input_ids]
        masked = self.masker.mask(input_ids, rng, word_starts=word_starts)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        labels[masked.positions] = masked.labels
        return {"input_ids": masked.input_ids, "labels": labels}, masked
