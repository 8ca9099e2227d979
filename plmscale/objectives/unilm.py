"""UniLM (Dong et al. 2019): one encoder, masked tokens predicted under four attention masks mixed in a batch.

Each sample has a mode: left to right and right to left ([CLS] A [SEP]) see only the tokens on their side;
bidirectional ([CLS] A [SEP] B [SEP]) sees everything; seq2seq sees the whole source [CLS] A [SEP] from
every position, the target B [SEP] up to itself, and masks only the target. A sample carries its mode as an
`attention_pattern` (direction, prefix) of two integers, from which the model builds the sample's one
[seq, seq] mask on the device (`plmscale.model.transformer.patterned_attention`).

Samples come from `unilm` instances (`plmscale prep instances --objective unilm`, which chose their modes
and masks), or are drawn on the fly from a token window (training without instances, the held-out split,
`plmscale eval`): a mode with this objective's shares, a random cut between A and B, BERT's 80/10/10
masking. The loss is the masked tokens' mean, as in the paper; evaluation reports it per mode too
(`loss/left_to_right`, ...), each mode's targets a slice of the masked tokens (`breakdown_terms`).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from plmscale.data.masking import FIRST_ORDINARY_ID, Masker, MaskingConfig
from plmscale.objectives import register
from plmscale.objectives.base import IGNORE_INDEX, LossTerm, Objective
from plmscale.tokenizer import CLS_ID, PAD_ID, SEP_ID

# The modes' numbers in `unilm` instances (data_prep.instances.unilm) and in batches.
MODES = ("left_to_right", "right_to_left", "bidirectional", "seq2seq")
LEFT_TO_RIGHT, RIGHT_TO_LEFT, BIDIRECTIONAL, SEQ2SEQ = range(4)
# Each mode's attention direction (see `patterned_attention`); seq2seq adds the source as a prefix.
DIRECTIONS = (1, -1, 0, 1)


def attention_pattern(mode: int, source_length: int) -> np.ndarray:
    """(direction, prefix) of a sample of `mode` whose source ([CLS] A [SEP]) has `source_length` tokens."""
    return np.array([DIRECTIONS[mode], source_length if mode == SEQ2SEQ else 0], dtype=np.int64)


class UniLMParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    left_to_right: float = Field(1 / 6, ge=0, description="share of on-the-fly samples in this mode")
    right_to_left: float = Field(1 / 6, ge=0)
    bidirectional: float = Field(1 / 3, ge=0)
    seq2seq: float = Field(1 / 3, ge=0)
    mask_prob: float = Field(0.15, gt=0, lt=1)
    replace_mask: float = Field(0.8, ge=0, le=1, description="of chosen tokens, share replaced by [MASK]")
    replace_random: float = Field(0.1, ge=0, le=1, description="share replaced by a random token")

    @model_validator(mode="after")
    def _shares(self) -> UniLMParams:
        total = sum(getattr(self, mode) for mode in MODES)
        if abs(total - 1) > 1e-6:
            raise ValueError(f"the mode shares {' + '.join(MODES)} must sum to 1, not {total:g}")
        if self.replace_mask + self.replace_random > 1:
            raise ValueError("replace_mask + replace_random must not exceed 1")
        return self


@register
class UniLM(Objective):
    name = "unilm"
    model_kinds = {"encoder"}
    Params = UniLMParams
    instance_fields = frozenset({"tokens", "segments", "mode", "mask_positions", "mask_labels"})
    breakdown_terms = MODES

    def __init__(self, params: UniLMParams, model_cfg):
        super().__init__(params, model_cfg)
        if model_cfg.generator_hidden_fraction is not None:
            raise ValueError(
                f"model.generator_hidden_fraction builds ELECTRA's generator, which objective {self.name!r} "
                "does not train"
            )
        if model_cfg.type_vocab_size < 2:
            raise ValueError(f"objective {self.name!r} needs model.type_vocab_size >= 2 for segments A and B")
        masking = MaskingConfig.model_validate(
            params.model_dump(include={"mask_prob", "replace_mask", "replace_random"})
        )
        self.masker = Masker(masking, model_cfg.vocab_size)
        shares = np.array([getattr(params, mode) for mode in MODES])
        self.shares = shares / shares.sum()  # numpy's choice wants a sum of 1 to ~1e-8, a recipe gives ~1e-7

    def window_length(self, seq_length: int) -> int:
        return seq_length - 3  # room for [CLS] A [SEP] B [SEP]

    def make_example(self, tokens: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        mode = int(rng.choice(len(MODES), p=self.shares))
        if mode in (LEFT_TO_RIGHT, RIGHT_TO_LEFT):  # one segment, and a padding position at the end
            input_ids = np.concatenate([[CLS_ID], tokens, [SEP_ID, PAD_ID]]).astype(np.int64)
            segments, source_length = np.zeros_like(input_ids), 0
        else:
            cut = int(rng.integers(1, len(tokens)))
            input_ids = np.concatenate([[CLS_ID], tokens[:cut], [SEP_ID], tokens[cut:], [SEP_ID]]).astype(
                np.int64
            )
            source_length = cut + 2
            segments = (np.arange(len(input_ids)) >= source_length).astype(np.int64)
        maskable = input_ids >= FIRST_ORDINARY_ID
        if mode == SEQ2SEQ:
            maskable &= segments == 1  # the paper masks the target only
        masked = self.masker.mask(input_ids, rng, maskable=maskable)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        labels[masked.positions] = masked.labels
        return {
            "input_ids": masked.input_ids,
            "attention_mask": (input_ids != PAD_ID).astype(np.int64),
            "token_type_ids": segments,
            "labels": labels,
            "attention_pattern": attention_pattern(mode, source_length),
            "mode": np.int64(mode),
        }

    def instance_sample(self, sample: dict[str, np.ndarray], instance: dict[str, np.ndarray]) -> dict:
        mode = int(instance["mode"][0])
        source_length = int((instance["segments"] == 0).sum())
        return sample | {"attention_pattern": attention_pattern(mode, source_length), "mode": np.int64(mode)}

    def target_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"mlm": self.target_count(batch)}

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return Objective.model_inputs(batch) | {"attention_pattern": batch["attention_pattern"]}

    def loss_terms(
        self, outputs, batch: dict[str, torch.Tensor], spec, count_correct: bool = False
    ) -> dict[str, LossTerm]:
        """The masked tokens' loss; when evaluating (`count_correct`), each mode's slice of it too."""
        if not count_correct:
            return {"mlm": self.token_term(outputs, batch, spec, count_correct)}
        labels = batch["labels"]
        targets = self.targets(batch, outputs)
        losses = spec.cross_entropy(outputs, targets)
        hits = spec.gather_logits(outputs).argmax(-1) == targets
        target_modes = batch["mode"][:, None].expand_as(labels)[labels != IGNORE_INDEX]
        terms = {"mlm": LossTerm(losses.sum(), targets.numel(), int(hits.sum()))}
        for index, name in enumerate(MODES):
            chosen = target_modes == index
            terms[name] = LossTerm(losses[chosen].sum(), int(chosen.sum()), int(hits[chosen].sum()))
        return terms
