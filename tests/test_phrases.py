"""The phrase table's bounded counting: word2phrase's pruning changes nothing under a generous bound, holds
the tables to a tiny one while a strong collocation survives, only ever under-counts, and is deterministic."""

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from data_prep.phrases import PhraseTable, _Counts, iter_sentences
from plmscale.data.masking import word_start_table
from plmscale.tokenizer import Tokenizer

PLANTED = (7, 600, 8)  # two words, "7 600" and "8", that always occur together
SYNTHETIC = {"min_count": 5, "threshold": 2.0}


def synthetic_word_starts(tokens):
    """Words are runs from a start token (ids < 500) through continuation tokens (ids >= 500)."""
    return np.asarray(tokens) < 500


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    """300 sentences of 5-14 random words, 1 in 10 of them the planted pair: at most 18 words a sentence."""
    rng = np.random.default_rng(0)
    prefix = str(tmp_path_factory.mktemp("phrases") / "train_00000")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(300):
        sentence = []
        for _ in range(rng.integers(5, 15)):
            sentence += PLANTED if rng.random() < 0.1 else [int(rng.integers(10, 500))]
            sentence += [int(rng.integers(500, 1000))] * int(rng.random() < 0.3)
        builder.add_document(np.array(sentence), [len(sentence)])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def corpus(shards):
    """The embedded corpus' training shards and the tokenizer's word starts."""
    table = word_start_table(Tokenizer(shards.parent / "tokenizer" / "tokenizer.model"))
    return sorted(str(p.with_suffix("")) for p in shards.glob("train_*.idx")), lambda tokens: table[tokens]


def without_bound(stats: dict) -> dict:
    return {key: value for key, value in stats.items() if key != "max_entries"}


def test_a_generous_bound_changes_nothing(corpus):
    prefixes, word_starts = corpus
    exact = PhraseTable.build(prefixes, word_starts, max_entries=10**12)
    stats = exact.stats
    lengths = [len(s) for s in iter_sentences(prefixes)]
    assert stats["sentences"] == len(lengths) and 0 < stats["words"] <= sum(lengths)
    assert stats["prunes"] == stats["word_prunes"] == 0 and stats["floor"] == stats["word_floor"] == 1
    assert stats["peak_entries"] == stats["entries"] > stats["kept"] == len(exact.scores) > 100
    # just enough room: the larger table's final size plus a longest sentence's n-grams
    bound = max(stats["entries"], stats["word_entries"]) + 2 * max(lengths)
    generous = PhraseTable.build(prefixes, word_starts, max_entries=bound)
    assert list(generous.scores.items()) == list(exact.scores.items())
    assert without_bound(generous.stats) == without_bound(stats)


def test_half_the_room_keeps_most_of_the_table(corpus):
    """PMI ranks rare n-grams high, so pruning costs the tail; but nothing spurious comes in."""
    prefixes, word_starts = corpus
    exact = PhraseTable.build(prefixes, word_starts)
    pruned = PhraseTable.build(prefixes, word_starts, max_entries=exact.stats["entries"] // 2)
    assert pruned.stats["prunes"] >= 1 and pruned.stats["peak_entries"] <= exact.stats["entries"] // 2
    assert set(pruned.scores) <= set(exact.scores)
    assert len(pruned.scores) >= 0.8 * len(exact.scores)


def test_a_tiny_bound_holds_and_the_collocation_survives(synthetic, tmp_path):
    exact = PhraseTable.build([synthetic], synthetic_word_starts, **SYNTHETIC)
    assert list(exact.scores) == [PLANTED] and exact.stats["entries"] > 5000
    for bound in (300, 100, 60):  # 60 still fits a sentence's 18 words and 33 n-grams
        table = PhraseTable.build([synthetic], synthetic_word_starts, **SYNTHETIC, max_entries=bound)
        stats = table.stats
        assert stats["peak_entries"] <= bound and stats["peak_word_entries"] <= bound
        assert stats["prunes"] > 10 and stats["word_prunes"] > 5
        assert stats["floor"] == stats["prunes"] + 1 and stats["word_floor"] == stats["word_prunes"] + 1
        assert list(table.scores) == [PLANTED]
    table.save(tmp_path / "phrases.json")
    loaded = PhraseTable.load(tmp_path / "phrases.json")
    assert loaded.scores == table.scores and loaded.stats == table.stats


def test_pruned_counts_are_under_estimates(synthetic):
    def counts(max_entries):
        counted = _Counts(max_entries)
        counted.count(iter_sentences([synthetic]), synthetic_word_starts)
        words_of = {i: w for w, i in counted.ids.items()}
        unigrams = {words_of[i]: c for i, c in counted.unigrams.items()}
        return unigrams, {tuple(words_of[i] for i in gram): c for gram, c in counted.ngrams.items()}

    exact_words, exact_grams = counts(10**9)
    words, grams = counts(1000)  # words pruned once, n-grams 4 times: survivors seen again since lost some
    assert all(0 < c <= exact_words[w] for w, c in words.items())
    assert all(0 < c <= exact_grams[g] for g, c in grams.items())
    assert sum(exact_words[w] - c for w, c in words.items()) > 50
    assert sum(exact_grams[g] - c for g, c in grams.items()) > 20
    pair = ((7, 600), (8,))  # always above the floor, so never pruned: counted exactly
    assert grams[pair] == exact_grams[pair] == exact_words[(8,)] > 150


def test_builds_are_deterministic(synthetic, tmp_path):
    paths = []
    for name in ("one", "two"):
        every_ngram = {"min_count": 1, "threshold": -100.0}
        table = PhraseTable.build([synthetic], synthetic_word_starts, **every_ngram, max_entries=500)
        paths.append(tmp_path / f"{name}.json")
        table.save(paths[-1])
    assert table.stats["prunes"] > 5 and table.stats["word_prunes"] > 2 and len(table.scores) > 200
    assert paths[0].read_bytes() == paths[1].read_bytes()
