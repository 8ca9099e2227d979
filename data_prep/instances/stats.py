"""`plmscale prep stats DIR`: the figures of an instance set, to check against the paper it comes from.

Generic figures come from the fields BERT-style types share (tokens, mask_positions, mask_labels, spans):
masked fraction, the [MASK] / random / unchanged split, masked-unit lengths in tokens and words; each type
adds its own through `InstanceType.statistics` (pair balance, infilling ratio, UniLM shares, ...). At most
`max_instances` are read, whole shards in build order, joined into one indexed dataset per field: the form
`statistics` takes.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

import numpy as np

from data_prep.instances.base import Vocabulary, field_values, instance_type
from plmscale.data.instances import load_instance_manifest, open_shard
from plmscale.manifest import tokenizer_path
from plmscale.tokenizer import Tokenizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core warns that Transformer Engine and Apex are absent
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def instance_statistics(directory: str | Path, max_instances: int = 200_000) -> dict[str, float]:
    manifest = load_instance_manifest(directory, verify=True)
    vocab = Vocabulary(Tokenizer(tokenizer_path(manifest)))
    stats = {"instances": manifest["counts"]["instances"]}
    with tempfile.TemporaryDirectory(prefix="plmscale_stats_") as tmp:
        datasets = _joined_sample(manifest, Path(tmp), max_instances)
        if datasets is None:
            return stats
        stats["instances_read"] = len(next(iter(datasets.values())))
        if {"tokens", "mask_positions", "mask_labels"} <= datasets.keys():
            stats |= masking_statistics(datasets, vocab)
        with contextlib.suppress(NotImplementedError):  # a type may have no figures of its own
            stats |= instance_type(manifest["objective"]).statistics(datasets, vocab)
    return stats


def _joined_sample(manifest: dict, tmp: Path, max_instances: int) -> dict[str, IndexedDataset] | None:
    root, fields = Path(manifest["directory"]), list(manifest["fields"])
    shards, total = [], 0
    for shard in manifest["shards"]:
        if shard["instances"] and total < max_instances:
            shards.append(shard["prefix"])
            total += shard["instances"]
    if len(shards) <= 1:
        return open_shard(root, shards[0], fields) if shards else None
    for field, dtype in manifest["fields"].items():
        builder = IndexedDatasetBuilder(str(tmp / f"joined.{field}.bin"), dtype=np.dtype(dtype).type)
        for prefix in shards:  # (not `add_index`: it runs a full garbage collection per shard)
            shard = IndexedDataset(str(root / f"{prefix}.{field}"))
            builder.add_document(field_values(shard), shard.sequence_lengths.tolist())
        builder.finalize(str(tmp / f"joined.{field}.idx"))
    return open_shard(tmp, "joined", fields)


def masking_statistics(datasets: dict[str, IndexedDataset], vocab: Vocabulary) -> dict[str, float]:
    tokens = field_values(datasets["tokens"]).astype(np.int64)
    lengths = datasets["tokens"].sequence_lengths.astype(np.int64)
    offsets = np.cumsum(lengths) - lengths  # where each instance starts in `tokens`
    counts = datasets["mask_positions"].sequence_lengths.astype(np.int64)
    positions = field_values(datasets["mask_positions"]).astype(np.int64) + np.repeat(offsets, counts)
    labels = field_values(datasets["mask_labels"]).astype(np.int64)
    shown = tokens[positions]
    special = np.isin(tokens, [vocab.pad_id, vocab.cls_id, vocab.sep_id])
    masked = max(len(positions), 1)
    stats = {
        "mean_length": float(lengths.mean()),
        "masked_per_instance": float(counts.mean()),
        "masked_fraction": len(positions) / max(int((~special).sum()), 1),
        "share_mask_token": float((shown == vocab.mask_id).sum()) / masked,
        "share_random": float(((shown != vocab.mask_id) & (shown != labels)).sum()) / masked,
        "share_unchanged": float((shown == labels).sum()) / masked,
    }
    if "spans" in datasets:
        original = tokens.copy()
        original[positions] = labels
        stats |= unit_statistics(datasets["spans"], offsets, original, vocab)
    return stats


def unit_statistics(spans_ds: IndexedDataset, offsets: np.ndarray, original: np.ndarray, vocab) -> dict:
    """Masked units (words for WWM, spans for SpanBERT): their length in tokens, the words they touch, and
    whether each covers whole words of the instance only (from a word start to the next word or special)."""
    per_instance = spans_ds.sequence_lengths.astype(np.int64) // 2
    spans = field_values(spans_ds).astype(np.int64).reshape(-1, 2) + np.repeat(offsets, per_instance)[:, None]
    if not len(spans):
        return {}
    # a word of the instance starts at a word-start piece or after a special token (a cut word's rest)
    special = original <= vocab.mask_id
    starts_word = np.append(vocab.word_start[original], True)
    starts_word[1:-1] |= special[:-1]
    words_before = np.concatenate([[0], np.cumsum(starts_word)])
    return {
        "mean_unit_tokens": float((spans[:, 1] - spans[:, 0]).mean()),
        "mean_unit_words": float((words_before[spans[:, 1]] - words_before[spans[:, 0] + 1] + 1).mean()),
        "whole_word_units": float((starts_word[spans[:, 0]] & starts_word[spans[:, 1]]).mean()),
    }


def format_table(stats: dict[str, float]) -> str:
    width = max(map(len, stats)) + 2
    rows = [f"{name:<{width}}{value:>12,}" if isinstance(value, int) else f"{name:<{width}}{value:>12.4f}"
            for name, value in stats.items()]  # fmt: skip
    return "\n".join(rows)
