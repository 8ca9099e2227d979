"""The divergence guard: a non-finite step is skipped with parameters and optimizer state bitwise unchanged
on every ZeRO stage, and a diverging run stops (exit 3) without writing diverged weights."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO, free_port, launch_command, read_metrics, tiny_recipe, write_recipe

from plmscale.config import load_config
from plmscale.training.guard import nonfinite_to_nan


def test_nonfinite_to_nan_keeps_a_finite_loss_and_poisons_the_gradient_of_another():
    weight = torch.tensor([0.3, -1.7], requires_grad=True)
    loss = (weight * torch.tensor([2.0, 5.0])).sum()
    guarded = nonfinite_to_nan(loss)
    guarded.backward()
    assert guarded.item() == loss.item() and weight.grad.tolist() == [2.0, 5.0]

    weight.grad = None
    nonfinite_to_nan((weight * 2).sum() + math.inf).backward()  # +inf, whose gradient would be finite
    assert weight.grad.isnan().all()


def test_zero0_fp32_takes_the_guarded_optimizer_and_clips_itself(tmp_path):
    recipe = tiny_recipe(tmp_path / "shards", tmp_path / "out")
    for stage, precision, guarded in ((0, "fp32", True), (0, "bf16", False), (1, "fp32", False)):
        recipe["train"] |= {
            "deepspeed_config": str(REPO / "ds_configs" / f"zero{stage}.json"),
            "precision": precision,
        }
        cfg = load_config(write_recipe(tmp_path / "r.yaml", recipe))
        ds = cfg.deepspeed_config(2)
        assert cfg.guarded_optimizer is guarded
        assert ("optimizer" not in ds) is guarded
        assert ds["gradient_clipping"] == (0.0 if guarded else cfg.optimizer.grad_clip)


@pytest.mark.distributed
def test_nonfinite_step_is_skipped_bitwise_on_every_zero_stage(shards, tmp_path):
    """TP=2 on 2 processes; one rank's loss is +inf (its gradients finite) for one step."""
    recipe = write_recipe(
        tmp_path / "tp2.yaml", tiny_recipe(shards, tmp_path / "out", parallel={"tensor_parallel": 2})
    )
    out = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(REPO / "tests" / "dist" / "guard_skip.py"), str(recipe), str(out)],
        check=True, cwd=REPO, timeout=300, capture_output=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    zero_fp32 = [f"zero{stage}-fp32" for stage in range(4)]
    assert list(report) == [*zero_fp32, "zero0-bf16", "zero1_fp32_grads-bf16"]  # the last: BF16_Optimizer
    zero1_norm = report["zero1-fp32"][0]["first_norm"]
    for layout, ranks in report.items():
        for rank, r in enumerate(ranks):
            where = f"{layout} rank {rank}"
            assert r["lr_of_poisoned_step"] > 0, where  # so an applied update would have moved the weights
            # the reported loss is one copy per tensor-parallel group (rank 0's); rank 1's +inf shows in
            # the skipped update only
            assert r["loss_of_poisoned_step"] == pytest.approx(7.6, abs=0.2), where
            assert (
                not r["applied"] and r["skipped_steps"] == 1 and r["grad_norm_of_poisoned_step"] == math.inf
            )
            assert r["params_unchanged"] and r["optimizer_unchanged"] and r["scheduler_unchanged"], where
            assert r["optimizer_tensors"] >= 2, where  # Adam's moments were compared, not an empty dict
            assert r["skip_metrics"] == {"skipped_steps": 1}, where
            assert r["stop_message"].startswith("training diverged at step 3: loss "), where
            assert r["stop_message"].endswith(
                "gradient norm inf; update skipped, run stopped (train.on_nonfinite=stop)"
            )
            assert (
                r["next_step_applied"] and r["next_step_changed_params"] and r["consecutive_after_next"] == 0
            )
            assert "is above 3 x" in r["spike_message"] and r["below_spike_metrics"] == {"skipped_steps": 1}
            if layout.endswith("fp32"):  # one gradient norm whoever computes it: ZeRO or GuardedAdamW
                assert r["first_norm"] == pytest.approx(zero1_norm, rel=1e-6), where
    for rank in report["zero0-fp32"]:  # ... and it is the norm of the unsharded gradients (TP=2)
        assert rank["first_norm"] == pytest.approx(rank["reference_norm"], rel=1e-6)


def _diverging_run(
    shards, tmp_path, name: str, zero: int, **train
) -> tuple[subprocess.CompletedProcess, object]:
    """lr=1e30: DeepSpeed's warm-up gives steps 1-2 lr 0, step 3's update blows the weights up, and step 4's
    loss and gradients are not finite. A checkpoint every 2 steps, only the newest kept."""
    output = tmp_path / name
    recipe = tiny_recipe(
        shards, output, optimizer={"lr": 1e30, "warmup_steps": 1},
        train={"deepspeed_config": str(REPO / "ds_configs" / f"zero{zero}.json"), "save_interval": 2,
               "keep_checkpoints": 1, "eval_interval": 100, **train},
    )  # fmt: skip
    proc = subprocess.run(
        launch_command(write_recipe(tmp_path / f"{name}.yaml", recipe), 2),
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return proc, output


def _errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("plmscale: error:")]


@pytest.mark.distributed
def test_stop_exits_3_at_the_first_nonfinite_step_and_keeps_the_last_checkpoint(shards, tmp_path):
    proc, output = _diverging_run(shards, tmp_path, "stop", zero=0)
    assert proc.returncode == 3, proc.stderr[-3000:]
    (error,) = _errors(proc)
    assert error.startswith("plmscale: error: training diverged at step 4: loss nan, gradient norm inf;")
    assert error.endswith("update skipped, run stopped (train.on_nonfinite=stop)")
    assert not (output / "model").exists()
    checkpoints = output / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000002"]
    assert (checkpoints / "latest").read_text().strip() == "step_00000002"
    metrics = read_metrics(output)
    assert sorted(metrics) == [1, 2, 3]
    assert all(math.isfinite(row["grad_norm"]) and row["skipped_steps"] == 0 for row in metrics.values())


@pytest.mark.distributed
def test_skip_counts_skipped_steps_and_stops_after_max_consecutive(shards, tmp_path):
    proc, output = _diverging_run(shards, tmp_path, "skip", zero=2, on_nonfinite="skip", max_skipped_steps=2)
    assert proc.returncode == 3, proc.stderr[-3000:]
    (error,) = _errors(proc)
    assert error.startswith("plmscale: error: training diverged at step 5: loss nan, gradient norm inf;")
    assert error.endswith("2 consecutive updates skipped (train.max_skipped_steps=2)")
    metrics = read_metrics(output)
    assert [metrics[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 0, 1]
    assert math.isnan(metrics[4]["loss"]) and metrics[4]["grad_norm"] == math.inf
    # step 4 was skipped, so its checkpoint was not written and did not rotate step 2's away
    assert sorted(p.name for p in (output / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert not (output / "model").exists()
