"""Documents -> sentences -> token ids, in worker processes whose output order never depends on their number.

Workers load the tokenizer once and batch-encode a chunk of documents at a time; `ordered_map` keeps at
most a few chunks in flight so memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from multiprocessing.pool import Pool

import numpy as np

from data_prep.readers import Document
from plmscale.tokenizer import Tokenizer

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_worker: dict = {}


def split_sentences(text: str) -> list[str]:
    """A sentence ends at [.!?] followed by whitespace, or at a blank line (paragraph break)."""
    return [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]


def in_valid_split(text: str, valid_fraction: float) -> bool:
    """Held-out by a hash of the text: stable across runs, worker counts and input order."""
    key = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")
    return key < valid_fraction * 2**64


def token_dtype(vocab_size: int) -> type[np.integer]:
    return np.uint16 if vocab_size < 65500 else np.int32


def init_worker(model_path: str, valid_fraction: float) -> None:
    tokenizer = Tokenizer(model_path)
    _worker.update(sp=tokenizer.sp, dtype=token_dtype(tokenizer.vocab_size), valid_fraction=valid_fraction)


def encode_chunk(docs: list[Document]) -> list[tuple[bool, np.ndarray, np.ndarray]]:
    """Per document: (goes to valid, its tokens concatenated, each non-empty sentence's length)."""
    texts = [doc.text for doc in docs]
    sentences = [split_sentences(text) for text in texts]
    ids = _worker["sp"].encode(list(chain.from_iterable(sentences)), out_type=int, num_threads=1)
    results, start = [], 0
    for text, doc_sentences in zip(texts, sentences, strict=True):
        pieces = [p for p in ids[start : start + len(doc_sentences)] if p]
        start += len(doc_sentences)
        lengths = np.array([len(p) for p in pieces], dtype=np.int32)
        tokens = np.fromiter(chain.from_iterable(pieces), dtype=_worker["dtype"], count=int(lengths.sum()))
        results.append((in_valid_split(text, _worker["valid_fraction"]), tokens, lengths))
    return results


def ordered_map(pool: Pool | None, fn: Callable, items: Iterable, max_pending: int) -> Iterator[tuple]:
    """Yield (item, fn(item)) in input order with at most `max_pending` items in flight.

    `Pool.imap` would read its whole input ahead into memory; this does not. No pool: run inline.
    """
    if pool is None:
        yield from ((item, fn(item)) for item in items)
        return
    pending: deque = deque()
    for item in items:
        pending.append((item, pool.apply_async(fn, (item,))))
        if len(pending) >= max_pending:
            item, result = pending.popleft()
            yield item, result.get()
    while pending:
        item, result = pending.popleft()
        yield item, result.get()
