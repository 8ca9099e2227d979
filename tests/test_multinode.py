"""Two nodes on one machine (127.0.0.1 and 127.0.0.2): `launch/train.sh` with a hostfile, started once per
node (no ssh), or from one command through DeepSpeed's pdsh runner over a real sshd."""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BIN, REPO, free_port, read_metrics, tiny_recipe, write_recipe

pytestmark = pytest.mark.distributed
SSHD = Path("/usr/sbin/sshd")


@pytest.fixture(scope="module")
def per_node_run(shards, tmp_path_factory):
    """(output directory, each node's log) of a 2-node run started once per node without ssh."""
    tmp_path = tmp_path_factory.mktemp("per_node")
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
    return output, logs


def test_hostfile_launch_trains_across_two_nodes(per_node_run):
    output, logs = per_node_run
    for log in logs:
        assert "dist_world_size=2" in log
    metrics = read_metrics(output)
    assert sorted(metrics) == [1, 2, 3]
    # 2 ranks x micro-batch 8 sequences of 64 tokens, 15 % of each predicted
    assert metrics[1]["targets"] == 2 * 8 * round(64 * 0.15)
    assert (output / "model" / "model.safetensors").is_file()


@pytest.fixture
def sshd(tmp_path_factory):
    """A private sshd on a free port of 127.0.0.1 and 127.0.0.2 that accepts a fresh key, and a `bin/` whose
    `ssh` uses that key (pdsh and DeepSpeed's ssh check run `ssh` from PATH). Stopped at the end."""
    missing = [tool for tool in ("pdsh", "ssh", "ssh-keygen") if not shutil.which(tool)]
    if missing or not SSHD.is_file():
        pytest.skip(
            f"needs openssh-server and pdsh (.ci/run installs them); missing: {missing or [str(SSHD)]}"
        )
    if not Path("/run/sshd").is_dir():  # sshd's privilege-separation directory, made by its service unit
        if os.geteuid() != 0:
            pytest.skip("/run/sshd (sshd's privilege-separation directory) is missing and this is not root")
        Path("/run/sshd").mkdir(mode=0o755)
    root = tmp_path_factory.mktemp("ssh")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nHostKey {root}/host_key\n"
        f"AuthorizedKeysFile {root}/user_key.pub\nPidFile {root}/sshd.pid\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nLogLevel ERROR\n"
    )
    (root / "ssh_config").write_text(
        f"Host *\n  IdentityFile {root}/user_key\n  IdentitiesOnly yes\n  BatchMode yes\n  LogLevel ERROR\n"
        f"  UserKnownHostsFile {root}/known_hosts\n  StrictHostKeyChecking accept-new\n"
    )
    (root / "bin").mkdir()
    wrapper = root / "bin" / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {root}/ssh_config "$@"\n')
    wrapper.chmod(0o755)
    server = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(root / "sshd_config")], stderr=subprocess.PIPE
    )
    try:
        for host in ("127.0.0.1", "127.0.0.2"):
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection((host, port), timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"sshd did not start: {server.stderr.read().decode()}")
                    time.sleep(0.1)
        yield {"port": port, "bin": root / "bin", "root": root}
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_pdsh_launch_over_ssh_equals_the_per_node_launch(shards, tmp_path, sshd, per_node_run):
    """One command starts both nodes through pdsh and ssh; the losses are those of the same two ranks
    started once per node."""
    recipe = tiny_recipe(shards, tmp_path / "single", train={"train_steps": 3})
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    env_file = tmp_path / "deepspeed_env"  # what .deepspeed_env would hold: sent to every node
    env_file.write_text("OMP_NUM_THREADS=1\nDS_ACCELERATOR=cpu\n")
    recipe["train"]["output_dir"] = str(tmp_path / "nodes")
    env = os.environ | {
        "PATH": f"{sshd['bin']}:{BIN}:{os.environ['PATH']}", "HOSTFILE": str(hostfile),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "SSH_PORT": str(sshd["port"]),
        "DS_ENV_FILE": str(env_file),
    }  # fmt: skip
    env.pop("NODE_RANK", None)
    started = time.perf_counter()
    proc = subprocess.run(
        [str(REPO / "launch" / "train.sh"), str(write_recipe(tmp_path / "nodes.yaml", recipe))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    nodes_seconds = time.perf_counter() - started
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "cmd = pdsh" in log and "export OMP_NUM_THREADS=1; export DS_ACCELERATOR=cpu;" in log
    for node in ("127.0.0.1", "127.0.0.2"):  # pdsh prefixes each line of a node with its host
        assert any(line.startswith(f"{node}: ") and "dist_world_size=2" in line for line in log.splitlines())
    per_node, nodes = read_metrics(per_node_run[0]), read_metrics(tmp_path / "nodes")
    assert sorted(nodes) == sorted(per_node) == [1, 2, 3]
    for step in per_node:
        assert nodes[step]["loss"] == pytest.approx(per_node[step]["loss"], rel=1e-6), step
    print(
        f"losses {[per_node[s]['loss'] for s in sorted(per_node)]} (started per node) vs "
        f"{[nodes[s]['loss'] for s in sorted(nodes)]} (2 nodes over pdsh/ssh, {nodes_seconds:.1f} s)"
    )
