"""Kill a run after a checkpoint, start it again: it reproduces the uninterrupted run's losses."""

import os
import signal
import subprocess
import time

import pytest
from conftest import REPO, launch, launch_command, read_metrics, tiny_recipe, write_recipe

pytestmark = pytest.mark.distributed

STEPS, SAVE_AT = 12, 6


def _recipe(shards, output, tmp_path, name):
    # dropout on, so that exact resume also covers the dropout masks
    recipe = tiny_recipe(
        shards, output,
        model={"hidden_dropout": 0.1, "attention_dropout": 0.1},
        train={"train_steps": STEPS, "save_interval": SAVE_AT, "eval_interval": 100},
    )  # fmt: skip
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


def _kill_after_checkpoint(recipe, output, timeout=240):
    """Starts the run and SIGKILLs the whole launcher group once the first checkpoint is written."""
    proc = subprocess.Popen(
        launch_command(recipe, 2), cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    latest = output / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout
    while not (latest.is_file() and latest.read_text().strip() == f"step_{SAVE_AT:08d}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the run ended or stalled before writing its first checkpoint")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (output / "model").exists(), "the run finished before it could be killed"


def test_killed_run_resumes_with_identical_losses(shards, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    launch(_recipe(shards, straight, tmp_path, "straight"))
    _kill_after_checkpoint(_recipe(shards, killed, tmp_path, "killed"), killed)
    launch(_recipe(shards, killed, tmp_path, "killed"))

    expected, resumed = read_metrics(straight), read_metrics(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-6, abs=1e-7), step
        assert resumed[step]["lr"] == pytest.approx(expected[step]["lr"], rel=1e-9)
    assert expected[STEPS]["loss"] < expected[1]["loss"]
