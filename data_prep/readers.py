"""Split inputs (JSONL, text, parquet, saved Hugging Face datasets) into work units and read their documents.

The main process only cuts inputs into units: byte ranges of line files, batches of table rows. Reading,
parsing and checking a unit's records happens where it is encoded, in a worker. Bad input never stops a
run and is never dropped silently: every record read counts in `documents_in`, every rejected one is
counted by reason with the file and line of its first examples, so that `documents_in == written +
rejected` once the consumer has counted what it wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import UserError
from plmscale.tokenizer import file_sha256

FORMATS = {".jsonl": "jsonl", ".txt": "text", ".parquet": "parquet"}
MAX_EXAMPLES = 5
UNIT_RECORDS = 1024
_JSON_SPACE = " \t\n\r"  # what json.loads skips around a value
_JSON_SCAN = json.JSONDecoder().scan_once  # the scanner json.loads uses


@dataclass(frozen=True)
class Document:
    text: str
    file: str
    line: int  # 1-based line of a text file, or 0-based row of a table


@dataclass(frozen=True)
class Unit:
    """One worker task: bytes `start:stop` of a JSONL or text file, or a batch of a table's text values.

    `first` is the line number at `start` (1-based), or the row of the batch's first value (0-based).
    """

    file: str
    fmt: str  # "jsonl", "text" or "table"
    first: int
    start: int = 0
    stop: int = 0
    values: pa.Array | None = None


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

    def count(self, file: str, documents: int, rejects: list[tuple]) -> None:
        """`documents` records read from `file`, of which `rejects` (reason, line, error) were rejected."""
        self.documents_in += documents
        for reason, line, error in rejects:
            self.reject(reason, file, line, error)

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
    for unit in iter_units(inputs, counter, text_field, UNIT_RECORDS):
        texts, lines, rejects = read_unit(unit, text_field)
        counter.count(unit.file, len(texts) + len(rejects), rejects)
        yield from (Document(text, unit.file, line) for text, line in zip(texts, lines, strict=True))


def iter_units(inputs: Iterable[str | Path], counter: RejectCounter, text_field: str, records: int):
    """Cut all inputs into units of `records` lines (table rows) each, in reading order.

    An input that cannot be opened or parsed counts as one `unreadable_file` record.
    """
    for path, fmt in resolve_inputs(inputs):
        try:
            if fmt in ("jsonl", "text"):
                yield from _line_units(path, fmt, records)
            elif fmt == "parquet":
                yield from _parquet_units(path, text_field, records)
            elif fmt == "hf":
                yield from _hf_units(path, text_field, records)
            else:
                counter.count(str(path), 1, [("unsupported_format", None, None)])
        except (OSError, pa.ArrowException) as exc:
            counter.count(str(path), 1, [("unreadable_file", None, f"{type(exc).__name__}: {exc}")])


def read_unit(unit: Unit, field: str) -> tuple[list[str], list[int], list[tuple]]:
    """A unit's valid documents (texts, lines) and its rejected records (reason, line, error), in order."""
    texts, lines, rejects = [], [], []
    try:
        for line, text, reason in _RECORDS[unit.fmt](unit, field):
            if reason is None and (not text or text.isspace()):  # == not text.strip(), without a copy
                reason = "empty"
            if reason is None and not _encodable(text):
                reason = "invalid_utf8"
            if reason is None:
                texts.append(text)
                lines.append(line)
            else:
                rejects.append((reason, line, None))
    except OSError as exc:  # the file changed or vanished since it was cut into units
        rejects.append(("unreadable_file", None, f"{type(exc).__name__}: {exc}"))
    return texts, lines, rejects


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


def _line_units(path: Path, fmt: str, records: int) -> Iterator[Unit]:
    """Byte ranges of `records` lines each, cut at a line start; in a text file, only after a blank line, so
    that no block (document) is cut."""
    start, first = 0, 1
    with open(path, "rb") as handle:
        while lines := list(islice(handle, records)):
            while fmt == "text" and lines[-1].strip() and (line := handle.readline()):
                lines.append(line)
            stop = start + sum(map(len, lines))
            yield Unit(str(path), fmt, first, start, stop)
            start, first = stop, first + len(lines)


def _lines(unit: Unit) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline) of a unit's byte range."""
    with open(unit.file, "rb") as handle:
        handle.seek(unit.start)
        data = handle.read(unit.stop - unit.start)
    return enumerate(data.split(b"\n"), unit.first)


def _jsonl_records(unit: Unit, field: str) -> Iterator[tuple]:
    for line, raw in _lines(unit):
        if not raw.strip():
            continue  # a blank line holds no record
        try:
            record = _json_loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield line, None, "invalid_utf8"
        except (json.JSONDecodeError, StopIteration):
            yield line, None, "malformed_json"
        else:
            yield line, *_value(record.get(field) if isinstance(record, dict) else None)


def _json_loads(text: str) -> object:
    """== `json.loads(text)`, minus its Python wrappers: they take 40% of its time on a typical line.

    Raises JSONDecodeError (or StopIteration: no value) where `json.loads` raises JSONDecodeError.
    """
    if text.startswith("\ufeff"):  # a byte order mark
        raise json.JSONDecodeError("Unexpected UTF-8 BOM", text, 0)
    value, end = _JSON_SCAN(text, len(text) - len(text.lstrip(_JSON_SPACE)))
    if text[end:].lstrip(_JSON_SPACE):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _text_records(unit: Unit, field: str) -> Iterator[tuple]:
    """One document per block of non-blank lines."""

    def document(block: list[bytes]) -> tuple[str | None, str | None]:
        try:
            return b"\n".join(block).decode("utf-8").strip(), None
        except UnicodeDecodeError:
            return None, "invalid_utf8"

    block, start = [], 0
    for line, raw in _lines(unit):
        if raw.strip():
            start = start if block else line
            block.append(raw)
        elif block:
            yield start, *document(block)
            block = []
    if block:
        yield start, *document(block)


def _table_records(unit: Unit, field: str) -> Iterator[tuple]:
    for row, value in enumerate(unit.values.to_pylist(), unit.first):
        yield row, *_value(value)


def _missing_field(file: str, rows: int, records: int) -> Iterator[Unit]:
    """A table without the text field: each of its rows is a record with the field missing."""
    for row in range(0, rows, records):
        yield Unit(file, "table", row, values=pa.nulls(min(records, rows - row)))


def _parquet_units(path: Path, field: str, records: int) -> Iterator[Unit]:
    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        yield from _missing_field(str(path), table.metadata.num_rows, records)
        return
    row = 0
    for batch in table.iter_batches(batch_size=records, columns=[field]):
        yield Unit(str(path), "table", row, values=batch.column(0))
        row += batch.num_rows


def _hf_units(path: Path, field: str, records: int) -> Iterator[Unit]:
    """A dataset saved with `save_to_disk`; a DatasetDict is read split by split, sorted by name."""
    import datasets  # slow to import; only this format needs it

    loaded = datasets.load_from_disk(str(path))
    splits = sorted(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for name, dataset in splits:
        file = f"{path}:{name}" if name else str(path)
        if field not in dataset.column_names:
            yield from _missing_field(file, len(dataset), records)
            continue
        row = 0
        for batch in dataset.select_columns([field]).with_format("arrow").iter(batch_size=records):
            values = pa.concat_arrays(batch.column(0).chunks)  # a copy: a slice pickles its whole table
            yield Unit(file, "table", row, values=values)
            row += len(values)


_RECORDS = {"jsonl": _jsonl_records, "text": _text_records, "table": _table_records}
