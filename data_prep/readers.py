"""Stream documents from JSONL, text, parquet and saved Hugging Face datasets, counting what is rejected.

Bad input never stops a run and is never dropped silently: every record read counts in `documents_in`,
every rejected one is counted by reason with the file and line of its first examples, so that
`documents_in == written + rejected` once the consumer has counted what it wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import UserError
from plmscale.tokenizer import file_sha256

FORMATS = {".jsonl": "jsonl", ".txt": "text", ".parquet": "parquet"}
MAX_EXAMPLES = 5
TABLE_BATCH = 1024


@dataclass(frozen=True)
class Document:
    text: str
    file: str
    line: int  # 1-based line of a text file, or 0-based row of a table


class RejectCounter:
    """Counts records read, written and rejected by reason, keeping the first few rejected locations."""

    def __init__(self, max_examples: int = MAX_EXAMPLES):
        self.max_examples = max_examples
        self.documents_in = 0
        self.written = 0
        self.reasons: dict[str, int] = {}
        self.examples: dict[str, list[dict]] = {}

    def reject(self, reason: str, file: str, line: int | None, error: str | None = None) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append({"file": file, "line": line} | ({"error": error} if error else {}))

    @property
    def rejected(self) -> int:
        return sum(self.reasons.values())

    def to_dict(self) -> dict:
        return {r: {"count": self.reasons[r], "examples": self.examples[r]} for r in sorted(self.reasons)}


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def resolve_inputs(inputs: Iterable[str | Path]) -> list[tuple[Path, str | None]]:
    """(path, format) in reading order: inputs as given, a plain directory expanded to its files sorted."""
    resolved = []
    for path in map(Path, inputs):
        if is_hf_dataset(path):
            resolved.append((path, "hf"))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in FORMATS and p.is_file())
            resolved.extend((p, FORMATS[p.suffix]) for p in files)
        else:
            resolved.append((path, FORMATS.get(path.suffix)))
    return resolved


def check_inputs(inputs: Iterable[str | Path]) -> None:
    """Fail fast on a mistyped command line; problems found while reading are counted instead."""
    for path in map(Path, inputs):
        if not path.exists():
            raise UserError(f"input not found: {path}")
        if path.is_file() and path.suffix not in FORMATS:
            raise UserError(f"unsupported input {path}: expected {', '.join(FORMATS)} or a directory")
        if path.is_dir() and not resolve_inputs([path]):
            raise UserError(f"no {', '.join(FORMATS)} files or saved dataset in {path}")


def input_entries(inputs: Iterable[str | Path]) -> list[dict]:
    """What a manifest records about its inputs: each file's path and sha256."""
    entries = []
    for path, fmt in resolve_inputs(inputs):
        entry = {"path": str(path.resolve()), "format": fmt}
        if path.is_file():
            entry["sha256"] = file_sha256(path)
        entries.append(entry)
    return entries


def iter_documents(inputs: Iterable[str | Path], counter: RejectCounter, text_field: str = "text"):
    """Yield the non-empty, valid documents of all inputs, in a deterministic order."""
    for path, fmt in resolve_inputs(inputs):
        try:
            for file, line, text, reason in _READERS[fmt](path, text_field):
                counter.documents_in += 1
                if reason is None and not text.strip():
                    reason = "empty"
                if reason is None and not _encodable(text):
                    reason = "invalid_utf8"
                if reason is None:
                    yield Document(text, file, line)
                else:
                    counter.reject(reason, file, line)
        except (OSError, pa.ArrowException) as exc:
            counter.documents_in += 1
            counter.reject("unreadable_file", str(path), None, error=f"{type(exc).__name__}: {exc}")


def _encodable(text: str) -> bool:
    """False for lone surrogates (JSON "\\ud800" escapes), which no tokenizer can encode."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _value(value: object) -> tuple[str | None, str | None]:
    """(text, rejection reason) of one record's text field."""
    if value is None:
        return None, "missing_field"
    if not isinstance(value, str):
        return None, "non_string_field"
    return value, None


def _read_jsonl(path: Path, field: str) -> Iterator[tuple]:
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, 1):
            if not raw.strip():
                continue  # a blank line holds no record
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield str(path), line, None, "invalid_utf8"
            except json.JSONDecodeError:
                yield str(path), line, None, "malformed_json"
            else:
                yield str(path), line, *_value(record.get(field) if isinstance(record, dict) else None)


def _read_text(path: Path, field: str) -> Iterator[tuple]:
    """One document per block of non-blank lines."""

    def document(block: list[bytes]) -> tuple[str | None, str | None]:
        try:
            return b"".join(block).decode("utf-8").strip(), None
        except UnicodeDecodeError:
            return None, "invalid_utf8"

    block, start = [], 0
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, 1):
            if raw.strip():
                start = start if block else line
                block.append(raw)
            elif block:
                yield str(path), start, *document(block)
                block = []
    if block:
        yield str(path), start, *document(block)


def _read_parquet(path: Path, field: str) -> Iterator[tuple]:
    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        for row in range(table.metadata.num_rows):
            yield str(path), row, None, "missing_field"
        return
    row = 0
    for batch in table.iter_batches(batch_size=TABLE_BATCH, columns=[field]):
        for value in batch.column(0).to_pylist():
            yield str(path), row, *_value(value)
            row += 1


def _read_hf(path: Path, field: str) -> Iterator[tuple]:
    """A dataset saved with `save_to_disk`; a DatasetDict is read split by split, sorted by name."""
    import datasets  # slow to import; only this format needs it

    loaded = datasets.load_from_disk(str(path))
    splits = sorted(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for name, dataset in splits:
        file = f"{path}:{name}" if name else str(path)
        if field not in dataset.column_names:
            for row in range(len(dataset)):
                yield file, row, None, "missing_field"
            continue
        row = 0
        for batch in dataset.select_columns([field]).iter(batch_size=TABLE_BATCH):
            for value in batch[field]:
                yield file, row, *_value(value)
                row += 1


def _read_unsupported(path: Path, field: str) -> Iterator[tuple]:
    yield str(path), None, None, "unsupported_format"


_READERS = {
    "jsonl": _read_jsonl,
    "text": _read_text,
    "parquet": _read_parquet,
    "hf": _read_hf,
    None: _read_unsupported,
}
