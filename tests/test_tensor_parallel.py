"""Tensor parallelism on real gloo process groups: sharded == unsharded, and TP=2 trains like TP=1."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, free_port, launch, read_metrics, tiny_recipe, write_recipe

pytestmark = pytest.mark.distributed


def test_tp2_forward_and_backward_equal_unsharded_reference(tmp_path):
    """The model, and every distillation loss from a TP=2 teacher into a narrower TP=2 student."""
    out = tmp_path / "tp.json"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), str(REPO / "tests" / "dist" / "tp_equivalence.py"), str(out)],
        check=True, cwd=REPO, timeout=360,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["tp_size"] == 2
    for name in ("encoder", "decoder", "albert"):
        diffs = report[name]
        assert diffs["loss_value"] > 5.0  # an untrained model over a 256-piece vocabulary
        assert diffs["loss"] < 1e-5
        assert diffs["logits"] < 1e-5 and diffs["all_logits"] < 1e-5
        assert diffs["grad_scale"] > 1e-3 and diffs["grads"] < 1e-5
        assert diffs["reload"] == 0.0
    for kind in ("encoder", "decoder"):
        distill = report["distill"][kind]  # a TP=2 teacher and student give the TP=1 losses and gradients
        assert len(distill["terms"]) == 8 and min(abs(v) for v in distill["terms"].values()) > 1e-4
        assert distill["terms_diff"] < 1e-5
        assert distill["grad_scale"] > 1e-3 and distill["grads"] < 1e-5 and distill["projection_grads"] < 1e-5
    unilm = {"mlm", "right_to_left", "seq2seq", "left_to_right"}
    for name, terms in (("mlm_sbo", {"mlm", "sbo"}), ("electra", {"mlm", "rtd"}), ("unilm", unilm)):
        diffs = report[name]
        assert set(diffs["term_values"]) == terms and min(diffs["term_values"].values()) > 0.1
        assert diffs["terms"] < 1e-5 and diffs["same_samples"]
        assert diffs["grad_scale"] > 1e-3 and diffs["grads"] < 1e-5


def test_tp2_training_matches_tp1(shards, tmp_path):
    """From one seed, TP=2 holds the same full weights and follows the same loss curve as TP=1."""
    losses = {}
    for tp in (1, 2):
        output = tmp_path / f"tp{tp}"
        recipe = tiny_recipe(
            shards, output, kind="decoder", parallel={"tensor_parallel": tp},
            train={"deepspeed_config": str(REPO / "ds_configs" / "zero1.json"), "global_batch_size": 8,
                   "train_steps": 5, "save_interval": 100},
        )  # fmt: skip
        launch(write_recipe(tmp_path / f"tp{tp}.yaml", recipe), nprocs=tp)
        losses[tp] = [row["loss"] for row in read_metrics(output).values()]
    assert len(losses[1]) == 5
    assert losses[1][-1] < losses[1][0]
    assert losses[2] == pytest.approx(losses[1], rel=1e-4)
