"""The SentencePiece tokenizer every stage shares, with the special tokens the objectives need.

Ids are fixed by training (`data_prep.tokenizer`): [PAD]=0, [UNK]=1, [CLS]=2 (bos), [SEP]=3 (eos,
also the document separator of packed streams), [MASK]=4. Fixing them keeps shards, checkpoints and
exports interchangeable between tokenizers of the same vocabulary size.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
# `SentencePieceTrainer.train` arguments that pin those ids.
TRAINER_SPECIAL_ARGS = {
    "pad_id": PAD_ID,
    "pad_piece": SPECIAL_TOKENS["pad"],
    "unk_id": UNK_ID,
    "unk_piece": SPECIAL_TOKENS["unk"],
    "bos_id": CLS_ID,
    "bos_piece": SPECIAL_TOKENS["cls"],
    "eos_id": SEP_ID,
    "eos_piece": SPECIAL_TOKENS["sep"],
    "user_defined_symbols": [SPECIAL_TOKENS["mask"]],
}
WORD_START = "\u2581"  # SentencePiece's word-start marker


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """A loaded SentencePiece model; checks that its special ids are the ones plmscale relies on."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        expected = [PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID]
        found = [self.sp.piece_to_id(SPECIAL_TOKENS[k]) for k in ("pad", "unk", "cls", "sep", "mask")]
        if found != expected:
            raise ValueError(
                f"{self.path}: special token ids {found} differ from plmscale's {expected}; "
                "train the tokenizer with `plmscale prep tokenizer`"
            )

    pad_id, unk_id, cls_id, sep_id, mask_id = PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Batch-encode (SentencePiece runs the batch in its own C++ threads)."""
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)
