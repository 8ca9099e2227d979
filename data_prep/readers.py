"""Split inputs (JSONL, text, parquet, saved Hugging Face datasets) into work units and read their documents.

The main process only cuts inputs into units: byte ranges of line files, batches of table rows, and, as a
compressed stream cannot be cut by byte ranges, runs of its lines decompressed in order. Reading, parsing
and checking a unit's records happens where it is encoded, in a worker. Bad input never stops a run and is
never dropped silently: every record read counts in `documents_in`, every rejected one is counted by reason
with the file and line of its first examples, so that `documents_in == written + rejected` once the consumer
has counted what it wrote. Which files are read at all is decided up front, in `data_prep.inputs`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.inputs import STREAM_ERRORS, Inputs, Source, open_stream

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
    """One worker task: bytes `start:stop` of a JSONL or text file, the decompressed lines `data` of a
    compressed one, or a batch of a table's text values.

    `first` is the line number at `start` (1-based), or the row of the batch's first value (0-based).
    """

    file: str
    fmt: str  # "jsonl", "text" or "table"
    first: int
    start: int = 0
    stop: int = 0
    values: pa.Array | None = None
    data: bytes | None = None


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

    def nothing_written(self, found: Inputs) -> str:
        """Why a run wrote nothing, in one line: its rejected records and skipped files by reason."""
        skipped = found.skipped
        parts = [
            f"{len(found.sources)} file(s) read, {self.documents_in} records in, {self.rejected} rejected"
        ]
        for reason in sorted(self.reasons):
            first = self.examples[reason][0]
            where = first["file"] if first["line"] is None else f"{first['file']}:{first['line']}"
            parts.append(f"{reason}: {self.reasons[reason]} (first: {where})")
        for reason, count in sorted(Counter(entry["reason"] for entry in skipped).items()):
            first = next(entry["path"] for entry in skipped if entry["reason"] == reason)
            parts.append(f"{count} file(s) skipped as {reason} (first: {first})")
        return "nothing written: " + "; ".join(parts)


def iter_documents(sources: Iterable[Source], counter: RejectCounter, text_field: str = "text"):
    """Yield the non-empty, valid documents of all sources, in a deterministic order."""
    for unit in iter_units(sources, counter, text_field, UNIT_RECORDS):
        texts, lines, rejects = read_unit(unit, text_field)
        counter.count(unit.file, len(texts) + len(rejects), rejects)
        yield from (Document(text, unit.file, line) for text, line in zip(texts, lines, strict=True))


def iter_units(sources: Iterable[Source], counter: RejectCounter, text_field: str, records: int):
    """Cut all sources into units of `records` lines (table rows) each, in reading order.

    A source that fails although it was checked (changed or removed since) counts as one `unreadable_file`
    record.
    """
    for source in sources:
        path, fmt = source.path, source.fmt
        try:
            if source.compression:
                yield from _stream_units(source, records, counter)
            elif fmt in ("jsonl", "text"):
                yield from _line_units(path, fmt, records)
            elif fmt == "parquet":
                yield from _parquet_units(path, text_field, records)
            else:
                yield from _hf_units(path, text_field, records)
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


def _stream_units(source: Source, records: int, counter: RejectCounter) -> Iterator[Unit]:
    """Units of `records` lines, cut as `_line_units` cuts, that carry their bytes.

    A corrupt or truncated stream ends the file: the whole records before the damage are read, and the rest
    counts as one `corrupt_file` record at the line where it starts. A text block not yet ended by a blank
    line may be cut short, so it belongs to the rest.
    """
    file, fmt, first, lines = str(source.path), source.fmt, 1, []
    with open_stream(source) as handle:
        try:
            for line in handle:
                lines.append(line)
                if len(lines) >= records and (fmt != "text" or not line.strip()):
                    yield Unit(file, fmt, first, data=b"".join(lines))
                    first, lines = first + len(lines), []
        except STREAM_ERRORS as exc:
            if fmt == "text":
                lines = lines[: max((i + 1 for i, line in enumerate(lines) if not line.strip()), default=0)]
            counter.count(file, 1, [("corrupt_file", first + len(lines), f"{type(exc).__name__}: {exc}")])
    if lines:
        yield Unit(file, fmt, first, data=b"".join(lines))


def _lines(unit: Unit) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline) of a unit's bytes."""
    data = unit.data
    if data is None:
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
