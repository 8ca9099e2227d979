"""The masker against its papers: BERT's 15 % and 80/10/10, whole words never split, SpanBERT's span
lengths, ERNIE's level mix; Chinese words from jieba; the phrase table and entity matcher."""

import numpy as np
import pytest
import sentencepiece as spm
from conftest import ZH_WORDS
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from data_prep.instances.base import Vocabulary
from data_prep.phrases import EntityMatcher, PhraseTable
from data_prep.words import chinese_word_starts, english_word_starts
from plmscale.config import ModelConfig
from plmscale.data.masking import (
    PRESETS,
    Masked,
    Masker,
    MaskingConfig,
    fill,
    word_start_table,
    word_units,
)
from plmscale.objectives import IGNORE_INDEX, get_objective
from plmscale.tokenizer import CLS_ID, MASK_ID, SEP_ID, TRAINER_SPECIAL_ARGS, Tokenizer

VOCAB = 1000


def sequence(rng, n: int = 256, word_prob: float = 0.7):
    """[CLS] ordinary tokens [SEP] with random word structure; specials start words of their own."""
    tokens = np.concatenate([[CLS_ID], rng.integers(5, VOCAB, n - 2), [SEP_ID]])
    starts = rng.random(n) < word_prob
    starts[[0, 1, -1]] = True
    return tokens, starts


def outcome_shares(masked) -> np.ndarray:
    """Shares of chosen positions that became [MASK], a random token, or stayed."""
    ids = masked.input_ids[masked.positions]
    counts = [
        (ids == MASK_ID).sum(),
        ((ids != MASK_ID) & (ids != masked.labels)).sum(),
        (ids == masked.labels).sum(),
    ]
    return np.array(counts, dtype=float)


def check_consistent(tokens, masked) -> None:
    assert (np.diff(masked.positions) > 0).all()
    assert (masked.labels == tokens[masked.positions]).all()
    untouched = np.ones(len(tokens), dtype=bool)
    untouched[masked.positions] = False
    assert (masked.input_ids[untouched] == tokens[untouched]).all()
    covered = np.concatenate([np.arange(s, e) for s, e in masked.spans]) if len(masked.spans) else []
    assert np.array_equal(covered, masked.positions)  # spans sorted, disjoint, and exactly the positions


@pytest.mark.parametrize("preset", ["mlm", "wwm"])
def test_15_percent_and_80_10_10(preset):
    masker, rng = Masker(PRESETS[preset], VOCAB), np.random.default_rng(0)
    chosen = total = 0
    shares = np.zeros(3)
    for _ in range(300):
        tokens, starts = sequence(rng)
        masked = masker.mask(tokens, rng, word_starts=starts)
        check_consistent(tokens, masked)
        assert tokens[masked.positions].min() >= 5  # specials are never chosen
        chosen, total = chosen + len(masked.positions), total + len(tokens)
        shares += outcome_shares(masked)
    assert chosen / total == pytest.approx(0.15, abs=0.003)
    assert shares / shares.sum() == pytest.approx([0.8, 0.1 - 0.1 / VOCAB, 0.1 + 0.1 / VOCAB], abs=0.012)


def test_whole_word_masking_never_masks_part_of_a_word():
    masker, rng = Masker(PRESETS["wwm"], VOCAB), np.random.default_rng(1)
    for _ in range(200):
        tokens, starts = sequence(rng, word_prob=0.4)
        masked = masker.mask(tokens, rng, word_starts=starts)
        hit = np.zeros(len(tokens), dtype=bool)
        hit[masked.positions] = True
        for start, end in zip(*word_units(tokens >= 5, starts), strict=True):
            assert hit[start:end].all() or not hit[start:end].any()
        assert len(masked.positions) <= masker.budget(len(tokens))
        assert all(starts[masked.spans[:, 0]])


def test_max_predictions_caps_the_budget():
    config = MaskingConfig(max_predictions=20)
    tokens, _ = sequence(np.random.default_rng(2), n=512)
    assert len(Masker(config, VOCAB).mask(tokens, np.random.default_rng(0)).positions) == 20


def test_span_masking_follows_spanbert():
    masker, rng = Masker(PRESETS["span"], VOCAB), np.random.default_rng(3)
    words, chosen, total = [], 0, 0
    for _ in range(40):
        tokens, starts = sequence(rng, n=4096)
        maskable = (tokens >= 5) & (rng.random(len(tokens)) > 0.01)  # a few unmaskable positions
        masked = masker.mask(tokens, rng, maskable=maskable, word_starts=starts)
        check_consistent(tokens, masked)
        assert maskable[masked.positions].all()
        spans = masked.spans
        assert (starts[spans[:, 0]] | ~maskable[spans[:, 0] - 1]).all()  # unmaskable positions end words
        assert (spans[:, 0] >= 1).all() and (spans[:, 1] <= len(tokens) - 1).all()  # SBO boundaries exist
        cut = ~starts[spans[:, 1]] & maskable[spans[:, 1]]
        assert cut.sum() <= 1  # only the span that met the budget may end inside a word
        for (start, end), in_word in zip(spans, cut, strict=True):
            words.append(starts[start:end].sum())
            ids = masked.input_ids[start:end]
            assert (ids == MASK_ID).all() or (ids != MASK_ID).all()  # one decision per span
            assert in_word or maskable[start:end].all()
        chosen, total = chosen + len(masked.positions), total + len(tokens)
    assert chosen / total == pytest.approx(0.15, abs=0.001)
    assert np.mean(words) == pytest.approx(3.8, abs=0.12)  # geometric(0.2) renormalized on 1..10: 3.797
    assert max(words) <= 10


def test_ernie_mix_sets_the_levels_shares():
    masker, rng = Masker(PRESETS["ernie"], VOCAB), np.random.default_rng(4)
    levels = np.zeros(3)
    for _ in range(200):
        tokens, starts = sequence(rng, n=512)
        firsts = range(1, 505, 6)  # every 6 tokens a 3-token entity, a 2-token phrase and a free token
        entities = [(b, b + 3) for b in firsts]
        phrases = [(b + 3, b + 5) for b in firsts]
        masked = masker.mask(tokens, rng, word_starts=starts, phrases=phrases, entities=entities)
        check_consistent(tokens, masked)
        spans = {tuple(s) for s in masked.spans.tolist()}
        in_entities = sum(e - s for s, e in spans & set(entities))
        in_phrases = sum(e - s for s, e in spans & set(phrases))
        levels += [len(masked.positions) - in_entities - in_phrases, in_phrases, in_entities]
        assert len(masked.positions) <= masker.budget(len(tokens))
    assert levels / levels.sum() == pytest.approx([0.5, 0.25, 0.25], abs=0.02)


@pytest.mark.parametrize("preset", ["mlm", "wwm", "span", "ernie"])
def test_a_batch_masks_each_sequence_on_its_own(preset):
    """Sequences back to back, no specials between them and no word start where one begins: no unit
    crosses into the next sequence, and each gets its own budget."""
    masker, rng = Masker(PRESETS[preset], VOCAB), np.random.default_rng(7)
    lengths = rng.integers(1, 300, 60)
    tokens = rng.integers(5, VOCAB, lengths.sum())
    starts = rng.random(lengths.sum()) < 0.6
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    starts[offsets[:-1]] = False
    batch = masker.mask_batch(tokens, lengths, rng, word_starts=starts, phrases=[(3, 6), (298, 303)])
    assert batch.position_counts.sum() == len(batch.positions) and len(batch.position_counts) == 60
    positions = np.split(batch.positions, np.cumsum(batch.position_counts)[:-1])
    labels = np.split(batch.labels, np.cumsum(batch.position_counts)[:-1])
    spans = np.split(batch.spans, np.cumsum(batch.span_counts)[:-1])
    for i, (a, b) in enumerate(zip(offsets, offsets[1:], strict=False)):
        masked = Masked(batch.input_ids[a:b], positions[i], labels[i], spans[i])
        check_consistent(tokens[a:b], masked)
        assert (spans[i] >= 0).all() and (spans[i] <= b - a).all()
        assert len(positions[i]) <= masker.budget(b - a)
        if preset in ("mlm", "span"):  # these always fill the budget when the words allow it
            assert len(positions[i]) == masker.budget(b - a)
    assert batch.position_counts.sum() / lengths.sum() == pytest.approx(0.15, abs=0.01)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_masks_depend_only_on_the_seed(preset):
    masker = Masker(PRESETS[preset], VOCAB)
    tokens, starts = sequence(np.random.default_rng(5))
    kwargs = {"word_starts": starts, "phrases": [(10, 13), (40, 42)], "entities": [(20, 24)]}
    first = masker.mask(tokens, np.random.default_rng([9, 1]), **kwargs)
    again = masker.mask(tokens, np.random.default_rng([9, 1]), **kwargs)
    other = masker.mask(tokens, np.random.default_rng([9, 2]), **kwargs)
    assert all(
        np.array_equal(getattr(first, k), getattr(again, k)) for k in ("input_ids", "positions", "spans")
    )
    assert not np.array_equal(first.positions, other.positions)
    nothing = masker.mask(np.array([CLS_ID, SEP_ID]), np.random.default_rng(0), word_starts=np.ones(2, bool))
    assert nothing.positions.size == 0 and nothing.spans.shape == (0, 2)


@pytest.fixture(scope="module")
def zh_tokenizer(tmp_path_factory) -> Tokenizer:
    """A tiny SentencePiece model on Chinese lines built from a fixed word list, plmscale's special ids."""
    rng = np.random.default_rng(0)
    lines = ["".join(rng.choice(ZH_WORDS, size=rng.integers(4, 12))) + "。" for _ in range(400)]
    root = tmp_path_factory.mktemp("zh")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(root / "zh"), vocab_size=330, model_type="unigram",
        character_coverage=1.0, num_threads=1, byte_fallback=True, minloglevel=2, **TRAINER_SPECIAL_ARGS,
    )  # fmt: skip
    return Tokenizer(root / "zh.model")


def test_chinese_whole_words_come_from_jieba(zh_tokenizer):
    import jieba

    vocab = Vocabulary(zh_tokenizer)
    text = "我们今天在北京大学学习人工智能和中国历史龘"  # 在 and 龘 are unseen: byte-fallback pieces
    tokens = np.array(zh_tokenizer.encode([text])[0])
    assert any(vocab.pieces[t].startswith("<0x") for t in tokens)
    starts = chinese_word_starts(tokens, vocab)
    units = word_units(tokens >= 5, starts)
    surfaces = [zh_tokenizer.decode(tokens[s:e].tolist()) for s, e in zip(*units, strict=True)]
    assert surfaces == jieba.lcut(text)  # every jieba word here falls on piece boundaries
    assert (units[1] - units[0] > 1).any()  # some jieba word spans several pieces
    masker, rng = Masker(PRESETS["wwm_zh"], zh_tokenizer.vocab_size), np.random.default_rng(0)
    for _ in range(50):
        hit = np.zeros(len(tokens), dtype=bool)
        hit[masker.mask(tokens, rng, word_starts=starts).positions] = True
        assert all(hit[s:e].all() or not hit[s:e].any() for s, e in zip(*units, strict=True))
    assert np.array_equal(english_word_starts(tokens, vocab), vocab.word_start[tokens])


def test_mlm_objective_masks_whole_words_from_the_tokenizer(zh_tokenizer):
    encoder = ModelConfig(kind="encoder", vocab_size=zh_tokenizer.vocab_size, hidden_size=32, num_layers=1,
                          num_heads=2, max_position_embeddings=512)  # fmt: skip
    mlm = get_objective("mlm", {"unit": "word", "tokenizer": str(zh_tokenizer.path)}, encoder)
    table = word_start_table(zh_tokenizer)
    rng = np.random.default_rng(0)
    tokens = np.array(zh_tokenizer.encode([" ".join(rng.choice(ZH_WORDS, 40))])[0])
    example = mlm.make_example(tokens, rng)
    ids = np.concatenate([[CLS_ID], tokens, [SEP_ID]])
    hit = example["labels"] != IGNORE_INDEX
    assert hit.any()
    for start, end in zip(*word_units(ids >= 5, table[ids]), strict=True):
        assert hit[start:end].all() or not hit[start:end].any()
    with pytest.raises(ValueError, match="needs `tokenizer`"):
        get_objective("mlm", {"unit": "span"}, encoder)


def test_phrase_table_finds_a_planted_collocation(tmp_path):
    """Words are runs from a start token (ids < 500) through continuation tokens (ids >= 500)."""
    rng = np.random.default_rng(0)
    planted = [7, 600, 8]  # two words, "7 600" and "8", that always occur together

    def word_starts(tokens):
        return np.asarray(tokens) < 500

    builder = IndexedDatasetBuilder(str(tmp_path / "train_00000.bin"), dtype=np.uint16)
    for _ in range(300):
        sentence = []
        for _ in range(rng.integers(5, 15)):
            sentence += planted if rng.random() < 0.1 else [int(rng.integers(10, 500))]
            sentence += [int(rng.integers(500, 1000))] * int(rng.random() < 0.3)
        builder.add_document(np.array(sentence), [len(sentence)])
    builder.finalize(str(tmp_path / "train_00000.idx"))

    table = PhraseTable.build([str(tmp_path / "train_00000")], word_starts, min_count=5, threshold=2.0)
    assert list(table.scores) == [tuple(planted)]  # chance co-occurrences stay below min_count
    tokens = np.array([11, 7, 600, 8, 12, 7, 600, 13])
    assert table.find(tokens, word_starts(tokens)) == [(1, 4)]
    table.save(tmp_path / "phrases.json")
    assert PhraseTable.load(tmp_path / "phrases.json").scores == table.scores


def test_entity_matcher_finds_listed_entities(zh_tokenizer, tmp_path):
    vocab = Vocabulary(zh_tokenizer)
    (tmp_path / "entities.txt").write_text("北京大学\n人工智能\n\n")
    matcher = EntityMatcher.from_file(tmp_path / "entities.txt", zh_tokenizer)
    text = "我们在北京大学学习人工智能"
    tokens = np.array(zh_tokenizer.encode([text])[0])
    found = matcher.find(tokens, chinese_word_starts(tokens, vocab))
    surfaces = ["".join(vocab.pieces[t] for t in tokens[s:e]).replace("\u2581", "") for s, e in found]
    assert surfaces == ["北京大学", "人工智能"]


def test_fill_is_googles_greedy():
    rng = np.random.default_rng(6)
    for _ in range(300):
        lengths, budget = rng.integers(1, 6, rng.integers(0, 30)), int(rng.integers(0, 40))
        expected, left = [], budget
        for length in lengths.tolist():  # create_pretraining_data.py: skip a word that would overshoot
            expected.append(bool(left > 0 and length <= left))
            left -= length * expected[-1]
        assert fill(lengths, budget).tolist() == expected
