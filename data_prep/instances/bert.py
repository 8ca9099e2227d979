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

from data_prep.instances.base import DocumentSource, InstanceType, Params, Vocabulary, field_values, register
from plmscale.data.masking import PRESETS, Masker

Preset = Literal["mlm", "wwm", "wwm_zh", "span", "ernie"]


class BertParams(Params):
    max_seq_length: int = Field(128, ge=8, le=32767)
    short_seq_prob: float = Field(0.1, ge=0, le=1)
    max_predictions_per_seq: int = Field(20, gt=0)
    masking: Preset | None = Field(None, description="masker preset; default: the objective's own")
    mask_prob: float | None = Field(None, gt=0, lt=1, description="overrides the preset's 0.15")
    entities: str | None = Field(None, description="ernie: entity list, one entity a line")
    phrases: str | None = Field(None, description="ernie: phrase table, written by the driver's first pass")
    tokenizer: str | None = Field(None, description="ernie: tokenizes the entity list; set by the driver")


class BertInstances(InstanceType):
    """Subclasses pick the pair objective and the default masking preset."""

    fields = {
        "tokens": np.int32,  # masked input ids: [CLS] A [SEP] (B [SEP])
        "segments": np.uint8,
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
            from data_prep import words

            self.word_starts = (
                words.chinese_word_starts if self.masking == "wwm_zh" else words.english_word_starts
            )
        if self.masking == "ernie":
            from data_prep.phrases import EntityMatcher, PhraseTable
            from plmscale.tokenizer import Tokenizer

            if params.entities is None or params.tokenizer is None:
                raise ValueError("ernie masking needs an entity list (`--entities FILE`) and the tokenizer")
            self.entities = EntityMatcher.from_file(params.entities, Tokenizer(params.tokenizer))
            self.phrases = PhraseTable.load(params.phrases) if params.phrases else None

    def build(
        self, doc: int, source: DocumentSource, rng: np.random.Generator
    ) -> list[dict[str, np.ndarray]]:
        sentences = self._sentences(source.sentences(doc))
        target = self.max_tokens
        if rng.random() < self.params.short_seq_prob:
            target = int(rng.integers(2, self.max_tokens + 1))
        instances, chunk, length, i = [], [], 0, 0
        while i < len(sentences):
            chunk.append(sentences[i])
            length += len(sentences[i])
            if i == len(sentences) - 1 or length + len(sentences[i + 1]) > target:
                segments = self._segments(chunk, target, doc, source, rng)
                if segments is None:
                    self.counts["chunks_too_short_for_pair"] += 1
                else:
                    a, b, label, put_back = segments
                    instances.append(self._instance(a, b, label, rng))
                    i -= put_back
                chunk, length = [], 0
            i += 1
        return instances

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
        """(A, B or None, pair label, sentences put back); None if a pair cannot be made of the chunk."""
        if self.pair is None:
            return np.concatenate(chunk), None, 0, 0
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

    def _instance(self, a: np.ndarray, b: np.ndarray | None, label: int, rng) -> dict[str, np.ndarray]:
        v = self.vocab
        parts = [[v.cls_id], a, [v.sep_id]] + ([] if b is None else [b, [v.sep_id]])
        tokens = np.concatenate(parts).astype(np.int64)
        segments = np.zeros(len(tokens), dtype=np.uint8)
        segments[len(a) + 2 :] = 1
        masked = self.masker.mask(tokens, rng, **self._units(tokens))
        instance = {
            "tokens": masked.input_ids,
            "segments": segments,
            "mask_positions": masked.positions,
            "mask_labels": masked.labels,
            "spans": masked.spans.reshape(-1),
        }
        if self.pair:
            instance["pair_label"] = np.array([label])
        return instance

    def _units(self, tokens: np.ndarray) -> dict:
        """What the preset masks together: words, and for ERNIE phrases and entities."""
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
    return fields | {"pair_label": np.uint8}


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
    name, preset = "ernie", "ernie"
