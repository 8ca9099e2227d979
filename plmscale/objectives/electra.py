"""ELECTRA: replaced-token detection, trained beside the small generator that makes the replacements.

Masks are drawn as for `mlm` (ELECTRA's recipe: 15 % of the tokens, 85 % of them [MASK], the rest kept);
the generator (`plmscale.model.electra`) predicts the masked tokens and its samples replace them; the
discriminator then classifies every real (non-padding) position as original or replaced. A sampled token
that equals the original counts as original, as in the paper. The loss is ELECTRA's
generator MLM + `rtd_weight` (50) x replaced-token-detection BCE: two terms, the MLM loss summed over masked
tokens and the weighted BCE over real positions, each divided by its own global count by the trainer.

Each example carries a seed drawn from its own generator (seeded by the run seed and its position in the
global order): the generator's samples are a function of the data order, the same on every
tensor-parallel rank and again after a resume.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from plmscale.objectives import register
from plmscale.objectives.base import IGNORE_INDEX, LossTerm, target_positions
from plmscale.objectives.mlm import MaskedLM, MLMParams


class ElectraParams(MLMParams):
    replace_mask: float = Field(0.85, ge=0, le=1, description="of chosen tokens, share replaced by [MASK]")
    replace_random: float = Field(0.0, ge=0, le=1, description="share replaced by a random token")
    rtd_weight: float = Field(
        50.0, gt=0, description="weight of the discriminator's loss (the paper's lambda)"
    )


def real_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


def replaced_labels(batch: dict[str, torch.Tensor], corrupted: torch.Tensor) -> torch.Tensor:
    """1 where the discriminator's input differs from the original token, 0 where it equals it."""
    labels = batch["labels"]
    original = torch.where(labels != IGNORE_INDEX, labels, batch["input_ids"])
    return (corrupted != original).long()


@register
class ReplacedTokenDetection(MaskedLM):
    name = "electra"
    Params = ElectraParams
    instance_fields = frozenset()  # dynamic masking only: the samples change with the generator anyway

    def __init__(self, params: ElectraParams, model_cfg):
        super().__init__(params, model_cfg)
        if model_cfg.generator_hidden_fraction is None:
            raise ValueError(
                f"objective {self.name!r} trains a generator beside the discriminator: set "
                "model.generator_hidden_fraction (its width as a fraction of the discriminator's, 1/4 to 1/3 "
                "in the paper)"
            )

    def make_example(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        example = super().make_example(tokens, rng)
        return example | {"sample_seed": rng.integers(2**62, dtype=np.int64)}

    def target_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"mlm": self.target_count(batch), "rtd": int(real_positions(batch).sum())}

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict:
        """The micro-batch's samples are drawn from its first example's seed; the generator runs at the
        masked positions only, so `target_positions` are always passed."""
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return inputs | {
            "target_positions": target_positions(batch),
            "sample_seed": int(batch["sample_seed"].reshape(-1)[0]),
        }

    def loss_terms(
        self, outputs, batch: dict[str, torch.Tensor], spec, count_correct: bool = False
    ) -> dict[str, LossTerm]:
        generator_logits, rtd_logits, corrupted = outputs
        real = real_positions(batch)
        replaced = replaced_labels(batch, corrupted)[real]
        logits = rtd_logits[real].float()
        bce = F.binary_cross_entropy_with_logits(logits, replaced.float(), reduction="sum")
        hits = int(((logits > 0).long() == replaced).sum()) if count_correct else None
        return {
            "mlm": self.token_term(generator_logits, batch, spec, count_correct),
            "rtd": LossTerm(self.params.rtd_weight * bce, replaced.numel(), hits),
        }
