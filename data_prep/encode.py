"""Work units -> documents -> sentences -> token ids, in workers whose output never depends on their number.

Workers load the tokenizer once; each reads, checks, splits and batch-encodes one unit and sends back a few
arrays (`Encoded`), not one object per document. `ordered_map` keeps at most a few units in flight so
memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import reduce
from multiprocessing.pool import Pool
from operator import iadd
from typing import NamedTuple

import numpy as np

from data_prep.readers import Unit, read_unit
from plmscale.tokenizer import Tokenizer

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
# By code point: what str.isspace(), str.strip() and the regex's \s take for whitespace.
_IS_SPACE = np.zeros(0x110000, bool)
_IS_SPACE[
    [*range(9, 14), *range(28, 33), 133, 160, 5760, *range(8192, 8203), 8232, 8233, 8239, 8287, 12288]
] = 1
_PACK_FORMAT = {np.uint16: "H", np.int32: "i"}
_worker: dict = {}


class Encoded(NamedTuple):
    """One unit, encoded: its records and rejects, then its written documents in order."""

    documents_in: int
    rejects: list[tuple]  # (reason, line, error), in input order within each reason
    valid: np.ndarray  # per document: goes to the valid split
    sentences: np.ndarray  # per document: its number of (non-empty) sentences
    lengths: np.ndarray  # per sentence: its number of tokens
    tokens: np.ndarray  # all tokens, concatenated


def split_sentences(text: str) -> list[str]:
    """A sentence ends at [.!?] followed by whitespace, or at a blank line (paragraph break)."""
    return [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]


def split_many(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """`split_sentences` of each text, vectorized: (all their sentences, each text's number of sentences).

    A maximal whitespace run is a break where it follows [.!?] or holds two newlines; the sentences are
    what lies between breaks, so they come out stripped. A blank line around each text is a break too.
    """
    joined = "\n\n".join(["", *texts, ""])
    try:  # one byte per code point where it can, else four
        codes = np.frombuffer(joined.encode("latin-1"), np.uint8)
    except UnicodeEncodeError:
        codes = np.frombuffer(joined.encode("utf-32-le"), np.uint32)
    space = ((codes - 9) <= 4) | ((codes - 28) <= 4)  # \t..\r and \x1c..space (unsigned wrap-around)
    if not joined.isascii():
        wide = np.flatnonzero(codes > 127)
        space[wide] = _IS_SPACE[codes[wide]]
    changes = np.flatnonzero(space[1:] != space[:-1]) + 1  # `joined` starts and ends with a run
    run_start = np.concatenate(([0], changes[1::2]))
    run_stop = np.concatenate((changes[::2], [codes.size]))
    run_of_newline = np.searchsorted(run_start, np.flatnonzero(codes == 10), "right") - 1
    breaks = np.zeros(run_start.size, bool)
    breaks[run_of_newline[1:][run_of_newline[1:] == run_of_newline[:-1]]] = True  # two newlines
    before = codes[run_start[1:] - 1]
    breaks[1:] |= (before == 46) | (before == 33) | (before == 63)  # after . ! ?
    starts, stops = run_stop[breaks][:-1], run_start[breaks][1:]
    text_lengths = np.fromiter(map(len, texts), np.int64, len(texts))
    text_starts = np.cumsum(text_lengths + 2) - text_lengths
    counts = np.bincount(np.searchsorted(text_starts, starts, "right") - 1, minlength=len(texts))
    return [joined[a:b] for a, b in zip(starts.tolist(), stops.tolist(), strict=True)], counts


def in_valid_split(text: str, valid_fraction: float) -> bool:
    """Held-out by a hash of the text: stable across runs, worker counts and input order."""
    key = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")
    return key < valid_fraction * 2**64


def token_dtype(vocab_size: int) -> type[np.integer]:
    return np.uint16 if vocab_size < 65500 else np.int32


def init_worker(
    model_path: str, valid_fraction: float, text_field: str, tokenizer: Tokenizer | None = None
) -> None:
    """Set up this process to encode, with `tokenizer` if already loaded from `model_path`.

    A forked worker inherits its parent's setup, so it need not load the tokenizer again.
    """
    if tokenizer is None and _worker.get("args") == (model_path, valid_fraction, text_field):
        return
    tokenizer = tokenizer or Tokenizer(model_path)
    _worker.update(
        args=(model_path, valid_fraction, text_field),
        sp=tokenizer.sp,
        dtype=token_dtype(tokenizer.vocab_size),
        valid_fraction=valid_fraction,
        text_field=text_field,
    )


def encode_unit(unit: Unit) -> Encoded:
    """Read, check, split and encode one unit's documents."""
    texts, lines, rejects = read_unit(unit, _worker["text_field"])
    dtype = _worker["dtype"]
    documents_in = len(texts) + len(rejects)
    sentences, counts = split_many(texts)
    ids = _worker["sp"].encode(sentences, out_type=int, num_threads=1)
    lengths = np.fromiter(map(len, ids), np.int32, len(ids))
    flat = reduce(iadd, ids, [])  # struct packs a list of Python ints faster than numpy converts them
    tokens = np.frombuffer(struct.pack(f"<{len(flat)}{_PACK_FORMAT[dtype]}", *flat), dtype)
    kept = lengths > 0  # a sentence that encodes to nothing is dropped, a document left empty rejected
    counts = np.bincount(np.repeat(np.arange(counts.size), counts)[kept], minlength=counts.size)
    written = counts > 0
    rejects += [
        ("empty_after_tokenization", line, None) for line, w in zip(lines, written, strict=True) if not w
    ]
    fraction = _worker["valid_fraction"]
    valid = np.array([in_valid_split(text, fraction) for text in texts], bool)[written]
    return Encoded(documents_in, rejects, valid, counts[written], lengths[kept], tokens)


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
