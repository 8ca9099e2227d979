"""A downstream task made from the embedded corpus, so fine-tuning runs offline: which standard-library
package a docstring paragraph comes from (`email`, `tkinter`, `asyncio`, ...).

Examples are the paragraphs of each docstring (whitespace collapsed, at least `min_chars` characters),
labelled with the top-level package of the docstring's `source`; private modules (`_pydecimal`) are left
out. Whole docstrings go to train or dev by a hash of their source and text, so the paragraphs of one
docstring never straddle the split. The `packages` most frequent packages are kept, balanced: every class
has as many train (and dev) examples as the smallest, so chance is 1 / packages. Everything is ordered by
hashes, never by a random generator: the same corpus always gives the same bytes.

The pre-training corpus contains these texts, so a pre-trained model has seen them (not their labels):
fine for a demo of the pipeline, not a measure of generalization to unseen text.

    plmscale prep task --corpus data/corpus.jsonl --out data/task_package
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

from data_prep import UserError


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def _paragraphs(text: str, min_chars: int) -> list[str]:
    paragraphs = (" ".join(p.split()) for p in text.split("\n\n"))
    return [p for p in paragraphs if len(p) >= min_chars]


def read_corpus(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"corpus not found: {path} (write it with `plmscale prep corpus`)")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not JSON ({err.msg})") from None
            if not isinstance(record, dict) or not all(
                isinstance(record.get(k), str) for k in ("text", "source")
            ):
                raise UserError(
                    f"{path}:{number}: needs string fields 'text' and 'source' (`plmscale prep corpus`)"
                )
            records.append(record)
    return records


def write_package_task(
    corpus: str | Path, out: str | Path, packages: int = 8, dev_fraction: float = 0.2, min_chars: int = 40
) -> dict:
    """Write `out`/train.tsv, dev.tsv and task.json; return the counts."""
    corpus, out = Path(corpus), Path(out)
    examples = {"train": defaultdict(list), "dev": defaultdict(list)}  # split -> package -> [(hash, text)]
    for record in read_corpus(corpus):
        package = record["source"].split(".")[0]
        if package.startswith("_"):
            continue
        doc_hash = _hash(record["source"], record["text"])
        split = "dev" if int(doc_hash[:8], 16) < dev_fraction * 16**8 else "train"
        for paragraph in _paragraphs(record["text"], min_chars):
            examples[split][package].append((_hash(doc_hash, paragraph), paragraph))
    totals = {p: len(examples["train"][p]) + len(examples["dev"][p]) for p in examples["train"]}
    labels = sorted(sorted(totals, key=lambda p: (-totals[p], p))[:packages])
    if len(labels) < 2:
        raise UserError(
            f"{corpus}: {len(labels)} package(s) with paragraphs of >= {min_chars} characters; need 2"
        )
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, by_package in examples.items():
        per_class = min(len(by_package[p]) for p in labels)
        if per_class == 0:
            raise UserError(
                f"{corpus}: no {split} examples of some package; raise --dev-fraction or lower --packages"
            )
        rows = sorted((h, text, p) for p in labels for h, text in sorted(by_package[p])[:per_class])
        lines = ["sentence\tlabel\n"] + [f"{text}\t{package}\n" for _, text, package in rows]
        (out / f"{split}.tsv").write_text("".join(lines), encoding="utf-8")
        counts[split] = {"examples": len(rows), "per_class": per_class}
    spec = {"kind": "classification", "text_a": "sentence", "label": "label", "labels": labels}
    (out / "task.json").write_text(json.dumps(spec, indent=2) + "\n")
    return {"labels": labels, "counts": counts, "directory": str(out)}
