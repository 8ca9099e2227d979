"""Kill -9 a 2-rank run at moment after moment of its checkpoint saves, resuming it each time: every resume
continues from a complete checkpoint, and the run ends with the uninterrupted run's losses, bit for bit."""

import os
import signal
import subprocess
import time
import zipfile

import pytest
from conftest import (
    REPO,
    launch,
    launch_command,
    read_metrics,
    tiny_recipe,
    unlink_shared_memory,
    write_recipe,
)

from plmscale.training.checkpoint import tag_for

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 6
# What the watcher waits for in the checkpoint being saved before it kills the launcher's process group.
MOMENTS = (
    "its directory is created",
    "a 1st rank file appears",
    "a 2nd rank file appears",
    "the 3rd rank file appears",
    "complete.json appears",
    "latest names it",
    "the previous checkpoint is rotated away",
)
KILLS = len(MOMENTS)  # one kill at each moment; the run moves on 3 steps, within STEPS
LEFTOVER = "killed-here.txt"  # marks the directory a kill left, to tell it from the next save's


def _recipe(shards, output, tmp_path, keep):
    # dropout on, so that exact resume also covers the dropout masks; a checkpoint after every step
    recipe = tiny_recipe(
        shards, output,
        model={"hidden_dropout": 0.1, "attention_dropout": 0.1},
        train={"train_steps": STEPS, "save_interval": 1, "eval_interval": 100, "keep_checkpoints": keep},
    )  # fmt: skip
    return write_recipe(tmp_path / f"{output.name}.yaml", recipe)


def _newest_recorded(ckpts) -> int:
    steps = [int(d.name[5:]) for d in ckpts.glob("step_*") if (d / "complete.json").is_file()]
    return max(steps, default=0)


def _state(ckpts, tag, previous) -> dict:
    tag_dir = ckpts / tag
    try:
        fresh = tag_dir.is_dir() and not (tag_dir / LEFTOVER).exists()
        files = sorted(p.name for p in tag_dir.glob("*.pt")) if fresh else []
    except FileNotFoundError:  # removed while listed: the save's clean-up of a leftover
        fresh, files = False, []
    latest = ckpts / "latest"
    return {
        "dir": fresh,
        "files": files,
        "record": fresh and (tag_dir / "complete.json").is_file(),
        "latest": fresh and latest.is_file() and latest.read_text() == tag,
        "previous_gone": previous is None or not (ckpts / previous).exists(),
    }


def _reached(moment: int, s: dict) -> bool:
    return (
        s["dir"], len(s["files"]) >= 1, len(s["files"]) >= 2, len(s["files"]) >= 3,
        s["record"], s["latest"], s["latest"] and s["previous_gone"],
    )[moment]  # fmt: skip


def _whole(tag_dir) -> dict[str, bool]:
    """Each torch file of a tag directory, and whether it is whole: a zip archive with its central
    directory, which torch writes last (a file cut short has none)."""
    return {p.name: zipfile.is_zipfile(p) for p in sorted(tag_dir.glob("*.pt"))}


def _describe(s: dict, tag_dir, expected: int) -> str:
    """What the kill left of the save, e.g. `2/3 files (1 partial), no record`."""
    if s["latest"]:
        return "published, " + ("previous removed" if s["previous_gone"] else "previous still there")
    if s["record"]:
        return "complete.json written, latest not yet"
    partial = sum(not whole for whole in _whole(tag_dir).values()) if s["dir"] else 0
    return f"{len(s['files'])}/{expected} files ({partial} partial), no record"


def _kill_at(recipe, ckpts, moment, log, timeout=300) -> dict:
    """Starts the run and SIGKILLs its whole process group once the save after its resume point reaches
    `moment`; returns where it resumed from, with that checkpoint's files, and what the save had reached."""
    resume = _newest_recorded(ckpts)
    resumed_files = _whole(ckpts / tag_for(resume))
    target, previous = tag_for(resume + 1), tag_for(resume) if resume else None
    if (ckpts / target).is_dir():
        (ckpts / target / LEFTOVER).touch()
    command = launch_command(recipe, 2)
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, cwd=REPO, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while not _reached(moment, _state(ckpts, target, previous)):
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"the run ended or stalled before {MOMENTS[moment]}:\n{log.read_text()[-3000:]}")
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    unlink_shared_memory(command)
    state = _state(ckpts, target, previous)
    return {
        "resume": resume,
        "files": resumed_files,
        "target": target,
        "left": _describe(state, ckpts / target, 3),
    }


def _resumed_from(log_text: str, ckpts, resume: int) -> bool:
    if resume == 0:
        return "resumed from" not in log_text
    return f"plmscale: resumed from {ckpts / tag_for(resume)} (step {resume})" in log_text


def test_kills_during_saves_resume_from_complete_checkpoints_with_identical_losses(shards, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    launch(_recipe(shards, straight, tmp_path, keep=1))
    names = sorted(_whole(straight / "checkpoints" / tag_for(STEPS)))
    recipe, ckpts = _recipe(shards, killed, tmp_path, keep=1), killed / "checkpoints"

    hits = []
    for kill in range(KILLS):
        moment = kill % len(MOMENTS)
        log = tmp_path / f"kill{kill:02d}.log"
        hit = _kill_at(recipe, ckpts, moment, log)
        assert _resumed_from(log.read_text(), ckpts, hit["resume"]), log.read_text()[-3000:]
        if hit["resume"]:  # what it resumed from was whole: every rank's file, none cut short
            assert hit["files"] == dict.fromkeys(names, True), hit
        hits.append((MOMENTS[moment], hit["target"], hit["left"]))

    print("\n".join(f"kill {i:2d}: {when:40s} {tag}: {left}" for i, (when, tag, left) in enumerate(hits)))
    resume = _newest_recorded(ckpts)
    assert _resumed_from(launch(recipe), ckpts, resume)
    assert len({(when, tag) for when, tag, _ in hits}) == KILLS
    assert sorted(p.name for p in ckpts.glob("step_*")) == [tag_for(STEPS)]  # leftovers and old ones rotated

    expected, resumed = read_metrics(straight), read_metrics(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert (resumed[step]["loss"], resumed[step]["lr"]) == (expected[step]["loss"], expected[step]["lr"])
    assert expected[STEPS]["loss"] < expected[1]["loss"]
