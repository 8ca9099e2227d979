"""Word boundaries for whole-word and span masking: SentencePiece's marker for English, jieba for Chinese.

Chinese has no spaces, so SentencePiece's U+2581 marker says nothing about words there; Chinese BERT-wwm
segments the text with a word segmenter and masks the pieces of one segmented word together. Here a piece
starts a word iff its first character starts a jieba word (a jieba word that begins inside a piece joins
the piece's word: a piece is never split).
"""

from __future__ import annotations

import logging
import re
from functools import cache

import jieba
import numpy as np

from data_prep.instances.base import Vocabulary
from plmscale.tokenizer import MASK_ID, WORD_START

_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


@cache
def _segmenter() -> jieba.Tokenizer:
    """jieba's default dictionary, loaded once per process without its log lines."""
    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba.dt


def english_word_starts(tokens: np.ndarray, vocab: Vocabulary) -> np.ndarray:
    return vocab.word_start[tokens]


def _surfaces(tokens: np.ndarray, vocab: Vocabulary) -> list[str]:
    """Each piece's text, the marker as a space; a run of byte-fallback pieces decodes on its first piece
    (the rest are empty, so they belong to its word); a special token is a line break no word crosses."""
    surfaces: list[str] = []
    run = bytearray()
    for token in tokens.tolist():
        piece = vocab.pieces[token]
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:
            run.append(int(byte.group(1), 16))
            surfaces.append("")
            continue
        if run:
            surfaces[-len(run)] = run.decode("utf-8", errors="replace")
            run.clear()
        surfaces.append("\n" if token <= MASK_ID else piece.replace(WORD_START, " "))
    if run:
        surfaces[-len(run)] = run.decode("utf-8", errors="replace")
    return surfaces


def chinese_word_starts(tokens: np.ndarray, vocab: Vocabulary) -> np.ndarray:
    """Per token: does it start a jieba word? Leading whitespace of a piece is skipped; a piece that is only
    whitespace (a lone marker) starts the word of the piece after it."""
    tokens = np.asarray(tokens)
    surfaces = _surfaces(tokens, vocab)
    text = "".join(surfaces)
    word_start_char = np.zeros(len(text) + 1, dtype=bool)
    offset = 0
    for word in _segmenter().lcut(text):
        word_start_char[offset] = True
        offset += len(word)
    lengths = np.array([len(s) for s in surfaces], dtype=np.int64)
    content = np.array([len(s) - len(s.lstrip()) for s in surfaces], dtype=np.int64)  # first non-space char
    starts = word_start_char[np.cumsum(lengths) - lengths + content] & (content < lengths)
    starts |= tokens <= MASK_ID
    for i in np.flatnonzero((content == lengths) & (lengths > 0) & (tokens > MASK_ID)):
        if i + 1 < len(tokens) and starts[i + 1] and tokens[i + 1] > MASK_ID:
            starts[i], starts[i + 1] = True, False
    return starts


SEGMENTERS = {"sentencepiece": english_word_starts, "jieba": chinese_word_starts}
