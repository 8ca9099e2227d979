"""The family benchmark's compute: the FLOPs it equalizes are those torch counts in each model's forward pass,
and its plan gives every model the steps that spend BERT's FLOPs. Nothing is trained here: the benchmark
itself (benchmarks/bench_family.py) is where the family is compared."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from plmscale.config import load_config
from plmscale.model import build_model
from plmscale.objectives.span_boundary import span_boundaries

spec = importlib.util.spec_from_file_location("bench_family", REPO / "benchmarks" / "bench_family.py")
bench = sys.modules["bench_family"] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
spec.loader.exec_module(bench)

SPANS = [[2, 5], [9, 10], [20, 24]]  # 8 masked positions of 32, each span inside the sequence
MASKED = 8


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return bench.plan(root / "data", root / "runs", bert_steps=600, mask_prob=0.15)


def _inputs(cfg) -> dict:
    """Two sequences of the plan's length with MASKED targets each, as the model's objective passes them."""
    seq = cfg.data.seq_length
    boundaries = torch.from_numpy(np.stack([span_boundaries(SPANS, seq)] * 2))
    targets = boundaries[..., 0] >= 0
    positions = targets.flatten().nonzero().squeeze(1)
    inputs = {"input_ids": torch.randint(5, cfg.model.vocab_size, (2, seq)), "target_positions": positions}
    if cfg.model.generator_hidden_fraction is not None:
        return inputs | {"sample_seed": 1}
    if cfg.model.span_boundary_head:
        inputs["span_boundaries"] = boundaries
    return inputs | ({"classify_pair": True} if cfg.model.pair_head else {})


def test_counted_flops_are_those_of_each_models_forward_pass(plan):
    """Matmul FLOPs of a real forward (attention by the math kernel, so that it is counted too) against the
    benchmark's count; what differs is only biases and LayerNorms, which it counts as weights (< 1 %)."""
    for row in plan:
        cfg = load_config(REPO / "launch" / "recipes" / f"{row['member'].recipe}.yaml", row["overrides"])
        model = build_model(cfg.model).eval()
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(**_inputs(cfg))
        estimate = bench.forward_flops_per_sequence(cfg, MASKED / (cfg.data.seq_length - 2))
        assert counter.get_total_flops() / 2 == pytest.approx(estimate, rel=0.01), row["member"].name


def test_plan_spends_berts_flops_on_every_model(plan):
    names = [row["member"].name for row in plan]
    assert names == ["BERT", "RoBERTa", "ALBERT", "SpanBERT", "ELECTRA"]
    budget = plan[0]["flops"]
    assert plan[0]["steps"] == 600
    for row in plan:
        assert abs(row["flops"] - budget) <= row["flops_per_step"] / 2, row["member"].name
        assert f"train.train_steps={row['steps']}" in row["overrides"]
    electra, bert = plan[-1], plan[0]
    assert electra["flops_per_step"] > bert["flops_per_step"] and electra["steps"] < bert["steps"]


def test_arguments_are_checked(capsys):
    for argv, message in (
        (["--steps", "0"], "--steps must be at least 1"),
        (["--mask-prob", "1.5"], "--mask-prob must lie in (0, 1)"),
        (["--data", str(Path("/nonexistent"))], "no shards/manifest.json there"),
    ):
        with pytest.raises(SystemExit) as stop:
            bench.main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
