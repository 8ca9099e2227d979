"""The README's two commands: `make demo` (here shortened) runs the whole path; `make test` is CI's."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.distributed


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_starts_with_the_two_commands_ci_uses():
    assert readme_commands()[:2] == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_make_demo_runs_end_to_end(tmp_path):
    env = os.environ | {
        "DEMO_DIR": str(tmp_path / "demo"),
        "DEMO_TEACHER_STEPS": "40",
        "DEMO_STUDENT_STEPS": "10",
        "DEMO_FINETUNE_EPOCHS": "1",
    }
    venv = Path(sys.prefix)
    proc = subprocess.run(
        ["make", "demo", f"VENV={venv}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "demo"
    report = proc.stdout
    fall = re.search(r"teacher: train loss ([\d.]+) \(step \d+\) -> ([\d.]+) \(step 40\), fell by", report)
    assert fall and float(fall[2]) < float(fall[1]) - 0.5, report[-3000:]
    assert re.search(r"student vs teacher: [\d.]+x the speed", report)
    # the fine-tuning table's student row: loss, accuracy, macro-F1, seconds, accuracy as a share of the teacher's
    finetuned = r"^student +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+%$"
    assert re.search(finetuned, report, re.M)
    for path in ("teacher/model/model.safetensors", "student/model/model.safetensors", "student_hf/config.json",
                 "teacher/tensorboard", "teacher/checkpoints/latest", "loss_curves.png",
                 "data/shards/manifest.json", "finetuned/student/classifier.safetensors"):  # fmt: skip
        assert (out / path).exists(), path
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "demo wall time" in report
