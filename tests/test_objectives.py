"""Objectives and the data they read: masking statistics, packing, and the resumable batch order."""

import numpy as np
import pytest
import torch
from conftest import TEST_VOCAB
from megatron.core.datasets.indexed_dataset import IndexedDataset

from plmscale.config import ModelConfig
from plmscale.data import BatchSource, PackedStream
from plmscale.data.loader import Prefetched
from plmscale.manifest import load_manifest, split_prefixes
from plmscale.model import TransformerLM
from plmscale.objectives import IGNORE_INDEX, available, get_objective
from plmscale.tokenizer import CLS_ID, MASK_ID, SEP_ID
from plmscale.training.trainer import StepTotals

ENCODER = ModelConfig(kind="encoder", vocab_size=1000, hidden_size=32, num_layers=1, num_heads=2,
                      max_position_embeddings=512)  # fmt: skip
DECODER = ENCODER.model_copy(update={"kind": "decoder"})


def test_registry_lists_the_objectives():
    assert {"mlm", "causal_lm"} <= set(available())


def test_mlm_masks_15_percent_with_80_10_10():
    mlm = get_objective("mlm", {}, ENCODER)
    rng = np.random.default_rng(0)
    chosen = masked = random = kept = positions = 0
    for _ in range(400):
        tokens = rng.integers(5, 1000, 254)
        example = mlm.make_example(tokens, np.random.default_rng(rng.integers(1 << 30)))
        ids, labels = example["input_ids"], example["labels"]
        assert ids[0] == CLS_ID and ids[-1] == SEP_ID and len(ids) == 256
        targets = labels != IGNORE_INDEX
        assert not targets[0] and not targets[-1]  # special tokens are never predicted
        assert (labels[targets] == np.concatenate([[CLS_ID], tokens, [SEP_ID]])[targets]).all()
        assert (ids[~targets] == np.concatenate([[CLS_ID], tokens, [SEP_ID]])[~targets]).all()
        chosen += targets.sum()
        positions += len(ids)
        masked += (ids[targets] == MASK_ID).sum()
        kept += (ids[targets] == labels[targets]).sum()
        random += ((ids[targets] != MASK_ID) & (ids[targets] != labels[targets])).sum()
    assert chosen / positions == pytest.approx(0.15, abs=0.002)
    assert masked / chosen == pytest.approx(0.8, abs=0.01)
    assert random / chosen == pytest.approx(
        0.1, abs=0.01
    )  # a random token equal to the original counts as kept
    assert kept / chosen == pytest.approx(0.1, abs=0.01)


def test_mlm_masks_depend_only_on_the_seed():
    mlm = get_objective("mlm", {"mask_prob": 0.3}, ENCODER)
    tokens = np.arange(5, 105)
    first = mlm.make_example(tokens, np.random.default_rng([7, 3]))
    again = mlm.make_example(tokens, np.random.default_rng([7, 3]))
    other = mlm.make_example(tokens, np.random.default_rng([7, 4]))
    assert all((first[k] == again[k]).all() for k in first)
    assert not (first["labels"] == other["labels"]).all()
    assert (first["labels"] != IGNORE_INDEX).sum() == 31  # round(102 * 0.3)


def test_causal_lm_shifts_by_one():
    clm = get_objective("causal_lm", {}, DECODER)
    example = clm.make_example(np.arange(10, 20), np.random.default_rng(0))
    assert clm.window_length(9) == 10
    assert example["input_ids"].tolist() == list(range(10, 19))
    assert example["labels"].tolist() == list(range(11, 20))


def test_packed_stream_is_the_documents_separated_by_sep(shards):
    prefixes = split_prefixes(load_manifest(shards), "train")
    stream = PackedStream(prefixes, TEST_VOCAB)
    expected = []
    for prefix in prefixes:
        ds = IndexedDataset(prefix)
        for start, end in zip(ds.document_indices[:-1], ds.document_indices[1:], strict=True):
            expected.extend(np.concatenate([ds[i] for i in range(start, end)]).tolist() + [SEP_ID])
    assert stream.total_tokens == len(expected)
    length = 100
    windows = np.concatenate([stream.window(i, length) for i in range(stream.num_windows(length))])
    assert windows.tolist() == expected[: len(windows)]
    with pytest.raises(IndexError):
        stream.window(stream.num_windows(length), length)


def test_batch_order_splits_ranks_and_is_stateless(shards):
    stream = PackedStream.from_manifest(shards, "train")
    mlm = get_objective("mlm", {}, ENCODER.model_copy(update={"vocab_size": 2000}))

    def source(rank):
        return BatchSource(stream, mlm, 64, 4, dp_size=2, dp_rank=rank, seed=11)

    rank0, rank1 = source(0).micro_batches(5, 2), source(1).micro_batches(5, 2)
    again = source(0).micro_batches(5, 2)  # a fresh source (a resumed run) sees the same batches
    for a, b in zip(rank0, again, strict=True):
        assert all((a[k] == b[k]).all() for k in a)
    seen = {tuple(row.tolist()) for batch in rank0 + rank1 for row in batch["labels"]}
    assert len(seen) == 16  # 2 ranks x 2 micro-batches x 4 sequences, all different
    assert rank0[0]["input_ids"].shape == (4, 64)


def test_prefetched_batches_are_the_sources_whatever_the_order_of_steps(shards):
    """Built ahead in a thread, the batches are exactly those of the step asked for: in order, after a jump
    (a resumed run), asking for a step again, or past the last step (nothing is built ahead then)."""
    stream = PackedStream.from_manifest(shards, "train")
    mlm = get_objective("mlm", {}, ENCODER.model_copy(update={"vocab_size": 2000}))
    source = BatchSource(stream, mlm, 64, 4, dp_size=1, dp_rank=0, seed=11)
    prefetched = Prefetched(BatchSource(stream, mlm, 64, 4, dp_size=1, dp_rank=0, seed=11), 6, pin=False)
    for step in (0, 1, 2, 4, 4, 5):
        got, expected = prefetched.micro_batches(step, 2), source.micro_batches(step, 2)
        pairs = list(zip(got, expected, strict=True))
        assert len(pairs) == 2 and all(torch.equal(g[k], e[k]) for g, e in pairs for k in e), step
    assert prefetched.ahead is None  # step 5 is the last


def _host_batch(shards, objective):
    """A micro-batch of 4 x 64 as the trainer gets it: built by the loader, on the host."""
    stream = PackedStream.from_manifest(shards, "train")
    return BatchSource(stream, objective, 64, 4, dp_size=1, dp_rank=0, seed=3).micro_batches(0, 1)[0]


@pytest.mark.parametrize("name, cfg", [("mlm", ENCODER), ("causal_lm", DECODER)])
def test_the_training_step_reads_no_value_back_from_the_device(shards, name, cfg):
    """The step as the trainer runs it (inputs chosen on the host, batch moved, forward, loss terms, backward)
    on the meta device, which holds no values: an op that needs one on the host (a boolean selection, whose
    size comes from `nonzero`, `.item()`) raises there. On an accelerator, the step never waits for it."""
    cfg = cfg.model_copy(update={"vocab_size": TEST_VOCAB})
    objective = get_objective(name, {}, cfg)
    host = _host_batch(shards, objective)
    inputs = {k: v.to("meta") for k, v in objective.model_inputs(host).items()}
    batch = {k: v.to("meta") for k, v in host.items()}
    model = TransformerLM(cfg).to("meta")
    totals = StepTotals(lambda outputs, b, count_correct: objective.loss_terms(outputs, b, model.spec))
    counts = objective.target_counts(host)
    totals.start({name: 1 / counts[name]})
    totals(model(**inputs), batch).backward()
    assert totals.counts == counts and counts[name] == int((host["labels"] != IGNORE_INDEX).sum())
    assert model.layers["0"].attn.qkv.weight.grad.is_meta
    # The check fails where a size is data-dependent: a batch without its host-found positions.
    without = {k: v for k, v in batch.items() if k != "target_positions"}
    with pytest.raises(NotImplementedError):
        objective.model_inputs(without)


def test_mlm_loss_from_host_positions_is_the_boolean_selections(shards):
    """The head at the loader's target positions gives the loss and gradients of the head run everywhere
    and the targets selected by a boolean mask (what the step computed before), within 1e-6."""
    cfg = ENCODER.model_copy(update={"vocab_size": TEST_VOCAB})
    mlm = get_objective("mlm", {}, cfg)
    batch = _host_batch(shards, mlm)
    chosen = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["target_positions"], chosen.flatten().nonzero().squeeze(1))
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()  # no dropout: both passes see the same network
    losses, grads = [], []
    for selected in (True, False):
        model.zero_grad()
        if selected:
            loss_sum, count = mlm.loss(model(**mlm.model_inputs(batch)), batch, model.spec)
        else:
            logits = model(batch["input_ids"])[chosen]
            loss_sum, count = model.spec.cross_entropy(logits, batch["labels"][chosen]).sum(), len(logits)
        loss_sum.backward()
        losses.append(loss_sum.detach() / count)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert count == len(batch["target_positions"])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)
