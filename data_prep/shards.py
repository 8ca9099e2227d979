"""Tokenize documents into megatron-core indexed datasets: one item per sentence, documents kept apart.

Each split (`train`, `valid`) is written as shards `train_00000.bin/.idx`, ... of at most
`shard_tokens` tokens (a document is never cut), then `manifest.json` records inputs, tokenizer,
options, per-shard counts and sha256s, the rejected documents and the skipped files. A run that would
write nothing raises a UserError saying why, and writes no manifest. Memory is bounded: input streams
through a few work units in flight, and only the current shard's index is held, as arrays.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import time
from contextlib import nullcontext
from itertools import pairwise
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep import UserError
from data_prep.encode import Encoded, encode_unit, init_worker, ordered_map, token_dtype
from data_prep.inputs import scan_inputs
from data_prep.readers import RejectCounter, iter_units
from plmscale.manifest import FORMAT, MANIFEST, relative_path, write_manifest
from plmscale.tokenizer import Tokenizer

SPLITS = ("train", "valid")
_SHARD_FILE = re.compile(r"(train|valid)_\d{5}\.(bin|idx)")
# megatron-core's `.idx` layout (version 1) and dtype codes, written here without importing megatron-core:
# its import pulls in torch, which makes forking the workers slow, and its index writer loops in Python.
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.uint16: 8, np.int32: 4}


class SplitWriter:
    """Writes one split as a sequence of shards, rolling over before a shard would pass `shard_tokens`."""

    def __init__(self, directory: Path, split: str, dtype: type[np.integer], shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.bin = None  # the current shard's open .bin, with its sha256 and its index so far
        self.bin_sha256 = None
        self.lengths: list[np.ndarray] = []
        self.document_ends: list[np.ndarray] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray, sentences: np.ndarray) -> None:
        """Documents in order: all their tokens, each sentence's length, each document's sentence count."""
        sentence_ends = np.cumsum(sentences)
        token_ends = np.cumsum(lengths)[sentence_ends - 1]
        first = 0
        while first < sentences.size:
            before = int(token_ends[first - 1]) if first else 0
            if self.bin is not None:  # the documents that still fit in this shard
                room = self.shard_tokens - self.shards[-1]["tokens"]
                last = int(np.searchsorted(token_ends, before + room, "right"))
                if last <= first:  # not even the next one (room < 0 after a document longer than a shard)
                    self.close()
            if self.bin is None:  # a new shard takes at least one document, however long
                self._open()
                last = max(int(np.searchsorted(token_ends, before + self.shard_tokens, "right")), first + 1)
            start = int(sentence_ends[first - 1]) if first else 0
            self._write(tokens[before : token_ends[last - 1]], lengths[start : sentence_ends[last - 1]],
                        sentence_ends[first:last] - start)  # fmt: skip
            first = last

    def _open(self) -> None:
        prefix = f"{self.split}_{len(self.shards):05d}"
        self.bin = open(self.directory / f"{prefix}.bin", "wb")  # noqa: SIM115 (closed by `close`)
        self.bin_sha256 = hashlib.sha256()
        self.shards.append({"prefix": prefix, "documents": 0, "sentences": 0, "tokens": 0, "files": {}})

    def _write(self, tokens: np.ndarray, lengths: np.ndarray, document_ends: np.ndarray) -> None:
        shard = self.shards[-1]
        self.bin.write(tokens)
        self.bin_sha256.update(tokens)
        self.lengths.append(lengths)
        self.document_ends.append(document_ends + shard["sentences"])
        shard["documents"] += document_ends.size
        shard["sentences"] += lengths.size
        shard["tokens"] += tokens.size

    def close(self) -> None:
        """Finish the current shard: close its .bin, write its .idx."""
        if self.bin is None:
            return
        self.bin.close()
        self.bin = None
        lengths = np.concatenate(self.lengths, dtype=np.int32)
        offsets = np.cumsum(lengths[:-1], dtype=np.int64) * np.dtype(self.dtype).itemsize
        pointers = np.concatenate([[0], offsets], dtype=np.int64)  # each sentence's byte offset in the .bin
        documents = np.concatenate([[0], *self.document_ends], dtype=np.int64)
        self.lengths, self.document_ends = [], []
        header = _INDEX_HEADER + struct.pack(
            "<QBQQ", 1, _DTYPE_CODES[self.dtype], lengths.size, documents.size
        )
        shard = self.shards[-1]
        idx_sha256 = hashlib.sha256()
        with open(self.directory / f"{shard['prefix']}.idx", "wb") as idx:
            for part in (header, lengths, pointers, documents):
                idx.write(part)
                idx_sha256.update(part)
        shard["files"][f"{shard['prefix']}.bin"] = self.bin_sha256.hexdigest()
        shard["files"][f"{shard['prefix']}.idx"] = idx_sha256.hexdigest()


def build_shards(
    inputs: list[str | Path],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    workers: int = 1,
    valid_fraction: float = 0.01,
    shard_tokens: int = 50_000_000,
    chunk_documents: int = 256,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into shards under `out_dir` and write its manifest; return the manifest."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items() if k != "progress"}
    config["inputs"] = [str(p) for p in inputs]
    tokenizer = _load_tokenizer(tokenizer_path)
    counter, sentences, tokens = RejectCounter(), 0, 0
    found = scan_inputs(inputs, counter)
    if not found.sources:  # before a previous run's output is removed
        raise UserError(counter.nothing_written(found))
    out_dir = _clean_out_dir(Path(out_dir))
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: SplitWriter(out_dir, split, dtype, shard_tokens) for split in SPLITS}

    units = iter_units(found.sources, counter, text_field, chunk_documents)
    worker_args = (str(tokenizer.path), valid_fraction, text_field)
    init_worker(*worker_args, tokenizer)  # before forking the workers, which inherit it
    started = time.perf_counter()
    with (
        Pool(workers, init_worker, worker_args) if workers > 1 else nullcontext() as pool,
        tqdm(unit="tok", unit_scale=True, disable=not progress, desc="shards") as bar,
    ):
        for unit, encoded in ordered_map(pool, encode_unit, units, max_pending=2 * workers):
            counter.count(unit.file, encoded.documents_in, encoded.rejects)
            _write_runs(writers, encoded)
            counter.written += encoded.valid.size
            sentences += encoded.lengths.size
            tokens += encoded.tokens.size
            bar.update(encoded.tokens.size)
    for writer in writers.values():
        writer.close()
    seconds = time.perf_counter() - started
    if counter.written == 0:  # no shard was opened, and no manifest says this run finished
        raise UserError(counter.nothing_written(found))

    manifest = {
        "format": FORMAT,
        "tokenizer": {
            "path": relative_path(tokenizer.path, out_dir),
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
        },
        "dtype": np.dtype(dtype).name,
        "inputs": found.entries,
        "skipped": found.skipped,
        "config": config,
        "splits": {split: writer.shards for split, writer in writers.items()},
        "counts": {
            "documents_in": counter.documents_in,
            "documents_written": counter.written,
            "sentences": sentences,
            "tokens": tokens,
            "documents_rejected": counter.rejected,
        },
        "rejected": counter.to_dict(),
    }
    write_manifest(out_dir, manifest)
    return manifest | {"directory": str(out_dir), "seconds": seconds}


def _write_runs(writers: dict[str, SplitWriter], encoded: Encoded) -> None:
    """Each run of consecutive documents bound for the same split, in one call to its writer."""
    valid = encoded.valid
    if valid.size == 0:
        return
    runs = [0, *(np.flatnonzero(valid[1:] != valid[:-1]) + 1).tolist(), valid.size]
    sentence_starts = np.concatenate(([0], np.cumsum(encoded.sentences)))
    token_starts = np.concatenate(([0], np.cumsum(encoded.lengths)))
    for first, last in pairwise(runs):
        start, stop = sentence_starts[first], sentence_starts[last]
        writers["valid" if valid[first] else "train"].add(
            encoded.tokens[token_starts[start] : token_starts[stop]],
            encoded.lengths[start:stop],
            encoded.sentences[first:last],
        )


def _load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer(path)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc


def _clean_out_dir(out_dir: Path) -> Path:
    """Remove a previous run's manifest and shards, so no stale shard outlives it (other files stay)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in out_dir.iterdir():
        if path.name == MANIFEST or _SHARD_FILE.fullmatch(path.name):
            os.remove(path)
    return out_dir.resolve()
