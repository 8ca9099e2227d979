"""The README's commands, in order, as a new user types them: `make demo` (shortened), then every command
after it in a working directory whose `runs/demo` is that demo's output. `make test` is CI's own command."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.distributed

# a seventh of the demo's teacher steps: held-out accuracy 15.3 % (seed 1234) and 15.1 % (seed 1), loss 4.36
# and 4.32, against the unigram baseline's 7.1 % and 4.76 (at 120 steps: 12.7 %, 4.53); the full demo's: 45 %
DEMO_STEPS = {"DEMO_TEACHER_STEPS": "200", "DEMO_STUDENT_STEPS": "20", "DEMO_FINETUNE_EPOCHS": "1"}
# Run elsewhere, or not runnable on one CI machine: the README command (its start) and why.
NOT_RUN = {
    "make test": "CI's own command",
    "HOSTFILE=": "a cluster's hostfile and ssh (tests/test_multinode.py launches two nodes over pdsh)",
    "scontrol ": "SLURM",
    "srun ": "SLURM",
    "python benchmarks/": "benchmarks (tests/test_bench_train.py runs them shortened)",
    "bash benchmarks/": "a GPU's benchmark (tests/test_bench_train.py runs its dry run)",
    # their launches above run as pre-launch checks here; tests/test_albert_roberta.py, test_electra.py export
    "plmscale export --model runs/demo/roberta/": "exports the RoBERTa run above",
    "plmscale export --model runs/demo/albert/": "exports the ALBERT run above",
    "plmscale export --model runs/demo/electra/": "exports the ELECTRA run above",
    "plmscale eval --teacher runs/demo/bert_nsp/": "scores the NSP run (tests/test_heldout_units_pairs.py does)",
    "deepspeed ": "a second launch (tests/test_reshard.py converts checkpoints)",
    "plmscale finetune --model runs/demo/tinybert_general/": "distills the general stage above, a pre-launch "
    "check here (tests/test_task_distill.py runs task distillation)",
    "plmscale compress ": "minutes of fine-tuning and exports (tests/test_compress.py runs it on a tiny model)",
}
RECIPE = "launch/recipes/gpt_tiny.yaml"  # the README's RECIPE placeholder
GPT_TRAINING = "launch/train.sh launch/recipes/gpt_tiny.yaml"
SHORTER_GPT = "train.train_steps=4 optimizer.warmup_steps=2 train.eval_batches=1 train.log_interval=2"
SHORTER = {"--dupe-factor 5": "--dupe-factor 1", "--workers 16": "--workers 2"}  # a tenth of the time


def readme_commands() -> list[str]:
    """Every command of every ```bash block, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for command in re.sub(r"\\\n\s*", "", block).splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command:
                commands.append(command)
    return commands


def how_to_run(command: str) -> str | None:
    """The command the test runs for a README command, or None for those in NOT_RUN. Launches other than
    the small GPT's (one multi-process launch is enough to show that the recipes find the demo's data) run
    their pre-launch checks at the launch's world size: the recipe, its data and the output directory."""
    if command.startswith(tuple(NOT_RUN)):
        return None
    command = command.replace("RECIPE", RECIPE)
    if command == GPT_TRAINING:
        return f"{command} {SHORTER_GPT}"
    if "launch/train.sh" in command:
        env, _, rest = command.partition("launch/train.sh ")
        procs = re.search(r"NUM_PROCS=(\d+)", env)
        recipe, *overrides = shlex.split(rest)
        world = procs[1] if procs else "2"
        verb = "distill" if "--distill" in overrides else "train"
        overrides = [item for item in overrides if item != "--distill"]
        return shlex.join(
            ["plmscale", verb, "--config", recipe, "--validate-only", "--world-size", world, *overrides]
        )
    for old, new in SHORTER.items():
        command = command.replace(old, new)
    if command.startswith("plmscale finetune"):
        command += " --epochs 1"  # the demo's own fine-tuning runs a shortened demo's too
    return command


def test_readme_starts_with_the_two_commands_ci_uses():
    assert readme_commands()[:2] == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_readme_commands_not_run_are_the_expected_ones():
    skipped = [c for c in readme_commands() if how_to_run(c) is None]
    starts = [next(start for start in NOT_RUN if c.startswith(start)) for c in skipped]
    assert starts == ["make test", "HOSTFILE=", "HOSTFILE=", "plmscale export --model runs/demo/roberta/",
                      "plmscale export --model runs/demo/albert/", "plmscale export --model runs/demo/electra/",
                      "python benchmarks/", "python benchmarks/",
                      "deepspeed ", "scontrol ", "srun ", "python benchmarks/", "python benchmarks/",
                      "bash benchmarks/", "bash benchmarks/", "plmscale eval --teacher runs/demo/bert_nsp/",
                      "plmscale finetune --model runs/demo/tinybert_general/", "plmscale compress "], skipped  # fmt: skip


def test_readme_commands_run_in_order_after_make_demo(tmp_path):
    """`make demo`, shortened, learns (accuracy above the unigram-frequency baseline), then the README's
    commands run in order in a directory holding its output as runs/demo."""
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    (work / "launch").symlink_to(REPO / "launch")
    env = os.environ | DEMO_STEPS | {"DEMO_DIR": str(work / "runs" / "demo")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    venv = Path(sys.prefix)
    proc = subprocess.run(
        ["make", "demo", f"VENV={venv}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    check_demo_report(proc.stdout, work / "runs" / "demo")

    for command in readme_commands()[2:]:
        run = how_to_run(command)
        if run is None:
            continue
        done = subprocess.run(run, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        if "fill-mask" in command:
            assert "filled: " in done.stdout and "[MASK]" not in done.stdout.split("filled: ")[1], done.stdout
        if command.startswith("plmscale generate"):
            assert done.stdout.startswith("Return the absolute") or "[1] Return the absolute" in done.stdout
    assert (work / "runs" / "gpt_tiny" / "model" / "model.safetensors").is_file()
    assert (work / "runs" / "my_bert" / "model" / "config.yaml").is_file()
    assert (work / "data" / "nsp" / "manifest.json").is_file()


def check_demo_report(report: str, out: Path) -> None:
    """The shortened demo's teacher is clearly above the frequency baseline, the report says how far, and every
    output is where the report and the README say."""
    held_out = report[report.index("Held-out (") : report.index("CPU inference (")]
    rows = re.findall(r"^  (baseline|teacher|student) +([\d.]+) +([\d.]+)", held_out, re.M)
    table = {name: (float(loss), float(accuracy)) for name, loss, accuracy in rows}
    assert table.keys() == {"baseline", "teacher", "student"}, report[-3000:]
    (base_loss, base_acc), (teacher_loss, teacher_acc) = table["baseline"], table["teacher"]
    assert teacher_acc > base_acc + 0.015 and teacher_loss < base_loss - 0.1, report[-3000:]
    assert table["student"][1] > base_acc, report[-3000:]
    assert re.search(r"student / teacher: [\d.]+% of the accuracy", report)
    assert re.search(r"student vs teacher: [\d.]+x the speed at batch 1, [\d.]+x at batch 32", report)
    assert "Fill-mask on held-out sentences" in report
    # the fine-tuning table's student row: loss, accuracy, macro-F1, seconds, accuracy as a share of the teacher's
    assert re.search(r"^student +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+%$", report, re.M), report[-3000:]
    for path in ("teacher/model/model.safetensors", "student/model/model.safetensors", "student_hf/config.json",
                 "teacher/tensorboard", "teacher/checkpoints/latest", "loss_curves.png",
                 "data/shards/manifest.json", "finetuned/student/classifier.safetensors"):  # fmt: skip
        assert (out / path).exists(), path
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "demo wall time" in report
