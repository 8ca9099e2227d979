"""Which files the inputs name and whether each can be read, all decided before any document is read.

A directory is walked in sorted order; a saved Hugging Face dataset inside it is read as one input. Every file
found ends up in one of three places, never nowhere: read; skipped for its type or name (listed with the
reason); or rejected because it cannot be read (counted by reason as one rejected record, with the file
named, so that `documents_in == written + rejected` still holds).

`.json` files are skipped, not read: such a file may be JSON Lines, one JSON array of records, or metadata
(`dataset_info.json`, a config), and reading the wrong kind would reject every line or train on metadata.
JSON Lines belong in `.jsonl` files.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from data_prep import UserError
from plmscale.tokenizer import file_sha256

if TYPE_CHECKING:
    from data_prep.readers import RejectCounter

FORMATS = {".jsonl": "jsonl", ".txt": "text", ".parquet": "parquet"}
LINE_FORMATS = ("jsonl", "text")  # the formats that may also come compressed
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
EXPECTED = f"{', '.join(FORMATS)} (.jsonl and .txt also as {', '.join(COMPRESSIONS)}) or a directory"
# What reading a corrupt or truncated compressed stream raises (bz2 and gzip raise OSErrors).
STREAM_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)
_ZSTD_READ = 1 << 16  # compressed bytes decompressed at a time


@dataclass(frozen=True)
class Source:
    """One input to read: a file, or a saved Hugging Face dataset (a directory)."""

    path: Path
    fmt: str  # "jsonl", "text", "parquet" or "hf"
    compression: str | None = None  # one of COMPRESSIONS


@dataclass
class Inputs:
    sources: list[Source] = field(default_factory=list)  # the readable ones, in reading order
    entries: list[dict] = field(default_factory=list)  # manifest "inputs": each file, its sha256 or rejection
    skipped: list[dict] = field(default_factory=list)  # manifest "skipped": each file not read, and why


def classify(path: Path) -> Source | str:
    """The source a file's name says to read (`corpus.jsonl.gz`: gzipped JSONL), or why it is skipped."""
    if path.suffix in FORMATS:
        return Source(path, FORMATS[path.suffix])
    inner = FORMATS.get(Path(path.stem).suffix)
    if inner in LINE_FORMATS:
        return Source(path, inner, path.suffix) if path.suffix in COMPRESSIONS else "unsupported_compression"
    return "ambiguous_json" if path.suffix == ".json" else "unsupported_format"


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def check_inputs(inputs: list[str | Path]) -> None:
    """Fail fast on a mistyped command line; a problem with a file found in a directory is counted instead."""
    for path in map(Path, inputs):
        try:
            exists, is_dir = path.exists() or path.is_symlink(), path.is_dir()
        except OSError as exc:  # e.g. a parent directory without search permission
            raise UserError(f"cannot access input {path}: {exc.strerror}") from None
        if not exists:
            raise UserError(f"input not found: {path}")
        if not is_dir and isinstance(reason := classify(path), str):
            hint = " (JSON Lines belong in .jsonl files)" if reason == "ambiguous_json" else ""
            raise UserError(f"unsupported input {path}: expected {EXPECTED}{hint}")


def scan_inputs(inputs: list[str | Path], counter: RejectCounter) -> Inputs:
    """Find and check every input file; an unreadable one counts in `counter` as one rejected record."""
    found, seen = Inputs(), set()
    for path in map(Path, inputs):
        if path.is_dir():
            _walk(path, found, counter, seen)
        else:
            _add(path, found, counter)
    return found


def _walk(directory: Path, found: Inputs, counter: RejectCounter, seen: set[Path]) -> None:
    """A directory's files in sorted order (that of `sorted(rglob("*"))`), symlinked directories included."""
    real = directory.resolve()
    if real in seen:  # a symlink loop, or a directory named twice: read it once
        found.skipped.append({"path": str(directory.absolute()), "reason": "directory_already_read"})
        return
    seen.add(real)
    try:
        paths = sorted(directory.iterdir())
        saved_dataset = is_hf_dataset(directory)
    except OSError as exc:
        _reject(directory, _reason(exc), f"{type(exc).__name__}: {exc}", found, counter)
        return
    if saved_dataset:
        _add_source(Source(directory, "hf"), found, counter)
        return
    for path in paths:
        if path.name.startswith("."):  # .git, .cache, .ipynb_checkpoints, .DS_Store: listed, not walked
            found.skipped.append({"path": str(path.absolute()), "reason": "hidden"})
        elif path.is_dir():
            _walk(path, found, counter, seen)
        else:
            _add(path, found, counter)


def _add(path: Path, found: Inputs, counter: RejectCounter) -> None:
    source = classify(path)
    if isinstance(source, str):
        found.skipped.append({"path": str(path.absolute()), "reason": source})
    else:
        _add_source(source, found, counter)


def _add_source(source: Source, found: Inputs, counter: RejectCounter) -> None:
    entry = {"path": str(source.path.absolute()), "format": source.fmt}
    if source.compression:
        entry["compression"] = source.compression
    if source.fmt == "hf":  # a directory: checked as it is loaded
        found.sources.append(source)
        found.entries.append(entry)
        return
    try:
        entry["sha256"] = _check_file(source)
    except _Unreadable as exc:
        _reject(source.path, exc.reason, exc.error, found, counter)
    else:
        found.sources.append(source)
        found.entries.append(entry)


class _Unreadable(Exception):
    def __init__(self, reason: str, error: str):
        super().__init__(reason, error)
        self.reason, self.error = reason, error


def _check_file(source: Source) -> str:
    """The file's sha256, once it is known to be a regular, readable file whose stream starts well."""
    path = source.path
    if path.is_symlink() and not path.exists():
        raise _Unreadable("broken_symlink", f"points to {os.readlink(path)}, which does not exist")
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the reader, a device never end
            raise _Unreadable("not_a_file", "not a regular file")
        sha256 = file_sha256(path)
    except OSError as exc:
        raise _Unreadable(_reason(exc), f"{type(exc).__name__}: {exc}") from exc
    try:
        if source.compression:
            with open_stream(source) as stream:
                stream.read(1)
        elif source.fmt == "parquet":
            pq.ParquetFile(path).close()
    except (*STREAM_ERRORS, pa.ArrowException) as exc:
        raise _Unreadable("corrupt_file", f"{type(exc).__name__}: {exc}") from exc
    return sha256


def _reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing_file"
    if isinstance(exc, PermissionError):
        return "permission_denied"
    return "unreadable_file"


def _reject(path: Path, reason: str, error: str, found: Inputs, counter: RejectCounter) -> None:
    found.entries.append({"path": str(path.absolute()), "rejected": reason, "error": error})
    counter.count(str(path), 1, [(reason, None, error)])


def open_stream(source: Source) -> io.BufferedIOBase:
    """A compressed file's decompressed bytes, as a binary file that iterates by lines."""
    if source.compression == ".zst":
        return io.BufferedReader(ZstdReader(source.path), _ZSTD_READ)
    return {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[source.compression](source.path)


class ZstdReader(io.RawIOBase):
    """The frames of a .zst file one after another, as `zstd -d` reads them.

    Not `zstandard.open`: a stream that ends inside a frame (a truncated file) must raise, as gzip, bz2 and
    lzma do, and its reader returns the partial data as if the file ended there.
    """

    def __init__(self, path: Path):
        self._file = open(path, "rb")  # noqa: SIM115 (closed by `close`)
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = None  # the current frame's decompression object
        self._output = memoryview(b"")  # decompressed, not yet read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._output:
            if self._frame is None or self._frame.eof:  # the next frame starts after the last one's end
                data = (self._frame.unused_data if self._frame else b"") or self._file.read(_ZSTD_READ)
                if not data:
                    return 0
                self._frame = self._decompressor.decompressobj()
            elif not (data := self._file.read(_ZSTD_READ)):
                raise EOFError("zstd stream ended inside a frame: the file is truncated")
            self._output = memoryview(self._frame.decompress(data))
        size = min(len(buffer), len(self._output))
        buffer[:size] = self._output[:size]
        self._output = self._output[size:]
        return size

    def close(self) -> None:
        self._file.close()
        super().close()
