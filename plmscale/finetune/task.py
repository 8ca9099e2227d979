"""A downstream task on disk: `train` and `dev` splits as GLUE-format TSV or JSON Lines, in one directory.

    TASK/train.tsv  TASK/dev.tsv       tab-separated, no quoting (GLUE's format); a header row names the
                                       columns, or `header: false` and the columns are 0-based indices
    TASK/train.jsonl TASK/dev.jsonl    one JSON object a line; the columns are its keys
    TASK/task.json                     optional: the `TaskSpec` fields below (the command line overrides them)

A bad row (wrong number of fields, empty text, a regression label that is not a number, a class that the
train split never had or task.json does not list, invalid UTF-8 or JSON) is an error naming its file and
line, or with `strict=False` is rejected and counted by reason with its first lines: never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from plmscale.errors import UserError

SPLITS = ("train", "dev")
FORMATS = (".tsv", ".jsonl")
SPEC_FILE = "task.json"
EXAMPLES_KEPT = 3  # lines listed per rejection reason


class TaskSpec(BaseModel):
    """Which columns hold the texts and the label, and what the label is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["classification", "regression"] = "classification"
    text_a: str = "sentence"
    text_b: str | None = None  # set for a sentence-pair task
    label: str = "label"
    labels: list[str] | None = None  # classification: the classes in order (default: train's, sorted)
    header: bool = True  # TSV only


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: str | float  # the class name, or the regression target
    line: int


@dataclass
class Rejections:
    """Rejected rows by reason: a count and the first few `file:line (detail)`."""

    by_reason: dict[str, dict] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        entry = self.by_reason.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_KEPT:
            entry["examples"].append(where)

    @property
    def total(self) -> int:
        return sum(entry["count"] for entry in self.by_reason.values())


@dataclass(frozen=True)
class Task:
    spec: TaskSpec
    files: dict[str, Path]
    examples: dict[str, list[Example]]
    rejected: dict[str, Rejections]
    labels: list[str] | None  # classification: class index -> name

    @property
    def pair(self) -> bool:
        return self.spec.text_b is not None


class BadRow(ValueError):
    """(reason, detail): the reason is what rejections are counted by."""


def _split_file(directory: Path, split: str) -> Path:
    found = [directory / f"{split}{ext}" for ext in FORMATS if (directory / f"{split}{ext}").is_file()]
    if len(found) != 1:
        what = (
            "both " + " and ".join(p.name for p in found)
            if found
            else "no " + " or ".join(f"{split}{ext}" for ext in FORMATS)
        )
        raise UserError(f"task directory {directory} has {what}")
    return found[0]


def load_spec(directory: Path, overrides: dict) -> TaskSpec:
    raw: dict = {}
    spec_path = directory / SPEC_FILE
    if spec_path.is_file():
        try:
            raw = json.loads(spec_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{spec_path}: not JSON ({err})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{spec_path}: must hold a JSON object of {sorted(TaskSpec.model_fields)}")
    raw |= {key: value for key, value in overrides.items() if value is not None}
    try:
        return TaskSpec.model_validate(raw)
    except ValidationError as err:
        problem = err.errors()[0]
        key = ".".join(str(part) for part in problem["loc"])
        raise UserError(
            f"{spec_path if spec_path.is_file() else directory}: {key}: {problem['msg']}"
        ) from None


def _text(value, column: str) -> str:
    if not isinstance(value, str):
        raise BadRow("text is not a string", f"column {column!r} holds {type(value).__name__}")
    if not value.strip():
        raise BadRow("empty text", f"column {column!r}")
    return value


def _label(value, spec: TaskSpec) -> str | float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRow("label is not a string or number", f"{value!r}")
    if spec.kind == "classification":
        text = str(value).strip()
        if not text:
            raise BadRow("empty label", f"column {spec.label!r}")
        return text
    try:
        target = float(value)
    except ValueError:
        raise BadRow("regression label is not a number", f"{value!r}") from None
    if not math.isfinite(target):
        raise BadRow("regression label is not finite", f"{value!r}")
    return target


def _rows(path: Path, spec: TaskSpec):
    """(line number, {column: value}) of each row, or (line number, BadRow)."""
    columns = None
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                yield number, BadRow("invalid UTF-8", f"byte {err.start}")
                continue
            if path.suffix == ".jsonl":
                if not line.strip():
                    yield number, BadRow("blank line", "")
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, BadRow("invalid JSON", err.msg)
                    continue
                yield (
                    number,
                    row if isinstance(row, dict) else BadRow("not a JSON object", type(row).__name__),
                )
                continue
            fields = line.split("\t")
            if columns is None and spec.header:
                columns = fields
                wanted = [spec.text_a, spec.text_b, spec.label]
                missing = [c for c in wanted if c is not None and c not in columns]
                if missing:
                    raise UserError(f"{path}:1: no column {missing[0]!r} in the header {columns}")
                continue
            if not line.strip():
                yield number, BadRow("blank line", "")
            elif columns is not None and len(fields) != len(columns):
                yield (
                    number,
                    BadRow("wrong number of fields", f"{len(fields)} fields, the header has {len(columns)}"),
                )
            else:
                yield number, dict(zip(columns or [str(i) for i in range(len(fields))], fields, strict=True))


def read_split(path: Path, spec: TaskSpec, strict: bool, labels: list[str] | None = None):
    """The split's examples and rejections; `labels`: the classes a row may have (None: any)."""
    if not spec.header and path.suffix == ".tsv":
        for name in (spec.text_a, spec.text_b, spec.label):
            if name is not None and not name.isdigit():
                raise UserError(f"{path}: without a header, columns are 0-based indices, not {name!r}")
    examples, rejected = [], Rejections()
    for number, row in _rows(path, spec):
        try:
            if isinstance(row, BadRow):
                raise row
            absent = [c for c in (spec.text_a, spec.text_b, spec.label) if c is not None and c not in row]
            if absent:
                raise BadRow("missing column", f"{absent[0]!r}")
            text_b = _text(row[spec.text_b], spec.text_b) if spec.text_b is not None else None
            example = Example(
                _text(row[spec.text_a], spec.text_a), text_b, _label(row[spec.label], spec), number
            )
            if labels is not None and example.label not in labels:
                raise BadRow("label not among the task's labels", f"{example.label!r} not in {labels}")
        except BadRow as bad:
            reason, detail = bad.args
            detail = f" ({detail})" if detail else ""
            if strict:
                raise UserError(f"{path}:{number}: {reason}{detail}") from None
            rejected.add(reason, f"{path}:{number}{detail}")
            continue
        examples.append(example)
    if not examples:
        raise UserError(
            f"{path}: no usable rows" + (f" ({rejected.total} rejected)" if rejected.total else "")
        )
    return examples, rejected


def _class_order(names: set[str]) -> list[str]:
    """Numeric class names in numeric order (2 before 10), others alphabetically."""
    return sorted(names, key=lambda n: (0, float(n), n) if _is_number(n) else (1, 0.0, n))


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def file_digest(path: Path) -> str:
    """The SHA-256 of a split's bytes: what a fine-tuned model records of the task it learned."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_task(directory: str | Path, overrides: dict | None = None, strict: bool = True) -> Task:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"task directory not found: {directory}")
    spec = load_spec(directory, overrides or {})
    files = {split: _split_file(directory, split) for split in SPLITS}
    train, train_rejected = read_split(files["train"], spec, strict, spec.labels)
    labels = None
    if spec.kind == "classification":
        labels = spec.labels or _class_order({e.label for e in train})
        if len(labels) < 2:
            raise UserError(f"{files['train']}: a classification task needs 2 or more labels, found {labels}")
    dev, dev_rejected = read_split(files["dev"], spec, strict, labels)
    return Task(
        spec, files, {"train": train, "dev": dev}, {"train": train_rejected, "dev": dev_rejected}, labels
    )
