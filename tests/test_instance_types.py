"""Denoising (BART), permutation LM (XLNet) and UniLM instances, checked against their papers' figures on
synthetic documents written as real shards."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from pydantic import ValidationError

from data_prep.instances.base import DocumentSource, Vocabulary
from data_prep.instances.denoising import Denoising
from data_prep.instances.permutation import PermutationLM
from data_prep.instances.unilm import MODES, SEQ2SEQ, UniLM, attention_mask

VOCAB = 3000
MASK = 4


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"\u2581w{i}" for i in range(5, VOCAB)]
    tokenizer = SimpleNamespace(
        vocab_size=VOCAB, id_to_piece=pieces.__getitem__, cls_id=2, sep_id=3, mask_id=4, pad_id=0
    )
    return Vocabulary(tokenizer)


def write_documents(prefix: str, documents: list[list[np.ndarray]]) -> DocumentSource:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for sentences in documents:
        builder.add_document(np.concatenate(sentences), [len(s) for s in sentences])
    builder.finalize(prefix + ".idx")
    return DocumentSource([prefix])


def random_documents(count: int, seed: int, unique: bool = False) -> list[list[np.ndarray]]:
    """Documents of 5-30 sentences of 3-40 tokens; with `unique`, no token repeats inside a document."""
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(count):
        lengths = rng.integers(3, 41, size=rng.integers(5, 31))
        if unique:
            ids = rng.permutation(np.arange(5, VOCAB))[: lengths.sum()]
        else:
            ids = rng.integers(5, VOCAB, size=lengths.sum())
        documents.append(np.split(ids, np.cumsum(lengths)[:-1]))
    return documents


def build_all(kind, params: dict, source: DocumentSource, vocab: Vocabulary, seed: int = 0) -> list[dict]:
    builder = kind(kind.Params(**params), vocab)
    return [
        inst
        for doc in range(len(source))
        for inst in builder.build(doc, source, np.random.default_rng([seed, doc]))
    ]


def statistics(kind, instances: list[dict], vocab: Vocabulary, prefix: str) -> dict[str, float]:
    """Write the instances the way the driver does (one indexed dataset per field), read them back."""
    for field, dtype in kind.fields.items():
        builder = IndexedDatasetBuilder(f"{prefix}.{field}.bin", dtype=dtype)
        for inst in instances:
            builder.add_document(inst[field], [inst[field].size])
        builder.finalize(f"{prefix}.{field}.idx")
    return kind.statistics({field: IndexedDataset(f"{prefix}.{field}") for field in kind.fields}, vocab)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> DocumentSource:
    return write_documents(str(tmp_path_factory.mktemp("corpus") / "docs"), random_documents(300, seed=1))


@pytest.fixture(scope="module")
def unique_corpus(tmp_path_factory) -> DocumentSource:
    return write_documents(
        str(tmp_path_factory.mktemp("unique") / "docs"), random_documents(40, 2, unique=True)
    )


def content(tokens: np.ndarray) -> np.ndarray:
    assert tokens[0] == 2 and tokens[-1] == 3
    return tokens[1:-1]


def test_text_infilling_matches_bart(corpus, vocab, tmp_path):
    instances = build_all(Denoising, {"permute_sentences": False}, corpus, vocab)
    for inst in instances:
        # walking the source, each [MASK] stands for exactly one span of the target, in order
        source, target, pos = content(inst["source"]), content(inst["target"]), 0
        spans = iter(inst["span_lengths"])
        for token in source:
            if token == MASK:
                pos += next(spans)
            else:
                assert token == target[pos]
                pos += 1
        assert pos == len(target) and next(spans, None) is None
    stats = statistics(Denoising, instances, vocab, str(tmp_path / "out"))
    assert set(stats) == {
        "instances", "infilled_fraction", "mean_span_length", "zero_length_span_share",
        "deleted_fraction", "source_target_length_ratio",
    }  # fmt: skip
    assert stats["infilled_fraction"] == pytest.approx(0.3, abs=0.005)
    assert stats["mean_span_length"] == pytest.approx(3.0, abs=0.1)
    assert stats["zero_length_span_share"] == pytest.approx(math.exp(-3), abs=0.01)
    assert stats["deleted_fraction"] == 0
    # each span of mean length 3 becomes one [MASK]: the source is about 1 - 0.3 + 0.3 / 3 of the target
    assert stats["source_target_length_ratio"] == pytest.approx(0.8, abs=0.02)


def test_sentence_permutation_keeps_the_sentences(unique_corpus, vocab):
    denoising, moved, total = Denoising(Denoising.Params(mask_ratio=0.0, max_seq_length=200), vocab), 0, 0
    for doc in range(len(unique_corpus)):
        first = {int(s[0]): s for s in unique_corpus.sentences(doc)}
        for inst in denoising.build(doc, unique_corpus, np.random.default_rng(doc)):
            source, target = content(inst["source"]), content(inst["target"])
            pos, order = 0, []
            while pos < len(source):  # the source reads as whole sentences of the target, each once
                sentence = first[int(source[pos])]
                assert np.array_equal(source[pos : pos + len(sentence)], sentence)
                order.append(int(np.flatnonzero(target == sentence[0])[0]))
                pos += len(sentence)
            assert len(set(order)) == len(order) and len(source) == len(target)
            moved, total = moved + (order != sorted(order)), total + 1
    assert moved > total // 2


def test_rotation_and_deletion(unique_corpus, vocab, tmp_path):
    rotated = build_all(
        Denoising, {"mask_ratio": 0.0, "permute_sentences": False, "rotate": True}, unique_corpus, vocab
    )
    for inst in rotated:
        source, target = content(inst["source"]), content(inst["target"])
        assert np.array_equal(source, np.roll(target, -int(np.flatnonzero(target == source[0])[0])))
    assert any(content(i["source"])[0] != content(i["target"])[0] for i in rotated)

    params = {"mask_ratio": 0.3, "delete_ratio": 0.1, "permute_sentences": False}
    instances = build_all(Denoising, params, unique_corpus, vocab)
    for inst in instances:  # what survives keeps its order
        source, target = content(inst["source"]), content(inst["target"])
        where = [int(np.flatnonzero(target == t)[0]) for t in source if t != MASK]
        assert where == sorted(where)
    stats = statistics(Denoising, instances, vocab, str(tmp_path / "out"))
    assert stats["deleted_fraction"] == pytest.approx(0.1, abs=0.01)
    assert stats["infilled_fraction"] == pytest.approx(0.3, abs=0.01)


def test_denoising_params_are_checked():
    with pytest.raises(ValidationError):
        Denoising.Params(mask_ratio=0.8, delete_ratio=0.3)
    with pytest.raises(ValidationError):
        Denoising.Params(poisson_lambda=0)
    with pytest.raises(ValidationError):
        Denoising.Params(mask_prob=0.15)


def test_permutation_lm_matches_xlnet(corpus, vocab, tmp_path):
    instances = build_all(PermutationLM, {"max_seq_length": 128}, corpus, vocab)
    for inst in instances:
        n, k = len(inst["tokens"]), int(inst["num_predict"][0])
        assert np.array_equal(np.sort(inst["perm_order"]), np.arange(n))
        assert np.array_equal(inst["target_mapping"], inst["perm_order"][n - k :])
    stats = statistics(PermutationLM, instances, vocab, str(tmp_path / "out"))
    assert set(stats) == {"instances", "mean_tokens", "target_share", "mean_targets", "valid_permutations"}
    assert stats["target_share"] == pytest.approx(1 / 6, abs=0.005)
    assert stats["mean_targets"] == pytest.approx(stats["mean_tokens"] / 6, rel=0.05)
    assert stats["valid_permutations"] == 1.0

    broken, wrong_targets = [i for i in instances if i["num_predict"][0] > 2][:2]  # one of each is caught
    broken["perm_order"][:2] = 0
    wrong_targets["target_mapping"] = wrong_targets["perm_order"][: wrong_targets["num_predict"][0]]
    stats = statistics(PermutationLM, instances, vocab, str(tmp_path / "broken"))
    assert stats["valid_permutations"] == pytest.approx(1 - 2 / len(instances))


def test_span_permutation_and_partial_k(corpus, vocab):
    instances = build_all(PermutationLM, {"span_len": 4, "partial_k": 3}, corpus, vocab)
    targets = sum(int(i["num_predict"][0]) for i in instances)
    assert targets / sum(len(i["tokens"]) for i in instances) == pytest.approx(1 / 3, abs=0.01)
    for inst in instances:  # blocks of 4 consecutive positions, in reading order inside a block
        order = inst["perm_order"]
        assert np.array_equal(np.sort(order), np.arange(len(order)))
        for s in np.flatnonzero(order % 4 == 0):
            block = np.arange(order[s], min(order[s] + 4, len(order)))
            assert np.array_equal(order[s : s + len(block)], block)


def test_attention_masks():
    segments = np.array([0, 0, 0, 1, 1, 1])
    rows = np.arange(6)[:, None]
    cols = np.arange(6)[None, :]
    assert np.array_equal(attention_mask(0, segments), cols <= rows)
    assert np.array_equal(attention_mask(1, segments), cols >= rows)
    assert attention_mask(2, segments).all()
    seq2seq = attention_mask(SEQ2SEQ, segments)
    assert seq2seq[:3, :3].all() and not seq2seq[:3, 3:].any()  # source sees the source only
    assert seq2seq[3:, :3].all()  # the target sees the whole source ...
    assert np.array_equal(seq2seq[3:, 3:], np.tri(3, dtype=bool))  # ... and itself up to each position
    with pytest.raises(ValueError):
        attention_mask(4, segments)


def test_unilm_matches_paper(vocab, tmp_path):
    documents = random_documents(3000, seed=3)
    source = write_documents(str(tmp_path / "docs"), [doc[:3] for doc in documents])  # 3000 short documents
    instances = build_all(UniLM, {}, source, vocab)
    stats = statistics(UniLM, instances, vocab, str(tmp_path / "out"))
    assert set(stats) == {"instances", *(f"share_{m}" for m in MODES)} | {
        "masked_fraction", "mask_token_share", "random_token_share", "kept_token_share", "seq2seq_source_masked",
    }  # fmt: skip
    for mode, share in zip(MODES, (1 / 6, 1 / 6, 1 / 3, 1 / 3), strict=True):
        assert stats[f"share_{mode}"] == pytest.approx(share, abs=0.03)
    assert stats["masked_fraction"] == pytest.approx(0.15, abs=0.01)
    assert stats["mask_token_share"] == pytest.approx(0.8, abs=0.02)
    assert stats["random_token_share"] == pytest.approx(0.1, abs=0.015)
    assert stats["kept_token_share"] == pytest.approx(0.1, abs=0.015)
    assert stats["seq2seq_source_masked"] == 0

    for inst, doc in zip(instances, range(len(source)), strict=True):
        tokens, segments, mode = inst["tokens"], inst["segments"], int(inst["mode"][0])
        original = tokens.copy()
        original[inst["mask_positions"]] = inst["mask_labels"]
        assert np.array_equal(original[original > 3], np.concatenate(source.sentences(doc)))
        assert np.count_nonzero(original == 3) == (2 if mode >= 2 else 1)
        assert segments[0] == 0 and np.all(np.diff(segments) >= 0)
        if mode == SEQ2SEQ:
            assert np.all(segments[inst["mask_positions"]] == 1)

    only = build_all(
        UniLM, {"left_to_right": 0, "right_to_left": 0, "bidirectional": 1, "seq2seq": 3}, source, vocab
    )
    shares = np.bincount([int(i["mode"][0]) for i in only], minlength=4) / len(only)
    assert shares[:2].sum() == 0 and shares[3] == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValidationError):
        UniLM.Params(left_to_right=0, right_to_left=0, bidirectional=0, seq2seq=0)


@pytest.mark.parametrize("kind", [Denoising, PermutationLM, UniLM])
def test_long_documents_are_split_not_dropped(kind, vocab, tmp_path):
    rng = np.random.default_rng(4)
    long_sentence = rng.integers(5, VOCAB, size=700)  # longer than a whole sequence
    document = [rng.integers(5, VOCAB, size=30), long_sentence, rng.integers(5, VOCAB, size=90)]
    source = write_documents(str(tmp_path / "docs"), [document])
    params = {"max_seq_length": 128} | (
        {"mask_ratio": 0.0, "permute_sentences": False} if kind is Denoising else {}
    )
    instances = kind(kind.Params(**params), vocab).build(0, source, np.random.default_rng(0))
    field = {Denoising: "target", PermutationLM: "tokens", UniLM: "tokens"}[kind]
    if kind is UniLM:  # undo the masking
        for inst in instances:
            inst["tokens"][inst["mask_positions"]] = inst["mask_labels"]
    assert len(instances) >= 7 and all(len(i[field]) <= 128 for i in instances)
    kept = np.concatenate([i[field][i[field] > 3] for i in instances])
    assert np.array_equal(kept, np.concatenate(document))


@pytest.mark.parametrize("kind", [Denoising, PermutationLM, UniLM])
def test_deterministic_given_the_seed(kind, corpus, vocab):
    first, again, other = (
        kind(kind.Params(), vocab).build(7, corpus, np.random.default_rng(s)) for s in (5, 5, 6)
    )
    same = [all(np.array_equal(a[f], b[f]) for f in kind.fields) for a, b in zip(first, again, strict=True)]
    differ = [
        all(np.array_equal(a[f], b[f]) for f in kind.fields) for a, b in zip(first, other, strict=False)
    ]
    assert all(same) and not all(differ)
    assert all(set(inst) == set(kind.fields) and inst[f].ndim == 1 for inst in first for f in kind.fields)
