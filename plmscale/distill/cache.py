"""An offline cache of the teacher's top-k logits, for teachers too large to run beside the student: written
once by `plmscale distill-cache` (plmscale/distill/cache_command.py), read by a distillation run that names
it in `distill.teacher_cache` instead of running the teacher.

The samples a run trains on are a pure function of the recipe (plmscale/data/loader.py): position p of the
global sample order is one sample with its masks, drawn from (seed, p), whatever the batch size or the
layout. The cache is keyed by p, so a student of any layout (data-parallel size, micro-batch, TP, PP) reads
it, for as many steps as the positions it covers allow.

A directory of chunks of `chunk_samples` consecutive positions, `chunk_NNNNN.safetensors`, each holding
    offsets       [n + 1] int64   rows of position first + i: offsets[i]:offsets[i + 1]
    ids           [rows, k] int32 the teacher's top-k vocabulary ids at each target, best first
    logits        [rows, k]       their logits (float16, bfloat16 or float32)
    fingerprints  [n] int64       a hash of each sample's inputs and labels, checked on every read
one row per target of the sample, in the order of the objective's targets (the sample's positions whose
label is not ignored, in order); and `manifest.json`: the recipe fields the cache depends on, the files
with their sha256 and its own checksum (plmscale/manifest.py).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open

from plmscale.config import RunConfig
from plmscale.manifest import read_manifest, verify_file
from plmscale.objectives import IGNORE_INDEX, get_objective
from plmscale.tokenizer import file_sha256

FORMAT = "plmscale-teacher-cache/1"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# The batch fields a cache adds: the loss reads them (plmscale/distill/losses/logits.py).
TEACHER_TOP_K = IDS, LOGITS = ("teacher_top_ids", "teacher_top_logits")
# The sample's fields that the fingerprint covers: what the teacher read, and where its targets are.
_FINGERPRINTED = ("input_ids", "attention_mask", "token_type_ids", "labels")


class CacheError(ValueError):
    """A cache directory that is incomplete, corrupt, or not the one the recipe's run would see."""


def chunk_name(index: int) -> str:
    return f"chunk_{index:05d}.safetensors"


def fingerprints(batch: dict[str, torch.Tensor]) -> list[int]:
    """Per sample of a host batch, 64 bits of a hash of its inputs and labels."""
    fields = [batch[key].numpy() for key in _FINGERPRINTED if key in batch]
    digests = [
        hashlib.blake2b(b"".join(field[j].tobytes() for field in fields), digest_size=8).digest()
        for j in range(len(batch["labels"]))
    ]
    return [int.from_bytes(digest, "little", signed=True) for digest in digests]


def recipe_fields(cfg: RunConfig, shards_manifest: dict) -> dict:
    """What the teacher's top-k at position p depends on, keyed by the recipe key that sets it: the teacher,
    the data and tokenizer, the sequence length, the objective with its masking, the seed."""
    data, teacher = cfg.data, Path(cfg.distill.teacher)
    objective = get_objective(cfg.objective.name, cfg.objective.params, cfg.model)
    return {
        "distill.teacher": file_sha256(teacher / "model.safetensors"),
        "data.shards": file_sha256(Path(shards_manifest["directory"]) / "manifest.json"),
        "tokenizer": shards_manifest["tokenizer"]["sha256"],
        "data.train_split": data.train_split,
        "data.instances": file_sha256(Path(data.instances) / "manifest.json") if data.instances else None,
        "data.seq_length": data.seq_length,
        "objective.name": cfg.objective.name,
        "objective.params": objective.params.model_dump(mode="json"),
        "train.seed": cfg.train.seed,
    }


def load_cache_manifest(directory: str | Path, verify: bool) -> dict:
    """The manifest, checked against its own checksum; with `verify`, every chunk's sha256, without it its
    presence (a stat)."""
    manifest = read_manifest(directory, FORMAT, "write it with `plmscale distill-cache`", CacheError)
    for name, sha256 in manifest["files"].items():
        path = Path(manifest["directory"]) / name
        if verify:
            verify_file(path, sha256, CacheError)
        elif not path.is_file():
            raise CacheError(f"file missing: {path}")
    return manifest


def check_cache(cfg: RunConfig, shards_manifest: dict, verify: bool) -> None:
    """The cache holds the run's samples: written from the same recipe fields, covering every step."""
    key = f"distill.teacher_cache={cfg.distill.teacher_cache}"
    try:
        manifest = load_cache_manifest(cfg.distill.teacher_cache, verify)
    except CacheError as err:
        raise CacheError(f"{key}: {err}") from None
    recipe = recipe_fields(cfg, shards_manifest)
    for field, value in recipe.items():
        if manifest["recipe"][field] != value:
            raise CacheError(
                f"{key} was written for another {field}: {manifest['recipe'][field]!r}, the recipe's gives "
                f"{value!r}"
            )
    needed = cfg.train.train_steps * cfg.train.global_batch_size
    if needed > manifest["samples"]:
        raise CacheError(
            f"train.train_steps={cfg.train.train_steps} x train.global_batch_size="
            f"{cfg.train.global_batch_size} needs {needed} samples; {key} covers {manifest['samples']}"
        )


class TeacherCache:
    """Random access to the cached rows of any sample position."""

    def __init__(self, directory: str | Path):
        self.manifest = load_cache_manifest(directory, verify=False)  # verified before launch
        self.root = Path(self.manifest["directory"])
        self.chunk_samples, self.samples = self.manifest["chunk_samples"], self.manifest["samples"]
        self._open: OrderedDict[int, tuple] = OrderedDict()  # the last chunks read, their handles

    def _chunk(self, index: int) -> tuple:
        if index not in self._open:
            handle = safe_open(str(self.root / chunk_name(index)), framework="pt")
            self._open[index] = (handle, handle.get_tensor("offsets"), handle.get_tensor("fingerprints"))
            if len(self._open) > 2:
                self._open.popitem(last=False)
        return self._open[index]

    def rows(self, position: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(ids, logits) of the targets of sample `position`, and its fingerprint."""
        if not 0 <= position < self.samples:
            raise CacheError(f"{self.root}: sample {position} is outside the {self.samples} cached")
        chunk, i = divmod(position, self.chunk_samples)
        handle, offsets, prints = self._chunk(chunk)
        first, last = int(offsets[i]), int(offsets[i + 1])
        return handle.get_slice("ids")[first:last], handle.get_slice("logits")[first:last], int(prints[i])

    def batch_fields(self, positions: range, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The cached top-k of a host batch's targets, in the order of its targets; a sample that is not the
        one cached (other data, masks or seed than checked before launch) stops the run, naming it."""
        ids, logits = [], []
        for j, (position, fingerprint) in enumerate(zip(positions, fingerprints(batch), strict=True)):
            sample_ids, sample_logits, cached = self.rows(position)
            targets = int((batch["labels"][j] != IGNORE_INDEX).sum())
            if cached != fingerprint or len(sample_ids) != targets:
                raise CacheError(
                    f"{self.root}: sample {position} differs from the one cached (data, masking or seed changed)"
                )
            ids.append(sample_ids)
            logits.append(sample_logits)
        return {IDS: torch.cat(ids), LOGITS: torch.cat(logits)}


class WithTeacherTopK:
    """A sample order whose micro-batches carry the cached teacher's top-k at their targets."""

    def __init__(self, source, cache: TeacherCache):
        self.source, self.cache = source, cache

    def micro_batches(self, step: int, accumulation: int) -> list[dict[str, torch.Tensor]]:
        batches = self.source.micro_batches(step, accumulation)
        for batch, positions in zip(batches, self.source.positions(step, accumulation), strict=True):
            batch |= self.cache.batch_fields(positions, batch)
        return batches
