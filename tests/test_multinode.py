"""Two nodes on one machine: `launch/train.sh` with a hostfile, started once per node."""

import os
import subprocess

import pytest
from conftest import BIN, REPO, free_port, read_metrics, tiny_recipe, write_recipe

pytestmark = pytest.mark.distributed


def test_hostfile_launch_trains_across_two_nodes(shards, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    output = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(shards, output, train={"train_steps": 3}))
    env = os.environ | {
        "PATH": f"{BIN}:{os.environ['PATH']}", "HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }  # fmt: skip
    nodes = [
        subprocess.Popen(
            [str(REPO / "launch" / "train.sh"), str(recipe)],
            cwd=REPO,
            env=env | {"NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    for log in logs:
        assert "dist_world_size=2" in log
    metrics = read_metrics(output)
    assert sorted(metrics) == [1, 2, 3]
    # 2 ranks x micro-batch 8 sequences of 64 tokens, 15 % of each predicted
    assert metrics[1]["targets"] == 2 * 8 * round(64 * 0.15)
    assert (output / "model" / "model.safetensors").is_file()
