"""Masked language modelling with dynamic masking (BERT's 80/10/10 recipe, RoBERTa's fresh masks).

Masks are drawn when a sample is built, from a generator seeded by the sample's position in the global
order: every epoch sees new masks, and a resumed run sees exactly the masks it would have seen.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from plmscale.objectives import register
from plmscale.objectives.base import IGNORE_INDEX, Objective
from plmscale.tokenizer import CLS_ID, MASK_ID, SEP_ID

FIRST_ORDINARY_ID = MASK_ID + 1  # random replacements never produce special tokens


class MLMParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mask_prob: float = Field(0.15, gt=0, lt=1)
    replace_mask: float = Field(0.8, ge=0, le=1, description="of chosen tokens, share replaced by [MASK]")
    replace_random: float = Field(0.1, ge=0, le=1, description="share replaced by a random token")

    @model_validator(mode="after")
    def _shares(self) -> MLMParams:
        if self.replace_mask + self.replace_random > 1:
            raise ValueError("replace_mask + replace_random must not exceed 1")
        return self


@register
class MaskedLM(Objective):
    name = "mlm"
    model_kinds = {"encoder"}
    Params = MLMParams

    def window_length(self, seq_length: int) -> int:
        return seq_length - 2  # room for [CLS] and [SEP]

    def make_example(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        p = self.params
        input_ids = np.concatenate([[CLS_ID], tokens, [SEP_ID]]).astype(np.int64)
        candidates = np.flatnonzero(input_ids >= FIRST_ORDINARY_ID)
        count = max(1, int(round(len(input_ids) * p.mask_prob))) if len(candidates) else 0
        chosen = rng.choice(candidates, size=min(count, len(candidates)), replace=False)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        labels[chosen] = input_ids[chosen]
        action = rng.random(len(chosen))
        to_mask = chosen[action < p.replace_mask]
        to_random = chosen[(action >= p.replace_mask) & (action < p.replace_mask + p.replace_random)]
        input_ids[to_mask] = MASK_ID
        input_ids[to_random] = rng.integers(FIRST_ORDINARY_ID, self.model_cfg.vocab_size, len(to_random))
        return {"input_ids": input_ids, "labels": labels}
