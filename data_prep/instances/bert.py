"""BERT-style instances, [CLS] A [SEP] B [SEP], built as Google's `create_pretraining_data.py` builds them.

A document's sentences are gathered into a chunk up to a target length: the whole sequence, or with
probability `short_seq_prob` (drawn once per document, as Google does) a random shorter one, so the model
also sees the short inputs of fine-tuning. The pair objective then decides what the chunk becomes:

- nsp (BERT): A is the chunk up to a random sentence; B is the rest (label 0) or, half the time, sentences
  from another random document (label 1), in which case the chunk's unused sentences are put back;
- sop (ALBERT): A and B as above, swapped half the time (label 1);
- none (RoBERTa FULL-SENTENCES within a document): the chunk is one segment.

Two departures from Google's script, so that no token of the document is lost and the labels stay
balanced: a chunk never overshoots its target (the sentence that would not fit starts the next chunk; one
longer than the sequence is cut into pieces, counted), and a chunk of a single sentence is split inside
it rather than forced to a random next. Only B from another document is ever truncated.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar, Literal

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset
from pydantic import Field

from data_prep.instances.base import (
    DocumentSource,
    Instances,
    InstanceType,
    Params,
    Vocabulary,
    field_values,
    register,
)
from plmscale.data.masking import PRESETS, Masker

Preset = Literal["mlm", "wwm", "wwm_zh", "span", "ngram", "ernie"]


class BertParams(Params):
    max_seq_length: int = Field(128, ge=8, le=32767)
    short_seq_prob: float = Field(0.1, ge=0, le=1)
    max_predictions_per_seq: int = Field(20, gt=0)
    masking: Preset | None = Field(None, description="masker preset; default: the objective's own")
    mask_prob: float | None = Field(None, gt=0, lt=1, description="overrides the preset's 0.15")
    words: Literal["sentencepiece", "jieba"] | None = Field(
        None,
        description="word boundaries of word, span and ernie units: SentencePiece's marker (English) or "
        "jieba (Chinese, as Chinese BERT-wwm and ERNIE 1.0); default jieba for wwm_zh, else sentencepiece",
    )
    entities: str | None = Field(None, description="ernie: entity list, one entity a line")
    phrases: str | None = Field(None, description="ernie: phrase table, written by the driver's first pass")
    tokenizer: str | None = Field(None, description="ernie: tokenizes the entity list; set by the driver")


class BertInstances(InstanceType):
    """Subclasses pick the pair objective and the default masking preset."""

    fields = {
        "tokens": np.int32,  # masked input ids: [CLS] A [SEP] (B [SEP])
        "mask_positions": np.int16,
        "mask_labels": np.int32,
        "spans": np.int16,  # [start, end) of every masked unit, flattened
    }
    Params = BertParams
    pair: ClassVar[Literal["nsp", "sop"] | None] = None
    preset: ClassVar[str] = "mlm"

    def __init__(self, params: BertParams, vocab: Vocabulary):
        super().__init__(params, vocab)
        self.masking = params.masking or self.preset
        update = {"max_predictions": params.max_predictions_per_seq}
        if params.mask_prob is not None:
            update["mask_prob"] = params.mask_prob
        self.masker = Masker(PRESETS[self.masking].model_copy(update=update), vocab.size)
        self.max_tokens = params.max_seq_length - (3 if self.pair else 2)
        self.counts: Counter = Counter()  # sentences cut, tokens truncated: read by the driver
        self.word_starts = self.phrases = self.entities = None
        if self.masking != "mlm":  # jieba and the phrase tables load only where needed
            from data_prep.words import SEGMENTERS

            self.word_starts = SEGMENTERS[
                params.words or ("jieba" if self.masking == "wwm_zh" else "sentencepiece")
            ]
        if self.masking == "ernie":
            from data_prep.phrases import EntityMatcher, PhraseTable
            from plmscale.tokenizer import Tokenizer

            if params.entities is None or params.tokenizer is None:
                raise ValueError("ernie masking needs an entity list (`--entities FILE`) and the tokenizer")
            self.entities = EntityMatcher.from_file(params.entities, Tokenizer(params.tokenizer))
            self.phrases = PhraseTable.load(params.phrases) if params.phrases else None

    def build_batch(self, docs: range, source: DocumentSource, rng: np.random.Generator) -> Instances:
        """Instances document by document, then one masking pass over all of the batch's instances."""
        targets = np.full(len(docs), self.max_tokens)
        short = rng.random(len(docs)) < self.params.short_seq_prob
        targets[short] = rng.integers(2, self.max_tokens + 1, int(short.sum()))
        if self.pair is None:
            return self._packed(*source.block(docs), targets, rng)
        pairs, per_document = [], []
        documents = source.documents(docs)
        for doc, sentences, target in zip(docs, documents, targets.tolist(), strict=True):
            found = self._pairs(doc, self._sentences(sentences), target, source, rng)
            pairs.extend(found)
            per_document.append(len(found))
        return self._paired(pairs, np.array(per_document, dtype=np.int64), rng)

    def _packed(self, tokens, sentence_lengths, bounds, targets, rng) -> Instances:
        """No pair: the documents' tokens stay in order, cut into chunks of whole sentences, each
        [CLS] chunk [SEP]; only the chunk lengths are worked out sentence by sentence."""
        lengths, bounds = sentence_lengths.tolist(), bounds.tolist()
        chunks, per_document = [], []
        for first, end, target in zip(bounds, bounds[1:], targets.tolist(), strict=False):
            found = self._pack(lengths[first:end], target)
            chunks.extend(found)
            per_document.append(len(found))
        chunks = np.array(chunks, dtype=np.int64)
        instance = np.repeat(np.arange(len(chunks)), chunks)
        lengths = chunks + 2
        starts = np.cumsum(lengths) - lengths
        with_specials = np.empty(int(lengths.sum()), dtype=np.int64)
        with_specials[np.arange(len(tokens)) + 2 * instance + 1] = tokens
        with_specials[starts] = self.vocab.cls_id
        with_specials[starts + lengths - 1] = self.vocab.sep_id
        return self._masked(with_specials, lengths, np.array(per_document, dtype=np.int64), rng)

    def _pack(self, lengths: list[int], target: int) -> list[int]:
        """Greedy: whole sentences into chunks of at most `target` tokens (a sentence longer than that is
        a chunk of its own), after a sentence longer than a segment holds is cut into pieces that fit."""
        limit, chunks, size = self.max_tokens, [], 0
        for length in lengths:
            pieces = (length,)
            if length > limit:
                self.counts["sentences_cut"] += 1
                pieces = [limit] * (length // limit) + [length % limit] * (length % limit > 0)
            for piece in pieces:
                if size and size + piece > target:
                    chunks.append(size)
                    size = 0
                size += piece
        return chunks + [size] if size else chunks

    def _pairs(
        self, doc: int, sentences: list[np.ndarray], target: int, source: DocumentSource, rng
    ) -> list[tuple]:
        """(A, B, pair label) of each instance of one document."""
        pairs, chunk, length, i = [], [], 0, 0
        while i < len(sentences):
            chunk.append(sentences[i])
            length += len(sentences[i])
            if i == len(sentences) - 1 or length + len(sentences[i + 1]) > target:
                segments = self._segments(chunk, target, doc, source, rng)
                if segments is None:
                    self.counts["chunks_too_short_for_pair"] += 1
                else:
                    *pair, put_back = segments
                    pairs.append(pair)
                    i -= put_back
                chunk, length = [], 0
            i += 1
        return pairs

    def _sentences(self, sentences: list[np.ndarray]) -> list[np.ndarray]:
        """A sentence longer than a segment can hold is cut into pieces that fit."""
        out, n = [], self.max_tokens
        for sentence in sentences:
            if len(sentence) > n:
                self.counts["sentences_cut"] += 1
                out.extend(sentence[i : i + n] for i in range(0, len(sentence), n))
            else:
                out.append(sentence)
        return out

    def _segments(self, chunk, target, doc, source, rng) -> tuple | None:
        """(A, B, pair label, sentences put back); None if a pair cannot be made of the chunk."""
        swap = rng.random() < 0.5
        total = sum(map(len, chunk))
        if self.pair == "nsp" and (swap or total < 2):
            cut = int(rng.integers(1, len(chunk))) if len(chunk) > 1 else 1
            a = np.concatenate(chunk[:cut])
            a, b = self._truncate(a, self._other_document(doc, source, target - len(a), rng), rng)
            return a, b, 1, len(chunk) - cut
        if total < 2:
            return None
        if len(chunk) > 1:
            cut = int(rng.integers(1, len(chunk)))
            a, b = np.concatenate(chunk[:cut]), np.concatenate(chunk[cut:])
        else:
            cut = int(rng.integers(1, total))
            a, b = chunk[0][:cut], chunk[0][cut:]
        if self.pair == "sop" and swap:
            return b, a, 1, 0
        return a, b, 0, 0

    def _other_document(self, doc: int, source: DocumentSource, length: int, rng) -> np.ndarray:
        """Sentences of another random document, from a random one on, until `length` tokens."""
        if len(source) < 2:
            raise ValueError("next sentence prediction needs at least 2 documents")
        other = int(rng.integers(len(source) - 1))
        other += other >= doc
        sentences = source.sentences(other)
        pieces, total = [], 0
        for sentence in sentences[int(rng.integers(len(sentences))) :]:
            pieces.append(sentence)
            total += len(sentence)
            if total >= length:
                break
        return np.concatenate(pieces)[: self.max_tokens]

    def _truncate(self, a: np.ndarray, b: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """Google's truncate_seq_pair: drop a token from the longer segment, from a random end, until fit."""
        overflow = len(a) + len(b) - self.max_tokens
        if overflow <= 0:
            return a, b
        self.counts["tokens_truncated"] += overflow
        lengths, cut = [len(a), len(b)], [[0, 0], [0, 0]]  # per segment: tokens off the front, the back
        for back in (rng.random(overflow) < 0.5).tolist():
            longer = 0 if lengths[0] > lengths[1] else 1
            lengths[longer] -= 1
            cut[longer][back] += 1
        return a[cut[0][0] : len(a) - cut[0][1]], b[cut[1][0] : len(b) - cut[1][1]]

    def _paired(self, pairs: list[tuple], per_document: np.ndarray, rng) -> Instances:
        """[CLS] A [SEP] B [SEP] for every pair, with its segment ids and pair label."""
        cls_id, sep_id = np.array([self.vocab.cls_id]), np.array([self.vocab.sep_id])
        parts = [cls_id]  # so that an empty batch concatenates too
        for a, b, _ in pairs:
            parts += [cls_id, a, sep_id, b, sep_id]
        tokens = np.concatenate(parts).astype(np.int64)[1:]
        length_a = np.array([len(a) for a, _, _ in pairs], dtype=np.int64)
        length_b = np.array([len(b) for _, b, _ in pairs], dtype=np.int64)
        segment_runs = np.stack([length_a + 2, length_b + 1], axis=1).reshape(-1)  # zeros, then ones
        lengths = length_a + length_b + 3
        return self._masked(
            tokens, lengths, per_document, rng,
            segments=(np.repeat(np.tile([0, 1], len(pairs)), segment_runs), lengths),
            pair_label=(np.array([label for _, _, label in pairs]), np.ones(len(pairs), dtype=np.int64)),
        )  # fmt: skip

    def _masked(self, tokens, lengths, per_document, rng, **extra) -> Instances:
        """Mask the batch's instances in one `Masker.mask_batch` call; `extra` fields come as (values,
        per-instance lengths)."""
        masked = self.masker.mask_batch(tokens, lengths, rng, **self._units(tokens))
        fields = {
            "tokens": (masked.input_ids, lengths),
            "mask_positions": (masked.positions, masked.position_counts),
            "mask_labels": (masked.labels, masked.position_counts),
            "spans": (masked.spans.reshape(-1), 2 * masked.span_counts),
        } | extra
        if "span_levels" in self.fields:  # ernie: which spans are entities and phrases, for held-out scoring
            fields["span_levels"] = (masked.span_levels, masked.span_counts)
        return Instances(
            {field: values for field, (values, _) in fields.items()},
            {field: sizes for field, (_, sizes) in fields.items()},
            per_document,
        )

    def _units(self, tokens: np.ndarray) -> dict:
        """What the preset masks together: words, and for ERNIE phrases and entities. Specials separate
        the instances, and no word, phrase or entity contains one, so one pass over the batch does."""
        if self.word_starts is None:
            return {}
        units = {"word_starts": self.word_starts(tokens, self.vocab)}
        if self.entities is not None:
            units["entities"] = self.entities.find(tokens, units["word_starts"])
            if self.phrases is not None:
                units["phrases"] = self.phrases.find(tokens, units["word_starts"])
        return units

    @classmethod
    def statistics(cls, instances: dict[str, IndexedDataset], vocab: Vocabulary) -> dict[str, float]:
        """Pair balance; the masking figures are the generic ones of `data_prep.instances.stats`."""
        if "pair_label" not in instances:
            return {}
        positive = field_values(instances["pair_label"])
        name = "nsp_random_next_share" if cls.pair == "nsp" else "sop_swapped_share"
        return {name: float(positive.mean()) if len(positive) else 0.0}


def _with_pair(fields: dict) -> dict:
    return fields | {"segments": np.uint8, "pair_label": np.uint8}


@register
class MaskedLM(BertInstances):
    name = "mlm"


@register
class NextSentence(BertInstances):
    name, pair, fields = "nsp", "nsp", _with_pair(BertInstances.fields)


@register
class SentenceOrder(BertInstances):
    name, pair, fields = "sop", "sop", _with_pair(BertInstances.fields)


@register
class WholeWord(BertInstances):
    name, preset = "wwm", "wwm"


@register
class WholeWordChinese(BertInstances):
    name, preset = "wwm_zh", "wwm_zh"


@register
class SpanBERT(BertInstances):
    name, preset = "span", "span"


@register
class Ernie(BertInstances):
    # span_levels: each span's ERNIE level (0 basic, 1 phrase, 2 entity; plmscale.data.masking.ERNIE_LEVELS)
    name, preset = "ernie", "ernie"
    fields = BertInstances.fields | {"span_levels": np.uint8}
