"""`plmscale prep instances`: tokenized shards -> pre-masked instances, in parallel, resumable.

The work is cut into fixed tasks, (dupe, a range of `docs_per_task` documents). A task writes its own
output shard `inst_NNNNN.{field}.bin/.idx`, then `inst_NNNNN.done.json` with the files' sha256 and its
counts (atomically, after the files). A task's randomness comes from one generator seeded by (seed,
dupe, its first document), and the tasks are fixed by `docs_per_task` (part of the configuration), so
the worker count never changes a byte. A worker builds a task in batches of about `BATCH_TOKENS` source
tokens, each masked in one vectorized pass.

A restart keeps every task whose record was made by the same configuration and whose files still match
their sha256 (a mismatch is an error naming the file), rebuilds the others (a killed task's partial files
are overwritten), and writes `manifest.json` last. Memory is bounded: the main process keeps one record
per task, a worker one task's index and one batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from data_prep import UserError
from data_prep.instances.base import DocumentSource, InstanceType, Vocabulary, instance_type
from plmscale.data.instances import FORMAT
from plmscale.manifest import (
    MANIFEST,
    ManifestError,
    load_manifest,
    relative_path,
    split_prefixes,
    tokenizer_path,
    verify_file,
    write_manifest,
)
from plmscale.tokenizer import Tokenizer, file_sha256

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core warns that Transformer Engine and Apex are absent
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

_TASK_FILE = re.compile(r"inst_(\d{5,})\.")
BATCH_TOKENS = 1 << 20  # source tokens a worker builds and masks at once: its memory, whatever the documents
_worker: dict = {}


class Task(NamedTuple):
    number: int
    dupe: int
    first: int  # documents [first, end) of the split
    end: int

    @property
    def prefix(self) -> str:
        return f"inst_{self.number:05d}"


def build_instances(
    shards_dir: str | Path,
    objective: str,
    output_dir: str | Path,
    *,
    params: dict | None = None,
    dupe_factor: int = 1,
    seed: int = 1234,
    workers: int = 1,
    split: str = "train",
    docs_per_task: int = 2000,
    progress: bool = True,
) -> dict:
    """Build (or finish building) the instance set of `objective` in `output_dir`; return its manifest."""
    started = time.perf_counter()
    source_manifest = load_manifest(shards_dir, verify=True)
    prefixes = split_prefixes(source_manifest, split)
    tokenizer = Tokenizer(tokenizer_path(source_manifest))
    if tokenizer.sha256 != source_manifest["tokenizer"]["sha256"]:
        raise UserError(f"tokenizer {tokenizer.path} changed since the shards in {shards_dir} were built")
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    source_dir = source_manifest.pop("directory")
    (out / MANIFEST).unlink(missing_ok=True)  # a directory with a manifest holds a finished run
    params = _prepare_params(objective, dict(params or {}), out, prefixes, tokenizer)
    builder = _instantiate(objective, params, Vocabulary(tokenizer))

    n_docs = len(DocumentSource(prefixes))
    ranges = [(first, min(first + docs_per_task, n_docs)) for first in range(0, n_docs, docs_per_task)]
    tasks = [
        Task(dupe * len(ranges) + i, dupe, first, end)
        for dupe in range(dupe_factor)
        for i, (first, end) in enumerate(ranges)
    ]
    config = {
        "objective": objective,
        "params": params,
        "seed": seed,
        "dupe_factor": dupe_factor,
        "docs_per_task": docs_per_task,
        "batch_tokens": BATCH_TOKENS,  # a task's batches share its generator: their size changes the bytes
        "split": split,
        # what the source is, not where (the manifest adds where: paths relative to this directory)
        "source": {"manifest_sha256": file_sha256(Path(source_dir) / MANIFEST)},
        "tokenizer": {k: v for k, v in source_manifest["tokenizer"].items() if k != "path"},
        # ERNIE's entity list and phrase table: what they hold changes the instances
        "unit_files": {
            name: file_sha256(params[name]) for name in ("entities", "phrases") if params.get(name)
        },
    }
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    _remove_stale_tasks(out, len(tasks))
    records = {task.number: _finished_record(out, task, key) for task in tasks}
    todo = [task for task in tasks if records[task.number] is None]

    worker_args = (objective, json.dumps(params), prefixes, str(tokenizer.path), str(out), seed, key)
    if workers == 1:
        _init_worker(*worker_args)
    with (
        Pool(workers, _init_worker, worker_args) if workers > 1 else nullcontext() as pool,
        tqdm(total=n_docs * dupe_factor, unit="doc", disable=not progress, desc=objective) as bar,
    ):
        bar.update(sum(r["counts"]["documents_in"] for r in records.values() if r))
        for record in pool.imap_unordered(_run_task, todo) if pool else map(_run_task, todo):
            records[record["task"]] = record
            bar.update(record["counts"]["documents_in"])

    manifest = {
        "format": FORMAT,
        **config,
        "source": config["source"]
        | {"directory": relative_path(source_dir, out), "manifest": source_manifest},
        "tokenizer": config["tokenizer"] | {"path": relative_path(tokenizer.path, out)},
        "fields": {field: np.dtype(dtype).name for field, dtype in builder.fields.items()},
        "counts": _total_counts([records[t.number]["counts"] for t in tasks]),
        "shards": [
            {key: records[t.number][key] for key in ("prefix", "dupe", "documents", "instances", "files")}
            for t in tasks
        ],
    }
    write_manifest(out, manifest)
    seconds = time.perf_counter() - started
    return manifest | {"directory": str(out), "seconds": seconds, "tasks_kept": len(tasks) - len(todo)}


def _prepare_params(
    objective: str, params: dict, out: Path, prefixes: list[str], tokenizer: Tokenizer
) -> dict:
    """Validated params, every default filled in; ERNIE's phrase table comes from a first pass here."""
    try:
        cls = instance_type(objective)
        validated = cls.Params.model_validate(params)
    except KeyError as exc:
        raise UserError(exc.args[0]) from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"objective {objective!r}: {problems}") from None
    params = validated.model_dump()
    if (params.get("masking") or getattr(cls, "preset", None)) == "ernie":
        from data_prep.phrases import PhraseTable

        if not params.get("entities"):
            raise UserError("ERNIE masking needs an entity list: --entities FILE")
        entities = Path(params["entities"])
        if not entities.is_file():  # before the phrase pass, which takes a while
            raise UserError(f"--entities {entities}: no such file")
        if not entities.read_text(encoding="utf-8").strip():
            raise UserError(f"--entities {entities}: holds no entity (one entity a line)")
        params["entities"] = str(entities.resolve())
        params["tokenizer"] = str(tokenizer.path.resolve())
        if params.get("phrases") is None:  # collocations of the words the masker will see
            from data_prep.words import SEGMENTERS

            vocab, word_starts = Vocabulary(tokenizer), SEGMENTERS[params.get("words") or "sentencepiece"]
            PhraseTable.build(prefixes, lambda tokens: word_starts(tokens, vocab)).save(out / "phrases.json")
            params["phrases"] = str(out / "phrases.json")
    return params


def _instantiate(objective: str, params: dict, vocab: Vocabulary) -> InstanceType:
    cls = instance_type(objective)
    try:
        return cls(cls.Params.model_validate(params), vocab)
    except (OSError, ValueError) as exc:
        raise UserError(f"objective {objective!r}: {exc}") from None


def _remove_stale_tasks(out: Path, n_tasks: int) -> None:
    """Files of tasks a previous run with more tasks left behind."""
    for path in out.iterdir():
        match = _TASK_FILE.match(path.name)
        if match and int(match.group(1)) >= n_tasks:
            path.unlink()


def _finished_record(out: Path, task: Task, key: str) -> dict | None:
    """The record of a task finished by a run of this configuration, its files verified; else None."""
    try:
        record = json.loads((out / f"{task.prefix}.done.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("key") != key:
        return None
    for name, sha256 in record["files"].items():
        try:
            verify_file(out / name, sha256)
        except ManifestError as exc:
            raise UserError(f"{exc}; delete {out / task.prefix}.done.json to rebuild that task") from None
    return record


def _init_worker(objective, params_json, prefixes, tokenizer_path, out_dir, seed, key) -> None:
    vocab = Vocabulary(Tokenizer(tokenizer_path))
    _worker.update(
        builder=_instantiate(objective, json.loads(params_json), vocab),
        source=DocumentSource(prefixes),
        out=Path(out_dir),
        seed=seed,
        key=key,
    )


def _run_task(task: Task) -> dict:
    """Build one task's instances into its shard, then write its record; return the record."""
    builder, source, out = _worker["builder"], _worker["source"], _worker["out"]
    (out / f"{task.prefix}.done.json").unlink(missing_ok=True)  # first: a record never outlives its files
    for stale in out.glob(f"{task.prefix}.*"):
        stale.unlink()
    fields = builder.fields
    main = "tokens" if "tokens" in fields else next(iter(fields))
    writers = {
        field: IndexedDatasetBuilder(str(out / f"{task.prefix}.{field}.bin"), dtype=dtype)
        for field, dtype in fields.items()
    }
    counts, rejected = Counter(), Counter()
    builder.counts = Counter()  # the type's own events (sentences cut, ...), if it counts any
    longest = 0
    rng = np.random.default_rng([_worker["seed"], task.dupe, task.first])
    for docs in source.batches(range(task.first, task.end), BATCH_TOKENS):
        batch = builder.build_batch(docs, source, rng)
        per_document = batch.per_document
        counts["documents_in"] += len(per_document)
        rejected["no_instance"] += int((per_document == 0).sum())
        counts["documents_out"] += int((per_document > 0).sum())
        counts["documents_split"] += int((per_document > 1).sum())
        counts["instances"] += len(batch)
        for field, writer in writers.items():
            _add_documents(writer, batch.values[field], batch.lengths[field], per_document[per_document > 0])
        counts["tokens"] += int(batch.lengths[main].sum())
        longest = max(longest, int(batch.lengths[main].max(initial=0)))
        if "mask_positions" in fields:
            counts["masked_tokens"] += int(batch.lengths["mask_positions"].sum())
    files = {}
    for field, writer in writers.items():
        writer.finalize(str(out / f"{task.prefix}.{field}.idx"))
        for suffix in (".bin", ".idx"):
            name = f"{task.prefix}.{field}{suffix}"
            files[name] = file_sha256(out / name)
    record = {
        "task": task.number,
        "key": _worker["key"],
        "prefix": task.prefix,
        "dupe": task.dupe,
        "documents": [task.first, task.end],
        "instances": counts["instances"],
        "files": files,
        "counts": dict(counts)
        | dict(builder.counts)
        | {"longest_instance": longest, "rejected": {k: v for k, v in rejected.items() if v}},
    }
    path = out / f"{task.prefix}.done.json"
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
    os.replace(path.with_suffix(".tmp"), path)
    return record


def _add_documents(writer: IndexedDatasetBuilder, values, item_lengths, items_per_document) -> None:
    """megatron-core's `add_document` for many documents at once: one write, then a document boundary
    after each source document's items (its `end_document`, which only records a boundary)."""
    writer.add_document(values, item_lengths.tolist())
    first = writer.document_indices.pop() - len(item_lengths)
    writer.document_indices.extend((first + np.cumsum(items_per_document)).tolist())


def _total_counts(counts: list[dict]) -> dict:
    total, rejected = Counter(), Counter()
    for task in counts:
        total.update({k: v for k, v in task.items() if k not in ("rejected", "longest_instance")})
        rejected.update(task["rejected"])
    for key in ("documents_in", "documents_out", "documents_split", "instances", "tokens"):
        total.setdefault(key, 0)
    longest = max((task["longest_instance"] for task in counts), default=0)
    return dict(sorted(total.items())) | {
        "longest_instance": longest,
        "rejected": dict(sorted(rejected.items())),
    }
