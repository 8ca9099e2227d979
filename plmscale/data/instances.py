"""Pre-masked instances written by `plmscale prep instances`, memory-mapped, and the batches made of them.

An instance set is a directory of shards `inst_NNNNN.{field}.bin/.idx` (megatron-core indexed datasets, one
item per instance) and `manifest.json`, which lists every file with its sha256: with `verify`, a corrupt
or truncated file is named, never read. Training on instances masks nothing: the masks are the ones
written offline (static masking; the dupe factor gives each document several), and each epoch visits the
instances in a permutation seeded by (seed, epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from plmscale.data.loader import SampleOrder
from plmscale.manifest import read_manifest, verify_file
from plmscale.objectives import IGNORE_INDEX, Objective
from plmscale.tokenizer import PAD_ID

if TYPE_CHECKING:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

FORMAT = "plmscale-instances/2"
# Fields holding token ids, bounds-checked against the vocabulary on every read.
TOKEN_FIELDS = ("tokens", "mask_labels", "source", "target")


class InstanceSetError(ValueError):
    """An instance directory that is incomplete, corrupt or of another format."""


def load_instance_manifest(directory: str | Path, verify: bool = True) -> dict:
    """Read an instance directory's manifest; with `verify`, check every file's sha256."""
    manifest = read_manifest(
        directory, FORMAT, "build the instances with `plmscale prep instances`", InstanceSetError
    )
    if verify:
        for shard in manifest["shards"]:
            for name, sha256 in shard["files"].items():
                verify_file(Path(manifest["directory"]) / name, sha256, InstanceSetError)
    return manifest


def open_shard(directory: Path, prefix: str, fields: list[str]) -> dict[str, IndexedDataset]:
    """One indexed dataset per field (`IndexedDataset` cannot map an empty file: a field is empty only when
    the shard holds no instance, and such a shard is never opened)."""
    with warnings.catch_warnings():  # imported when read (seconds to import)
        warnings.simplefilter("ignore")  # megatron-core warns that Transformer Engine and Apex are absent
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return {field: IndexedDataset(str(directory / f"{prefix}.{field}")) for field in fields}


class InstanceSet:
    """Random access to instance i of every field, across the shards, in the order they were built."""

    def __init__(self, directory: str | Path, verify: bool = True):
        self.manifest = load_instance_manifest(directory, verify)
        self.fields = list(self.manifest["fields"])
        shards = [s for s in self.manifest["shards"] if s["instances"]]
        root = Path(self.manifest["directory"])
        self.shards = [open_shard(root, shard["prefix"], self.fields) for shard in shards]
        self.offsets = np.concatenate([[0], np.cumsum([s["instances"] for s in shards])]).astype(np.int64)
        self.prefixes = [root / shard["prefix"] for shard in shards]
        self.vocab_size = self.manifest["tokenizer"]["vocab_size"]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"instance {index} of {len(self)}")
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        local = index - int(self.offsets[shard])
        # copies: a view would outlive the memory map it points into if the set were dropped first
        instance = {field: np.array(ds[local]) for field, ds in self.shards[shard].items()}
        self._check_bounds(instance, shard, local)
        return instance

    def _check_bounds(self, instance: dict[str, np.ndarray], shard: int, local: int) -> None:
        """Token ids inside the vocabulary, mask positions inside the instance: with checksums off, corrupt
        bytes stop the run naming the file instead of training (an id past the vocabulary is dropped by a
        vocabulary-parallel embedding) or failing far from their cause."""
        for field in TOKEN_FIELDS:
            values = instance.get(field)
            if values is not None and values.size and not 0 <= values.min() <= values.max() < self.vocab_size:
                raise InstanceSetError(
                    f"{self.prefixes[shard]}.{field}.bin: instance {local} holds token ids outside the "
                    f"vocabulary [0, {self.vocab_size}): the file is corrupt (data.verify_checksums checks it)"
                )
        positions, length = instance.get("mask_positions"), len(instance.get("tokens", ()))
        if positions is not None and positions.size and not 0 <= positions.min() <= positions.max() < length:
            raise InstanceSetError(
                f"{self.prefixes[shard]}.mask_positions.bin: instance {local} masks positions outside its "
                f"{length} tokens: the file is corrupt (data.verify_checksums checks it)"
            )


class InstanceBatchSource(SampleOrder):
    """MLM batches from pre-masked instances, padded to `seq_length`: labels are IGNORE_INDEX except at
    the masked positions, so the `mlm` objective's loss applies unchanged; `token_type_ids` are the
    segments. Sets with pair labels (nsp, sop) add `pair_label`, one per sequence, which the pair
    objectives (mlm_nsp, mlm_sop) train on and `mlm` ignores; the `objective`, if given, adds what else it
    reads of an instance (`Objective.instance_sample`: SpanBERT's span boundaries). With `units`, ERNIE
    sets (with `span_levels`) add the entity and phrase units for held-out scoring (`unit_positions`)."""

    def __init__(
        self,
        instances: InstanceSet,
        seq_length: int,
        micro_batch_size: int,
        dp_size: int,
        dp_rank: int,
        seed: int,
        shuffle: bool = True,
        objective: Objective | None = None,
        units: bool = False,
    ):
        missing = {"tokens", "mask_positions", "mask_labels"} - set(instances.fields)
        if missing:
            raise InstanceSetError(
                f"{instances.manifest['directory']}: objective {instances.manifest['objective']!r} has no "
                f"{sorted(missing)}; MLM training needs BERT-style instances"
            )
        longest = instances.manifest["counts"]["longest_instance"]
        if longest > seq_length:
            raise InstanceSetError(
                f"{instances.manifest['directory']}: instances of up to {longest} tokens exceed "
                f"data.seq_length={seq_length}"
            )
        if len(instances) == 0:
            raise InstanceSetError(f"{instances.manifest['directory']}: holds no instance")
        super().__init__(len(instances), micro_batch_size, dp_size, dp_rank, seed, shuffle)
        self.instances, self.seq_length, self.objective = instances, seq_length, objective
        self.units = units and "span_levels" in instances.fields

    def sample(self, index: int, position: int) -> dict[str, np.ndarray]:
        instance = self.instances[index]
        length = len(instance["tokens"])
        input_ids = np.full(self.seq_length, PAD_ID, dtype=np.int64)
        input_ids[:length] = instance["tokens"]
        attention_mask = np.zeros(self.seq_length, dtype=np.int64)
        attention_mask[:length] = 1
        token_type_ids = np.zeros(self.seq_length, dtype=np.int64)
        if "segments" in instance:
            token_type_ids[:length] = instance["segments"]
        labels = np.full(self.seq_length, IGNORE_INDEX, dtype=np.int64)
        labels[instance["mask_positions"].astype(np.int64)] = instance["mask_labels"]
        sample = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "labels": labels,
        }
        if "pair_label" in instance:
            sample["pair_label"] = instance["pair_label"][0].astype(np.int64)
        if self.units:
            sample |= unit_positions(instance, self.seq_length)
        return sample if self.objective is None else self.objective.instance_sample(sample, instance)


def unit_positions(instance: dict[str, np.ndarray], seq_length: int) -> dict[str, np.ndarray]:
    """`unit_ids`: 1 + the index of the entity or phrase unit covering each position, 0 elsewhere (basic
    units are not counted: they are what token accuracy scores); `unit_levels`: that unit's ERNIE level
    (plmscale.data.masking.ERNIE_LEVELS: 1 phrase, 2 entity), 0 elsewhere."""
    spans = instance["spans"].astype(np.int64).reshape(-1, 2)
    levels = instance["span_levels"].astype(np.int64)
    unit_ids, unit_levels = np.zeros(seq_length, dtype=np.int64), np.zeros(seq_length, dtype=np.int64)
    for unit, ((start, end), level) in enumerate(zip(spans.tolist(), levels.tolist(), strict=True)):
        if level:
            unit_ids[start:end], unit_levels[start:end] = unit + 1, level
    return {"unit_ids": unit_ids, "unit_levels": unit_levels}
