"""The training benchmark runs end to end (tiny shapes, 2 steps) and prints tables that parse.

Speed itself is not tested here: benchmarks/bench_train.py is where it is measured.
"""

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.distributed


def _rows(report: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with `header`."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_quick_benchmark_prints_both_families_against_their_peers(shards):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--quick", "--shards", str(shards)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = proc.stdout
    assert float(re.search(r"matmul peak measured: ([\d,.]+) GFLOP/s", report)[1].replace(",", "")) > 0

    speed = _rows(report, "| shape | implementation |")
    implementations = {(row[0].split()[0], row[1]) for row in speed}
    assert implementations == {
        ("GPT", "plmscale"), ("GPT", "GPT2LMHeadModel"),
        ("BERT", "plmscale"), ("BERT", "MegatronBertForMaskedLM"), ("BERT", "BertForMaskedLM"),
    }  # fmt: skip
    for shape, name, tokens_per_s, step_ms, cpu_ms, mfu, memory, ratio, cpu_ratio in speed:
        assert _number(tokens_per_s) > 0 and _number(step_ms) > 0 and _number(cpu_ms) > 0, name
        assert _number(mfu) > 0 and _number(memory) > 50, name
        # the ratio columns are plmscale's tokens/s over this row's, and this row's CPU ms over plmscale's
        ours = next(row for row in speed if row[0] == shape and row[1] == "plmscale")
        assert _number(ratio) == pytest.approx(_number(ours[2]) / _number(tokens_per_s), rel=0.02, abs=0.01)
        assert _number(cpu_ratio) == pytest.approx(_number(cpu_ms) / _number(ours[4]), rel=0.02, abs=0.01)

    phases = _rows(report, "| shape | data |")
    assert [row[0].split()[0] for row in phases] == ["GPT", "BERT"]
    for row in phases:
        data, forward, loss, backward, optimizer, other, step = map(_number, row[1:])
        assert min(data, loss) >= 0 and min(forward, backward, optimizer) > 0
        assert data + forward + loss + backward + optimizer + other == pytest.approx(step, abs=0.5)


def test_gpu_check_parses_its_arguments_on_the_cpu(tmp_path):
    """The GPU check's command line is checked here, so that a GPU session does not fail on a typo: the dry
    run names both large shapes and their peers; a bad argument is one line, exit 2."""
    env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu"}
    script = str(REPO / "benchmarks" / "gpu_check.sh")
    dry = subprocess.run(["bash", script, "--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "ds_configs/zero1_fp32_grads.json" in dry.stdout
    assert "GPT 24 x 2048, seq 2048, micro 8 (GPT-3 XL): 16384 tokens per step" in dry.stdout
    assert "BERT-large): 16384 tokens per step" in dry.stdout and "BertForMaskedLM" in dry.stdout
    real = subprocess.run(
        ["bash", script, "--shards", str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert real.returncode == 2 and real.stderr.strip().endswith(
        f"--shards {tmp_path}: no manifest.json there (a directory of shards is expected)"
    )
