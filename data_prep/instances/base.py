"""What an instance type is, and how instances are stored.

An instance type turns one document of the tokenized shards (its sentences, as token-id arrays) into zero
or more training instances, each a dict of 1-D integer arrays named by the type's `fields`. Everything
random comes from the generator it is handed, which the driver seeds by (seed, dupe, document index): the
output depends on nothing else, so 1 worker and N workers write the same bytes.

Storage: every field of an output shard is a megatron-core indexed dataset of its own,
`{shard}.{field}.bin/.idx`, one item per instance (a scalar such as a pair label is a 1-item array), so a
training run memory-maps it and reads instance i of every field without unpickling anything.
"""

from __future__ import annotations

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

    def sentences(self, doc: int) -> list[np.ndarray]:
        shard = int(np.searchsorted(self.offsets, doc, side="right")) - 1
        ds = self.datasets[shard]
        local = doc - int(self.offsets[shard])
        start, end = ds.document_indices[local], ds.document_indices[local + 1]
        return [ds[i].astype(np.int64) for i in range(start, end)]


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
