"""Fill the [MASK]s of a text with an encoder: the most probable tokens at each mask, and the text filled.

    plmscale fill-mask --model runs/demo/teacher/model --text "Return the absolute [MASK] of the argument."

The text is encoded as the encoder's training inputs were, [CLS] text [SEP], each "[MASK]" one masked token
that carries its own word boundary. The masks are predicted in one forward pass, each on its own, as BERT's
MLM head (and transformers' fill-mask pipeline) does; the filled text takes each mask's most probable token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plmscale.errors import UserError
from plmscale.inference.model import LanguageModel
from plmscale.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID

NEVER_PREDICTED = (PAD_ID, CLS_ID, SEP_ID, MASK_ID)  # never an MLM target: not offered as an answer


@dataclass(frozen=True)
class Candidate:
    token_id: int
    token: str  # the token decoded on its own ("value")
    probability: float  # the model's, over the whole vocabulary


@dataclass(frozen=True)
class FilledText:
    candidates: list[list[Candidate]]  # per [MASK], in text order, most probable first
    text: str  # each [MASK] replaced by its most probable token


def fill_mask(lm: LanguageModel, text: str, top_k: int = 5) -> FilledText:
    if lm.kind != "encoder":
        raise UserError("fill-mask needs an encoder (BERT family) model; use generate for a decoder")
    if top_k < 1:
        raise UserError(f"top_k {top_k} must be >= 1")
    ids = lm.encode(text)
    if MASK_ID not in ids:
        raise UserError(f"no [MASK] in the text {text!r}")
    input_ids = torch.tensor([[CLS_ID, *ids, SEP_ID]], device=lm.device)
    if input_ids.shape[1] > lm.max_positions:
        raise UserError(
            f"the text is {input_ids.shape[1]} tokens with [CLS] and [SEP]; the model reads at most "
            f"{lm.max_positions}"
        )
    probs = lm.logits_at(input_ids, input_ids == MASK_ID).softmax(-1)  # [masks, vocabulary]
    offered = probs.clone()
    offered[:, list(NEVER_PREDICTED)] = -1.0
    best = offered.topk(min(top_k, probs.shape[-1] - len(NEVER_PREDICTED)), dim=-1).indices
    candidates = [
        [Candidate(i, lm.decode([i]), probs[mask, i].item()) for i in row]
        for mask, row in enumerate(best.tolist())
    ]
    answers = iter(row[0].token_id for row in candidates)
    filled = [next(answers) if token == MASK_ID else token for token in ids]
    return FilledText(candidates, lm.decode(filled))
