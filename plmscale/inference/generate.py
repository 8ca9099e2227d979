"""Continue a prompt with a decoder: greedy, or sampled with temperature, top-k and top-p (nucleus).

    plmscale generate --model runs/gpt_tiny/model --prompt "Return the absolute" --max-new-tokens 24

The prompt starts a document as in training, where every document follows a [SEP] in the packed stream, and
a generated [SEP] ends it. There is no KV cache: each new token runs the model over the whole sequence (its
last `max_position_embeddings` tokens), which costs O(length^2) per token and is quick for the small models
this is meant for; a long generation slides the window over the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from plmscale.errors import UserError
from plmscale.inference.model import LanguageModel
from plmscale.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID

NEVER_GENERATED = (PAD_ID, CLS_ID, MASK_ID)  # never a causal LM target: the packed stream holds none


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. Greedy takes the most probable; sample draws from the distribution
    scaled by `temperature`, cut to the `top_k` most probable tokens (0: all), then to the smallest set
    whose probability reaches `top_p` (1.0: all); in that order, as in transformers' logits warpers."""

    strategy: Literal["greedy", "sample"] = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.strategy not in ("greedy", "sample"):
            raise UserError(f"strategy {self.strategy!r} is not greedy or sample")
        if self.temperature <= 0:
            raise UserError(f"temperature {self.temperature} must be > 0")
        if self.top_k < 0:
            raise UserError(f"top_k {self.top_k} must be >= 0 (0: no cut)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p {self.top_p} must be in (0, 1]")
        if self.strategy == "greedy" and (self.temperature, self.top_k, self.top_p) != (1.0, 0, 1.0):
            raise UserError("temperature, top_k and top_p shape sampling: use them with strategy sample")


def sampling_probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[batch, vocab] logits -> the distribution `sampling` draws the next token from (zero outside the cuts)."""
    logits = logits.float() / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        outside = torch.ones_like(logits, dtype=torch.bool)
        outside.scatter_(-1, logits.topk(sampling.top_k, dim=-1).indices, False)
        logits = logits.masked_fill(outside, float("-inf"))
    if sampling.top_p < 1.0:
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        # keep a token while the tokens more probable than it hold less than top_p: the smallest set that
        # reaches top_p, and never empty (nothing precedes the most probable token)
        outside_sorted = probs.cumsum(-1) - probs >= sampling.top_p
        outside = torch.empty_like(outside_sorted).scatter_(-1, order, outside_sorted)
        logits = logits.masked_fill(outside, float("-inf"))
    return logits.softmax(-1)


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """[batch, vocab] logits -> [batch] token ids."""
    if sampling.strategy == "greedy":
        return logits.argmax(-1)
    probs = sampling_probabilities(logits, sampling)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class Generation:
    text: str  # the prompt and its continuation
    continuation: str
    token_ids: list[int]  # the generated tokens, without the [SEP] that ended the document
    ended: bool  # the model closed the document ([SEP]) before max_new_tokens


def generate(
    lm: LanguageModel,
    prompt: str,
    max_new_tokens: int = 32,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    num_return_sequences: int = 1,
) -> list[Generation]:
    """Continue `prompt` `num_return_sequences` times (one batch; each row draws its own tokens from one
    generator seeded with `seed`, so a seed gives the same texts on the same device)."""
    if lm.kind != "decoder":
        raise UserError("generate needs a decoder (GPT) model; use fill-mask for an encoder")
    prompt_ids = lm.encode(prompt)
    context = torch.tensor([SEP_ID, *prompt_ids], device=lm.device).repeat(num_return_sequences, 1)
    generator = torch.Generator(lm.device).manual_seed(seed)
    ended = torch.zeros(num_return_sequences, dtype=torch.bool, device=lm.device)
    for _ in range(max_new_tokens):
        window = context[:, -lm.max_positions :]
        last = torch.zeros_like(window, dtype=torch.bool)
        last[:, -1] = True
        logits = lm.logits_at(window, last)
        logits[:, list(NEVER_GENERATED)] = float("-inf")
        token = next_tokens(logits, sampling, generator).masked_fill(ended, PAD_ID)
        ended |= token == SEP_ID
        context = torch.cat([context, token[:, None]], dim=1)
        if ended.all():
            break
    head = lm.decode(prompt_ids)
    results = []
    for row in context[:, 1 + len(prompt_ids) :].tolist():
        closed = SEP_ID in row
        ids = row[: row.index(SEP_ID)] if closed else row
        # Decoded with the prompt, the continuation keeps its first word boundary; decoded alone, its leading
        # "▁" would be dropped as the start of a text and its first word glued to the prompt.
        continuation = lm.decode(prompt_ids + ids)[len(head) :]
        # SentencePiece drops a prompt's trailing spaces; the continuation brings its own.
        text = prompt.rstrip(" ") + continuation if prompt_ids else continuation.lstrip(" ")
        results.append(Generation(text, continuation, ids, closed))
    return results
