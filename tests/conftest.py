"""Shared fixtures: a small real corpus, tokenizer and shards, and a way to launch gloo process groups."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TEST_VOCAB = 2000
ZH_WORDS = [  # two-character words; their pieces are what whole-word masking keeps together
    "我们", "北京", "大学", "学习", "人工", "智能", "中国", "历史", "文化", "经济",
    "发展", "科学", "技术", "研究", "老师", "学生", "今天", "天气", "很好", "喜欢",
    "音乐", "电影", "城市", "生活", "朋友", "工作", "问题", "方法", "世界", "和平",
]  # fmt: skip

# Subprocesses (the deepspeed launcher and its ranks) run on DeepSpeed's CPU accelerator, 1 thread each.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The embedded corpus (first ~400 KB), a 2000-piece tokenizer and its shards."""
    from data_prep.corpus import write_corpus
    from data_prep.shards import build_shards
    from data_prep.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("data")
    write_corpus(root / "corpus.jsonl", max_mb=0.4)
    train_tokenizer([root / "corpus.jsonl"], root / "tokenizer", vocab_size=TEST_VOCAB)
    build_shards(
        [root / "corpus.jsonl"], root / "tokenizer" / "tokenizer.model", root / "shards",
        workers=2, valid_fraction=0.05, progress=False,
    )  # fmt: skip
    return root / "shards"


@pytest.fixture(scope="session")
def instance_sets(shards, tmp_path_factory) -> dict[str, Path]:
    """Instance sets of the shards for the pair objectives (NSP, SOP), MLM and BART's denoising."""
    from data_prep.instances.build import build_instances

    root = tmp_path_factory.mktemp("pair_instances")
    for kind in ("nsp", "sop", "mlm"):
        build_instances(shards, kind, root / kind, params={"max_seq_length": 64}, progress=False)
    build_instances(shards, "denoising", root / "denoising", progress=False)  # BART: no MLM fields
    return {kind: root / kind for kind in ("nsp", "sop", "mlm", "denoising")}


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """`shared_run(name, recipe_for, nprocs)`: the output directory of a run launched once per session for the
    test modules that read it (8 processes take a minute to start on 2 cores), `recipe_for(output_dir)` its
    recipe. Each module asks with its own recipe: they must be the same, or the test fails."""
    root, runs = tmp_path_factory.mktemp("shared_runs"), {}

    def run(name: str, recipe_for, nprocs: int) -> Path:
        output = root / name
        requested = recipe_for(output), nprocs
        if name not in runs:
            launch(write_recipe(root / f"{name}.yaml", requested[0]), nprocs=nprocs, timeout=600)
            runs[name] = requested
        assert runs[name] == requested, f"run {name} asked for with another recipe: {runs[name]} {requested}"
        return output

    return run


def tiny_recipe(shards: Path, output_dir: Path, kind: str = "encoder", **sections) -> dict:
    """A recipe small enough to train a few steps on 2 CPU processes in seconds."""
    recipe = {
        "model": {
            "kind": kind, "vocab_size": TEST_VOCAB, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
            "max_position_embeddings": 64, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        },
        "data": {"shards": str(shards), "seq_length": 64},
        "objective": {"name": "mlm" if kind == "encoder" else "causal_lm"},
        "parallel": {"tensor_parallel": 1},
        "optimizer": {"lr": 3e-3, "warmup_steps": 1, "decay": "linear"},
        "train": {
            "deepspeed_config": str(REPO / "ds_configs" / "zero2.json"), "micro_batch_size": 8,
            "global_batch_size": 16, "train_steps": 8, "seed": 7, "output_dir": str(output_dir),
            "log_interval": 1, "eval_interval": 4, "eval_batches": 2, "save_interval": 4,
        },
    }  # fmt: skip
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch_command(recipe: Path, nprocs: int, command: str = "train") -> list[str]:
    return [
        str(BIN / "deepspeed"), "--no_local_rank", "--num_gpus", str(nprocs), "--master_port", str(free_port()),
        "--module", "plmscale.cli", command, "--config", str(recipe),
    ]  # fmt: skip


def unlink_shared_memory(command: list[str]) -> list[str]:
    """DeepSpeed's CPU all-reduce maps a 66 MB /dev/shm segment per rank and never unlinks it; plmscale's
    ranks unlink theirs once all have started (`plmscale.parallel.distributed.unlink_shared_memory`), a launch
    that fails earlier leaves them: removes and names this launch's, lest a suite hold gigabytes."""
    port = command[command.index("--master_port") + 1]
    segments = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    for segment in segments:
        segment.unlink(missing_ok=True)
    return [segment.name for segment in segments]


def launch(recipe: Path, nprocs: int = 2, command: str = "train", timeout: int = 900) -> str:
    """Runs a recipe under the real deepspeed launcher; fails the test with the log if it fails."""
    argv = launch_command(recipe, nprocs, command)
    try:
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    finally:
        left_behind = unlink_shared_memory(argv)
    if proc.returncode != 0:
        pytest.fail(f"launch failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    assert not left_behind, f"a run that ended well left shared memory behind: {left_behind}"
    return proc.stdout


def read_metrics(output_dir: Path, kind: str = "train") -> dict[int, dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines) if row["kind"] == kind}


def train_single_process(
    model, objective, source, steps, lr: float = 3e-3, first_step: int = 0
) -> list[dict]:
    """A few AdamW steps of `model` on `source`'s micro-batches as the trainer weighs them (each term's
    mean, the breakdown terms left out); per step, each term's (mean loss, targets, argmax hits)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    for step in range(first_step, first_step + steps):
        batch = source.micro_batches(step, 1)[0]
        outputs = model(**objective.model_inputs(batch))
        terms = objective.loss_terms(outputs, batch, model.spec, count_correct=True)
        trained = [term for name, term in terms.items() if name not in objective.breakdown_terms]
        optimizer.zero_grad()
        sum(term.sum / term.count for term in trained).backward()
        optimizer.step()
        history.append(
            {name: (term.sum.item() / term.count, term.count, term.correct) for name, term in terms.items()}
        )
    return history
