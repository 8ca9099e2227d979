"""SpanBERT's span-boundary objective: which positions it predicts, from which boundaries, with which
network; its held-out metric; its loss falls on the embedded corpus; bad combinations are refused (pipeline
stages train it: tests/test_pipeline.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe, train_single_process, write_recipe

from plmscale.config import ConfigError, ModelConfig, load_config
from plmscale.data import BatchSource, PackedStream
from plmscale.manifest import load_manifest, tokenizer_path
from plmscale.model import TransformerLM
from plmscale.objectives import IGNORE_INDEX, get_objective
from plmscale.objectives.span_boundary import span_boundaries

CFG = ModelConfig(
    kind="encoder", vocab_size=300, pad_vocab_to_multiple_of=64, hidden_size=32, num_layers=2, num_heads=4,
    max_position_embeddings=64, type_vocab_size=0, span_boundary_head=True, hidden_dropout=0.0,
    attention_dropout=0.0,
)  # fmt: skip


def test_each_span_position_gets_its_spans_two_boundaries():
    boundaries = span_boundaries(np.array([[2, 4], [6, 7]]), 9)
    expected = np.full((9, 2), -1)
    expected[[2, 3]] = [1, 4]
    expected[6] = [5, 7]
    np.testing.assert_array_equal(boundaries, expected)
    with pytest.raises(ValueError, match="boundary outside"):
        span_boundaries(np.array([[0, 2]]), 9)  # a span at the start has no left boundary


@pytest.mark.parametrize("offset_size", [None, 8])
def test_head_computes_spanberts_boundary_network_by_hand(offset_size):
    torch.manual_seed(0)
    model = TransformerLM(CFG.model_copy(update={"span_offset_size": offset_size})).eval()
    assert model.span_boundary_head.offsets.weight.shape == (CFG.max_position_embeddings, offset_size or 32)
    input_ids = torch.randint(5, CFG.vocab_size, (2, 12))
    boundaries = torch.from_numpy(
        np.stack([span_boundaries([[3, 6]], 12), span_boundaries([[1, 2], [8, 10]], 12)])
    )
    with torch.no_grad():
        logits, sbo_logits = model(input_ids, span_boundaries=boundaries)
        hidden = model.hidden_states(input_ids)
    head = model.span_boundary_head
    expected = []
    for row, position, left, right in [
        (0, 3, 2, 6),
        (0, 4, 2, 6),
        (0, 5, 2, 6),
        (1, 1, 0, 2),
        (1, 8, 7, 10),
        (1, 9, 7, 10),
    ]:
        x = torch.cat([hidden[row, left], hidden[row, right], head.offsets.weight[position - left - 1]])
        for dense, ln in ((head.dense_in, head.ln_in), (head.dense_out, head.ln_out)):
            x = F.layer_norm(F.gelu(x @ dense.weight.T + dense.bias), (32,), ln.weight, ln.bias, 1e-5)
        expected.append(x @ model.word_embeddings.weight.T + head.output.bias)
    assert logits.shape == (2, 12, CFG.padded_vocab_size)
    torch.testing.assert_close(sbo_logits, torch.stack(expected).detach(), atol=1e-5, rtol=1e-5)


def _objective(shards, **params):
    tokenizer = str(tokenizer_path(load_manifest(shards, verify=False)))
    cfg = CFG.model_copy(update={"vocab_size": 2000})
    return get_objective("mlm_sbo", {"tokenizer": tokenizer, **params}, cfg), cfg


def test_on_the_fly_spans_predict_every_masked_token_from_its_spans_boundaries(shards):
    objective, _ = _objective(shards)
    source = BatchSource(PackedStream.from_manifest(shards, "train"), objective, 64, 8, 1, 0, 3, False)
    batch = source.micro_batches(0, 1)[0]
    labels, boundaries = batch["labels"].numpy(), batch["span_boundaries"].numpy()
    predicted = boundaries[..., 0] >= 0
    np.testing.assert_array_equal(predicted, labels != IGNORE_INDEX)  # SBO predicts every masked token
    spans = 0
    for row in range(len(labels)):
        position = np.flatnonzero(predicted[row])
        left, right = boundaries[row, position].T
        assert (left < position).all() and (right > position).all()
        # each span is the run [left + 1, right) of masked positions, whole
        for start, end in set(zip(left + 1, right, strict=True)):
            assert predicted[row, start:end].all()
            spans += 1
    assert spans > len(labels) and objective.target_counts(batch) == {
        "mlm": predicted.sum(),
        "sbo": predicted.sum(),
    }


def test_loss_falls_and_held_out_sbo_accuracy_is_reported(shards):
    objective, cfg = _objective(shards)
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    source = BatchSource(PackedStream.from_manifest(shards, "train"), objective, 64, 8, 1, 0, 3, True)
    history = train_single_process(model, objective, source, steps=12)
    losses = [[mean for mean, _, _ in terms.values()] for terms in history]
    assert all(0 <= terms["sbo"][2] <= terms["sbo"][1] for terms in history)
    first, last = np.mean(losses[:3], axis=0), np.mean(losses[-3:], axis=0)
    assert (last < first - 0.5).all(), losses  # both MLM and SBO


def test_bad_combinations_are_refused_naming_the_key(shards, tmp_path):
    def rejected(**sections) -> str:
        recipe = tiny_recipe(
            shards, tmp_path / "out", objective={"name": "mlm_sbo", "params": {"tokenizer": "t"}}
        )
        for section, values in sections.items():
            recipe[section].update(values)
        with pytest.raises(ConfigError) as err:
            load_config(write_recipe(tmp_path / "r.yaml", recipe))
        return str(err.value)

    assert "model.span_boundary_head" in rejected()
    assert "model.span_offset_size" in rejected(model={"span_offset_size": 200})
    head = {"span_boundary_head": True}
    params = {"params": {"tokenizer": "t", "unit": "token"}}
    assert "objective.params: unit='token'" in rejected(model=head, objective=params)
    recipe = tiny_recipe(
        shards, tmp_path / "out", model=head, objective={"name": "mlm_sbo", "params": {"tokenizer": "t"}}
    )
    assert load_config(write_recipe(tmp_path / "ok.yaml", recipe)).model.span_boundary_head
