"""UniLM: the four attention masks (who sees whom), their construction from (direction, prefix) on the device,
the per-mode loss terms, training on `unilm` instances, and the recipes it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_VOCAB, tiny_recipe, train_single_process, write_recipe

from data_prep.instances.build import build_instances
from data_prep.instances.unilm import attention_mask as instance_attention_mask
from plmscale.config import ConfigError, ModelConfig, load_config
from plmscale.data import InstanceBatchSource, InstanceSet
from plmscale.model import TransformerLM
from plmscale.model.layers import LocalLayers
from plmscale.model.transformer import Capture, patterned_attention
from plmscale.objectives import IGNORE_INDEX, get_objective, term_metrics
from plmscale.objectives.unilm import MODES, SEQ2SEQ, attention_pattern
from plmscale.tokenizer import CLS_ID, PAD_ID, SEP_ID

# Five positions, the last one padding; seq2seq's source is positions 0-1, its target 2-3. Row i attends
# column j; a padding row attends itself only (no row may be empty).
EXPECTED = {
    "left_to_right": [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ],
    "right_to_left": [
        [1, 1, 1, 1, 0],
        [0, 1, 1, 1, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ],
    "bidirectional": [
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ],
    "seq2seq": [
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [0, 0, 0, 0, 1],
    ],
}


def tiny_model_cfg(**changes) -> ModelConfig:
    fields = dict(
        kind="encoder", vocab_size=TEST_VOCAB, hidden_size=32, num_layers=2, num_heads=4,
        max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0, type_vocab_size=2,
    )  # fmt: skip
    return ModelConfig(**(fields | changes))


def test_each_mode_sees_what_the_paper_says():
    patterns = torch.tensor(np.stack([attention_pattern(m, 2) for m in range(len(MODES))]))
    keep = torch.tensor([[1, 1, 1, 1, 0]] * len(MODES))
    mask = patterned_attention(patterns, keep, 5)
    assert mask.shape == (4, 1, 5, 5) and mask.dtype == torch.bool  # one [seq, seq] mask per sample
    for index, mode in enumerate(MODES):
        assert mask[index, 0].int().tolist() == EXPECTED[mode], mode
        # the offline builder's rule (data_prep.instances.unilm) on the real positions
        segments = np.array([0, 0, 1, 1])
        assert np.array_equal(mask[index, 0, :4, :4].numpy(), instance_attention_mask(index, segments)), mode


def test_the_model_attends_as_the_mask_says():
    """Changing a token changes exactly the final states of the positions that may see it."""
    torch.manual_seed(0)
    model = TransformerLM(tiny_model_cfg()).eval()
    seq, source = 8, 3
    ids = torch.randint(5, TEST_VOCAB, (1, seq))
    keep = torch.ones(1, seq, dtype=torch.long)
    keep[0, -1] = 0  # the last position is padding
    for index, mode in enumerate(MODES):
        pattern = torch.tensor(attention_pattern(index, source))[None]
        capture = Capture()
        states = model.encode(model.embed(ids), keep, capture, pattern)
        assert capture.attend.shape == (1, 1, seq, seq)
        for changed in range(seq):
            other = ids.clone()
            other[0, changed] = (other[0, changed] + 1 - 5) % (TEST_VOCAB - 5) + 5
            moved = (model.encode(model.embed(other), keep, None, pattern) - states).abs().amax(-1)[0] > 1e-6
            sees = capture.attend[0, 0, :, changed].clone()
            sees[changed] = True  # a position's own token changes its own state
            real = keep[0].bool()
            assert torch.equal(moved[real], sees[real]), (mode, changed)


def window(length: int) -> np.ndarray:
    return np.arange(10, 10 + length, dtype=np.int64)


def examples_of_each_mode(objective, seq: int) -> list[dict]:
    """One on-the-fly example per mode, drawn from seeds until each mode has come up."""
    found = {}
    for seed in range(200):
        example = objective.make_example(window(objective.window_length(seq)), np.random.default_rng(seed))
        found.setdefault(int(example["mode"]), example)
        if len(found) == len(MODES):
            return [found[m] for m in range(len(MODES))]
    raise AssertionError(f"modes drawn: {sorted(found)}")


def test_on_the_fly_examples_follow_the_instance_layout():
    rounded = {
        "left_to_right": 0.1666667,
        "right_to_left": 0.1666667,
        "bidirectional": 0.3333333,
        "seq2seq": 0.3333333,
    }
    objective = get_objective("unilm", rounded, tiny_model_cfg())  # shares as a recipe writes them
    seq = 32
    for mode, example in enumerate(examples_of_each_mode(objective, seq)):
        ids, labels = example["input_ids"], example["labels"]
        original = np.where(labels != IGNORE_INDEX, labels, ids)
        assert len(ids) == seq and original[0] == CLS_ID
        masked = np.flatnonzero(labels != IGNORE_INDEX)
        assert len(masked) and np.isin(original[masked], window(seq)).all()  # specials never masked
        if mode < 2:  # [CLS] A [SEP] [PAD]
            assert (
                original[-2] == SEP_ID
                and ids[-1] == PAD_ID
                and example["attention_mask"].tolist() == [1] * 31 + [0]
            )
            assert not example["token_type_ids"].any() and example["attention_pattern"][1] == 0
        else:  # [CLS] A [SEP] B [SEP]
            source = int((example["token_type_ids"] == 0).sum())
            assert (
                original[source - 1] == SEP_ID and original[-1] == SEP_ID and example["attention_mask"].all()
            )
            assert example["attention_pattern"].tolist() == ([1, source] if mode == SEQ2SEQ else [0, 0])
            if mode == SEQ2SEQ:  # the paper masks the target only
                assert masked.min() >= source


def test_loss_terms_per_mode_slice_the_masked_tokens():
    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    model, objective = TransformerLM(cfg).eval(), get_objective("unilm", {}, cfg)
    examples = examples_of_each_mode(objective, 24) * 2
    batch = {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}
    with torch.no_grad():
        logits = model(**objective.model_inputs(batch))
        trained = objective.loss_terms(logits, batch, model.spec)
        terms = objective.loss_terms(logits, batch, model.spec, count_correct=True)
    assert list(trained) == ["mlm"] and list(terms) == ["mlm", *MODES]
    assert torch.allclose(trained["mlm"].sum, terms["mlm"].sum)
    labels = batch["labels"]
    for index, mode in enumerate(MODES):
        rows = batch["mode"] == index
        # reference: a forward of that mode's samples alone, scored by hand
        alone = {k: v[rows] for k, v in batch.items()}
        with torch.no_grad():
            own = model(**objective.model_inputs(alone))
        targets = labels[rows][labels[rows] != IGNORE_INDEX]
        assert terms[mode].count == targets.numel() > 0
        assert torch.allclose(terms[mode].sum, F.cross_entropy(own, targets, reduction="sum"), atol=1e-4)
        assert terms[mode].correct == int((own.argmax(-1) == targets).sum())
    assert sum(terms[m].count for m in MODES) == terms["mlm"].count
    assert torch.allclose(sum(terms[m].sum for m in MODES), terms["mlm"].sum, atol=1e-4)

    sums = {name: float(term.sum) for name, term in terms.items()}
    counts = {name: term.count for name, term in terms.items()} | {"seq2seq": 0}  # a mode without targets
    hits = {name: term.correct for name, term in terms.items()}
    metrics = term_metrics(sums, counts, hits, MODES)
    assert metrics["loss"] == pytest.approx(sums["mlm"] / counts["mlm"])  # the modes are not added in
    assert metrics["loss/bidirectional"] == pytest.approx(sums["bidirectional"] / counts["bidirectional"])
    assert metrics["bidirectional_accuracy"] == hits["bidirectional"] / counts["bidirectional"]
    assert "loss/left_to_right" in metrics and "loss/seq2seq" not in metrics


def test_loss_falls_on_unilm_instances(shards, tmp_path):
    build_instances(shards, "unilm", tmp_path, params={"max_seq_length": 48}, workers=1, progress=False)
    instances = InstanceSet(tmp_path)
    cfg = tiny_model_cfg()
    objective = get_objective("unilm", {}, cfg)
    source = InstanceBatchSource(instances, 48, 32, 1, 0, seed=3, objective=objective)
    batch = source.micro_batches(0, 1)[0]
    assert set(batch["mode"].tolist()) == {0, 1, 2, 3}  # the four masks mixed in one batch
    for row in range(len(batch["mode"])):  # the model's mask is the one the builder describes
        length = int(batch["attention_mask"][row].sum())
        mask = patterned_attention(
            batch["attention_pattern"][row : row + 1], batch["attention_mask"][row : row + 1], 48
        )
        segments = batch["token_type_ids"][row, :length].numpy()
        expected = instance_attention_mask(int(batch["mode"][row]), segments)
        assert np.array_equal(mask[0, 0, :length, :length].numpy(), expected)
        assert not mask[0, 0, :length, length:].any()  # padding never attended

    torch.manual_seed(0)
    model = TransformerLM(cfg, LocalLayers())

    held_out = [source.micro_batches(step, 1)[0] for step in (100, 101)]  # not trained on

    def held_out_losses() -> dict[str, float]:
        sums, counts = {}, {}
        with torch.no_grad():
            for batch in held_out:
                outputs = model(**objective.model_inputs(batch))
                for name, term in objective.loss_terms(
                    outputs, batch, model.spec, count_correct=True
                ).items():
                    sums[name], counts[name] = (
                        sums.get(name, 0) + float(term.sum),
                        counts.get(name, 0) + term.count,
                    )
        return {name: sums[name] / counts[name] for name in sums}

    before = held_out_losses()
    train_single_process(model, objective, source, steps=10, lr=1e-2, first_step=1)
    after = held_out_losses()
    assert list(after) == ["mlm", *MODES]
    assert all(after[name] < before[name] - 0.5 for name in after), (before, after)


@pytest.mark.parametrize(
    "changes, names",
    [
        (
            {"objective": {"name": "unilm", "params": {"seq2seq": 0.5}}},
            ["objective.params", "seq2seq", "sum to 1"],
        ),
        ({"model": {"type_vocab_size": 0}}, ["model.type_vocab_size"]),
        ({"objective": {"name": "unilm", "params": {"unit": "span"}}}, ["objective.params.unit"]),
    ],
)
def test_bad_combinations_name_the_key(changes, names, tmp_path):
    recipe = tiny_recipe(tmp_path / "shards", tmp_path / "out", objective={"name": "unilm"})
    recipe["model"]["type_vocab_size"] = 2
    for section, values in changes.items():
        recipe[section].update(values)
    with pytest.raises(ConfigError) as err:
        load_config(write_recipe(tmp_path / "unilm.yaml", recipe))
    assert all(name in str(err.value) for name in names), str(err.value)
