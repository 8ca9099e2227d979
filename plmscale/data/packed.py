"""A packed token stream over megatron-core indexed shards, cut into fixed-length windows.

Documents (their sentences concatenated) are laid end to end with [SEP] after each, across every shard of
a split; window i is stream[i * length : (i + 1) * length]. Only the per-document offsets live in memory;
tokens are read from the memory-mapped `.bin` files on demand, and every document read is bounds-checked
against the vocabulary, so corrupt bytes stop the run naming the file even with checksums off.
"""

from __future__ import annotations

import numpy as np

from plmscale.manifest import ManifestError, load_manifest, split_prefixes
from plmscale.tokenizer import SEP_ID


class PackedStream:
    def __init__(self, prefixes: list[str], vocab_size: int, separator: int = SEP_ID):
        if not prefixes:
            raise ValueError("no shards to read")
        from megatron.core.datasets.indexed_dataset import IndexedDataset  # seconds to import: when read

        self.prefixes = prefixes
        self.datasets = [IndexedDataset(prefix) for prefix in prefixes]
        self.vocab_size, self.separator = vocab_size, separator
        starts, lengths, owners = [], [], []
        for number, ds in enumerate(self.datasets):
            doc_items = ds.document_indices
            item_lengths = ds.sequence_lengths.astype(np.int64)
            nonempty = doc_items[1:] > doc_items[:-1]
            first_items = doc_items[:-1][nonempty]
            doc_lengths = np.add.reduceat(item_lengths, first_items) if len(first_items) else first_items
            starts.append(first_items)
            lengths.append(doc_lengths)
            owners.append(np.full(len(first_items), number, dtype=np.int32))
        self.doc_first_item = np.concatenate(starts)
        self.doc_length = np.concatenate(lengths)
        self.doc_dataset = np.concatenate(owners)
        # Stream offset where each document starts (each is followed by one separator).
        self.doc_offset = np.concatenate([[0], np.cumsum(self.doc_length + 1)])

    @classmethod
    def from_manifest(cls, directory: str, split: str, verify: bool = True) -> PackedStream:
        manifest = load_manifest(directory, verify=verify)
        return cls(split_prefixes(manifest, split), manifest["tokenizer"]["vocab_size"])

    @property
    def total_tokens(self) -> int:
        return int(self.doc_offset[-1])

    def num_windows(self, length: int) -> int:
        return self.total_tokens // length

    def window(self, index: int, length: int) -> np.ndarray:
        start, end = index * length, (index + 1) * length
        if index < 0 or end > self.total_tokens:
            raise IndexError(f"window {index} of length {length} is outside the stream")
        doc = int(np.searchsorted(self.doc_offset, start, side="right")) - 1
        pieces, position = [], start
        while position < end:
            doc_start = int(self.doc_offset[doc])
            tokens = self.document(doc)
            tokens = np.append(tokens, self.separator)[position - doc_start :]
            pieces.append(tokens[: end - position])
            position += len(pieces[-1])
            doc += 1
        return np.concatenate(pieces).astype(np.int64)

    def document(self, doc: int) -> np.ndarray:
        shard = self.doc_dataset[doc]
        # A document's sentences are contiguous in the .bin file: one read covers them all.
        tokens = self.datasets[shard].get(int(self.doc_first_item[doc]), 0, int(self.doc_length[doc]))
        if tokens.size and not 0 <= tokens.min() <= tokens.max() < self.vocab_size:
            raise ManifestError(
                f"{self.prefixes[shard]}.bin: document {doc} holds token ids outside the vocabulary "
                f"[0, {self.vocab_size}): the file is corrupt (data.verify_checksums checks it)"
            )
        return tokens
