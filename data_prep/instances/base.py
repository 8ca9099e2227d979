"""What an instance type is, and how instances are stored.

An instance type turns documents of the tokenized shards (their sentences, as token-id arrays) into
training instances, each a dict of 1-D integer arrays named by the type's `fields`: per document with
`build`, or a batch of documents at once with `build_batch` (what the driver calls; by default it loops
over `build`, and a type whose work vectorizes, such as BERT's masking, overrides it). Everything random
comes from the generator it is handed, which the driver seeds per task: the output depends on nothing
else, so 1 worker and N workers write the same bytes.

Storage: every field of an output shard is a megatron-core indexed dataset of its own,
`{shard}.{field}.bin/.idx`, one item per instance (a scalar such as a pair label is a 1-item array), so a
training run memory-maps it and reads instance i of every field without unpickling anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset
from pydantic import BaseModel, ConfigDict

from plmscale.data.masking import word_start_table
from plmscale.tokenizer import Tokenizer

_REGISTRY: dict[str, type[InstanceType]] = {}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Vocabulary:
    """What instance types need to know of the tokenizer, precomputed once per worker."""

    def __init__(self, tokenizer: Tokenizer):
        self.size = tokenizer.vocab_size
        self.pieces = [tokenizer.id_to_piece(i) for i in range(self.size)]
        self.word_start = word_start_table(tokenizer)
        self.cls_id, self.sep_id = tokenizer.cls_id, tokenizer.sep_id
        self.mask_id, self.pad_id = tokenizer.mask_id, tokenizer.pad_id


class DocumentSource:
    """Random access to the documents of a split's shards (memory-mapped): instance types that pair a
    document with another one (NSP) draw it from here."""

    def __init__(self, prefixes: list[str]):
        self.datasets = [IndexedDataset(prefix) for prefix in prefixes]
        counts = [len(ds.document_indices) - 1 for ds in self.datasets]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, doc: int) -> tuple[IndexedDataset, int]:
        shard = int(np.searchsorted(self.offsets, doc, side="right")) - 1
        return self.datasets[shard], doc - int(self.offsets[shard])

    def sentences(self, doc: int) -> list[np.ndarray]:
        return self.documents(range(doc, doc + 1))[0]

    def _per_shard(self, docs: range) -> Iterator[tuple[IndexedDataset, np.ndarray]]:
        """(dataset, sentence bounds of the documents of `docs` in it), shard by shard."""
        doc = docs.start
        while doc < docs.stop:
            ds, local = self._locate(doc)
            count = min(docs.stop - doc, len(ds.document_indices) - 1 - local)
            yield ds, ds.document_indices[local : local + count + 1]
            doc += count

    def block(self, docs: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Documents `docs` read with one read per shard: their tokens back to back, every sentence's
        length, and where each document's sentences start in those lengths (and where the last ends)."""
        tokens, lengths, bounds = [], [], [np.zeros(1, dtype=np.int64)]
        for ds, doc_bounds in self._per_shard(docs):
            shard_lengths = ds.sequence_lengths[doc_bounds[0] : doc_bounds[-1]].astype(np.int64)
            if len(shard_lengths):
                pointer = int(ds.index.sequence_pointers[doc_bounds[0]])
                tokens.append(ds.bin_reader.read(ds.index.dtype, int(shard_lengths.sum()), pointer))
            bounds.append(doc_bounds[1:] - doc_bounds[0] + sum(map(len, lengths)))
            lengths.append(shard_lengths)
        empty = np.zeros(0, dtype=np.int64)
        return (
            np.concatenate([empty, *tokens]).astype(np.int64),
            np.concatenate([empty, *lengths]),
            np.concatenate(bounds),
        )

    def documents(self, docs: range) -> list[list[np.ndarray]]:
        """The sentences of documents `docs` (views of one block read)."""
        tokens, lengths, bounds = self.block(docs)
        ends = np.cumsum(lengths).tolist()
        sentences = [tokens[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
        bounds = bounds.tolist()
        return [sentences[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    def batches(self, docs: range, max_tokens: int) -> list[range]:
        """`docs` cut into runs of whole documents of at most `max_tokens` tokens (at least one document
        each): what a worker holds in memory at once, whatever the documents' sizes."""
        tokens = []
        for ds, bounds in self._per_shard(docs):
            running = np.cumsum(ds.sequence_lengths[bounds[0] : bounds[-1]], dtype=np.int64)
            tokens.extend(np.diff(np.concatenate([[0], running])[bounds - bounds[0]]).tolist())
        runs, first, size = [], docs.start, 0
        for doc, count in zip(docs, tokens, strict=True):
            if doc > first and size + count > max_tokens:
                runs.append(range(first, doc))
                first, size = doc, 0
            size += count
        return runs + [range(first, docs.stop)] if len(docs) else runs


@dataclass(frozen=True)
class Instances:
    """A batch of built instances, each field's items back to back: what a task writes in one go."""

    values: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]  # per field, each instance's item length
    per_document: np.ndarray  # instances each document gave, in document order

    @classmethod
    def of_documents(cls, documents: list[list[dict[str, np.ndarray]]], fields: dict) -> Instances:
        flat = [instance for document in documents for instance in document]
        return cls(
            {f: np.concatenate([i[f] for i in flat] or [np.zeros(0, dtype)]) for f, dtype in fields.items()},
            {f: np.array([len(i[f]) for i in flat], dtype=np.int64) for f in fields},
            np.array([len(document) for document in documents], dtype=np.int64),
        )

    def __len__(self) -> int:
        return int(self.per_document.sum())

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Instance `index`, as `build` would have returned it."""
        item = {}
        for field, values in self.values.items():
            ends = np.cumsum(self.lengths[field])
            item[field] = values[ends[index] - self.lengths[field][index] : ends[index]]
        return item


def field_values(ds: IndexedDataset) -> np.ndarray:
    """Every item of a field back to back (a memory-mapped view, no copy): what statistics read."""
    return ds.bin_reader.read(ds.index.dtype, int(ds.sequence_lengths.sum()), 0)


def sentence_chunks(sentences: list[np.ndarray], budget: int) -> list[list[np.ndarray]]:
    """Greedily pack whole sentences into runs of at most `budget` tokens. A sentence longer than the
    budget is first cut into budget-sized pieces, so a long document gives several chunks, never none."""
    pieces = [s[i : i + budget] for s in sentences for i in range(0, len(s), budget)]
    chunks, current, size = [], [], 0
    for piece in pieces:
        if current and size + len(piece) > budget:
            chunks.append(current)
            current, size = [], 0
        current.append(piece)
        size += len(piece)
    return chunks + [current] if current else chunks


class InstanceType:
    """Subclass, set `name`, `fields` (field -> numpy dtype) and `Params`, implement `build`; register with
    `@register`. `statistics` summarizes a built instance set for `plmscale prep stats`."""

    name: ClassVar[str]
    fields: ClassVar[dict[str, type[np.integer]]]
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params, vocab: Vocabulary):
        self.params, self.vocab = params, vocab

    def build(
        self, doc: int, source: DocumentSource, rng: np.random.Generator
    ) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError

    def build_batch(self, docs: range, source: DocumentSource, rng: np.random.Generator) -> Instances:
        return Instances.of_documents([self.build(doc, source, rng) for doc in docs], self.fields)

    @classmethod
    def statistics(cls, instances: dict[str, IndexedDataset], vocab: Vocabulary) -> dict[str, float]:
        """Figures to check against the paper (masked fraction, span length, pair balance, ...)."""
        raise NotImplementedError


def register(cls: type[InstanceType]) -> type[InstanceType]:
    if cls.name in _REGISTRY:
        raise ValueError(f"instance type {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def instance_type(name: str) -> type[InstanceType]:
    import data_prep.instances  # noqa: F401 - imports every type module, which registers itself

    if name not in _REGISTRY:
        raise KeyError(f"unknown objective {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available() -> list[str]:
    import data_prep.instances  # noqa: F401

    return sorted(_REGISTRY)


def params_help() -> str:
    """Each objective's `--param` keys with their defaults, read off the instance types' parameter models."""
    objectives: dict[type[Params], list[str]] = {}
    for name in available():
        objectives.setdefault(instance_type(name).Params, []).append(name)
    lines = ["--param KEY=VALUE keys by objective, [default]:"]
    for params, names in objectives.items():
        lines.append(f"  {', '.join(names)}:")
        for key, field in params.model_fields.items():
            default = field.get_default(call_default_factory=True)
            shown = round(default, 6) if isinstance(default, float) else default
            lines.append(f"    {key} [{shown}]" + (f"  {field.description}" if field.description else ""))
    return "\n".join(lines)
