"""Tokenize documents into megatron-core indexed datasets: one item per sentence, documents kept apart.

Each split (`train`, `valid`) is written as shards `train_00000.bin/.idx`, ... of at most
`shard_tokens` tokens (a document is never cut), then `manifest.json` records inputs, tokenizer,
options, per-shard counts and sha256s, and the rejected documents. Memory is bounded: documents stream
through a few chunks in flight, and only the current shard's index is held.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from contextlib import nullcontext
from itertools import islice
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep import UserError
from data_prep.encode import encode_chunk, init_worker, ordered_map, token_dtype
from data_prep.manifest import FORMAT, MANIFEST, write_manifest
from data_prep.readers import RejectCounter, input_entries, iter_documents
from plmscale.tokenizer import Tokenizer, file_sha256

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core warns that Transformer Engine and Apex are absent
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

SPLITS = ("train", "valid")
_SHARD_FILE = re.compile(r"(train|valid)_\d{5}\.(bin|idx)")


class SplitWriter:
    """Writes one split as a sequence of shards, rolling over before a shard would pass `shard_tokens`."""

    def __init__(self, directory: Path, split: str, dtype: type[np.integer], shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.builder: IndexedDatasetBuilder | None = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """One document: its sentences' tokens concatenated, and each sentence's length."""
        if self.builder is not None and self.shards[-1]["tokens"] + tokens.size > self.shard_tokens:
            self.close()
        if self.builder is None:
            prefix = f"{self.split}_{len(self.shards):05d}"
            self.builder = IndexedDatasetBuilder(str(self.directory / f"{prefix}.bin"), dtype=self.dtype)
            self.shards.append({"prefix": prefix, "documents": 0, "sentences": 0, "tokens": 0, "files": {}})
        # == add_item per sentence + end_document, in one write (takes any array, not only tensors)
        self.builder.add_document(tokens, lengths.tolist())
        shard = self.shards[-1]
        shard["documents"] += 1
        shard["sentences"] += lengths.size
        shard["tokens"] += tokens.size

    def close(self) -> None:
        if self.builder is None:
            return
        shard = self.shards[-1]
        self.builder.finalize(str(self.directory / f"{shard['prefix']}.idx"))
        self.builder = None
        for suffix in (".bin", ".idx"):
            name = shard["prefix"] + suffix
            shard["files"][name] = file_sha256(self.directory / name)


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
    out_dir = _clean_out_dir(Path(out_dir))
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: SplitWriter(out_dir, split, dtype, shard_tokens) for split in SPLITS}
    counter, sentences, tokens = RejectCounter(), 0, 0

    documents = iter_documents(inputs, counter, text_field)
    chunks = iter(lambda: list(islice(documents, chunk_documents)), [])
    worker_args = (str(tokenizer.path), valid_fraction)
    if workers == 1:
        init_worker(*worker_args)  # encode in this process
    started = time.perf_counter()
    with (
        Pool(workers, init_worker, worker_args) if workers > 1 else nullcontext() as pool,
        tqdm(unit="tok", unit_scale=True, disable=not progress, desc="shards") as bar,
    ):
        for docs, results in ordered_map(pool, encode_chunk, chunks, max_pending=2 * workers):
            for doc, (valid, doc_tokens, lengths) in zip(docs, results, strict=True):
                if doc_tokens.size == 0:
                    counter.reject("empty_after_tokenization", doc.file, doc.line)
                    continue
                writers["valid" if valid else "train"].add(doc_tokens, lengths)
                counter.written += 1
                sentences += lengths.size
                tokens += doc_tokens.size
            bar.update(sum(r[1].size for r in results))
    for writer in writers.values():
        writer.close()
    seconds = time.perf_counter() - started

    manifest = {
        "format": FORMAT,
        "tokenizer": {
            "path": str(tokenizer.path.resolve()),
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
        },
        "dtype": np.dtype(dtype).name,
        "inputs": input_entries(inputs),
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
