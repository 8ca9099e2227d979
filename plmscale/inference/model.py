"""One interface over a plmscale model directory and its Hugging Face export: token ids in, logits out, and
the tokenizer the model was trained with. Generation and fill-mask run the same code on either, so the
export can be checked to continue and fill exactly as the model it came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from plmscale.errors import UserError
from plmscale.model import Electra, TransformerLM
from plmscale.model.electra import GeneratorMaskedLM
from plmscale.tokenizer import MASK_ID, WORD_START, Tokenizer

# Logits over the real vocabulary (never the padding rows of a padded embedding) at the positions selected by
# a [batch, seq] boolean mask: [selected positions, vocabulary].
LogitsAt = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LanguageModel:
    kind: Literal["encoder", "decoder"]
    logits_at: LogitsAt
    encode: Callable[[str], list[int]]  # no special tokens added; a literal "[MASK]" is the mask token
    decode: Callable[[list[int]], str]
    max_positions: int
    device: torch.device

    @classmethod
    def from_plmscale(
        cls,
        model: TransformerLM | GeneratorMaskedLM,
        tokenizer: Tokenizer,
        device: str | torch.device = "cpu",
    ) -> LanguageModel:
        """A `TransformerLM` and the SentencePiece tokenizer it was trained with."""
        model = model.to(device).eval()
        vocab = tokenizer.vocab_size

        @torch.no_grad()
        def logits_at(input_ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
            # the head runs only where asked: the vocabulary projection is a small model's costliest matmul
            positions = where.flatten().nonzero().squeeze(1)
            return model(input_ids, target_positions=positions)[:, :vocab].float()

        return cls(
            kind=model.cfg.kind,
            logits_at=logits_at,
            encode=lambda text: encode_masked(tokenizer, text),
            decode=tokenizer.decode,
            max_positions=model.cfg.max_position_embeddings,
            device=torch.device(device),
        )

    @classmethod
    def from_hf(cls, model, tokenizer, device: str | torch.device = "cpu") -> LanguageModel:
        """A `transformers` causal or masked LM and its tokenizer (an export of `plmscale export`)."""
        model = model.to(device).eval()
        vocab = len(tokenizer)

        @torch.no_grad()
        def logits_at(input_ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
            return model(input_ids=input_ids).logits[where][:, :vocab].float()

        return cls(
            kind="decoder" if _causal(type(model).__name__) else "encoder",
            logits_at=logits_at,
            encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
            decode=tokenizer.decode,
            max_positions=model.config.max_position_embeddings,
            device=torch.device(device),
        )


def _causal(architecture: str) -> bool:
    return architecture.endswith(("LMHeadModel", "ForCausalLM"))


def encode_masked(tokenizer: Tokenizer, text: str) -> list[int]:
    """SentencePiece's ids, without the lone "▁" it keeps before a literal [MASK]: in training a masked
    token carried its own word boundary ("the [MASK]." -> ▁the [MASK] .), as the export's tokenizer does."""
    ids = tokenizer.encode([text])[0]
    word_start = tokenizer.sp.piece_to_id(WORD_START)
    return [i for k, i in enumerate(ids) if not (i == word_start and ids[k + 1 : k + 2] == [MASK_ID])]


def load_language_model(directory: str | Path, device: str = "cpu") -> LanguageModel:
    """A plmscale model directory (config.yaml, model.safetensors, tokenizer.model) or a Hugging Face export
    (config.json, model.safetensors, tokenizer.json), read offline."""
    directory = Path(directory)
    if (directory / "config.yaml").is_file():
        from plmscale.model_dir import TOKENIZER, load_local_model

        if not (directory / TOKENIZER).is_file():
            raise UserError(
                f"{directory}: no {TOKENIZER}; generation and fill-mask need the model's tokenizer"
            )
        model, _ = load_local_model(directory)
        if isinstance(model, Electra):  # the generator is ELECTRA's masked LM
            model = GeneratorMaskedLM(model)
        return LanguageModel.from_plmscale(model, Tokenizer(directory / TOKENIZER), device)
    if (directory / "config.json").is_file():
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

        architecture = (AutoConfig.from_pretrained(directory, local_files_only=True).architectures or [""])[0]
        auto = AutoModelForCausalLM if _causal(architecture) else AutoModelForMaskedLM
        model = auto.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        return LanguageModel.from_hf(model, tokenizer, device)
    raise UserError(
        f"{directory}: neither a plmscale model directory (config.yaml) nor a Hugging Face export (config.json)"
    )
