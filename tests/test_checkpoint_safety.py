"""Checkpoints of a real 2-rank run, damaged the ways a crash, a disk or an attacker would: resume picks the
newest complete one, says why it skipped others, refuses tampered files and never unpickles code."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess

import pytest
import torch
from conftest import REPO, launch, launch_command, read_metrics, tiny_recipe, write_recipe
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

from plmscale import model_dir
from plmscale.config import ConfigError, load_config
from plmscale.training import checkpoint

pytestmark = pytest.mark.distributed

STEPS = 3
OPTIM = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def _recipe(shards, output, steps=STEPS):
    recipe = tiny_recipe(
        shards, output, train={"train_steps": steps, "save_interval": 1, "keep_checkpoints": STEPS}
    )
    return write_recipe(output.parent / f"{output.name}-{steps}.yaml", recipe)


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A run that saved a checkpoint after each of its 3 steps."""
    output = tmp_path_factory.mktemp("trained") / "run"
    launch(_recipe(shards, output))
    return output


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run, to damage."""
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _payload(marker):
    """A torch.save file whose unpickling runs a shell command (what a malicious checkpoint would hold)."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    return {"optimizer_state_dict": Payload(), "ds_version": "0.19.8"}


def test_a_save_is_published_with_a_record_of_every_file(trained):
    ckpts = trained / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step_{STEPS:08d}"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{s:08d}" for s in range(1, STEPS + 1)]
    for tag_dir in ckpts.glob("step_*"):
        record = json.loads((tag_dir / "complete.json").read_text())
        on_disk = sorted(
            str(p.relative_to(tag_dir))
            for p in tag_dir.rglob("*")
            if p.is_file() and p.name != "complete.json"
        )
        assert sorted(record["files"]) == on_disk
        # rank 0's model states, each rank's optimizer states; the layout-free state (plmscale/training/reshard.py)
        assert [name for name in on_disk if "/" not in name] == [
            "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", OPTIM
        ]  # fmt: skip
        assert [name for name in on_disk if "/" in name] == [
            f"layout_free/{state}.stage00.safetensors" for state in ("exp_avg", "exp_avg_sq", "fp32")
        ] + ["layout_free/meta.json"]
        for name, entry in record["files"].items():
            assert entry == {"bytes": (tag_dir / name).stat().st_size, "sha256": _sha256(tag_dir / name)}
        assert record["step"] == int(tag_dir.name[5:]) and record["world_size"] == 2


@pytest.mark.parametrize("latest", ["", "\x00\xff garbage", "step_00000009"])
def test_a_bad_latest_is_not_trusted(run, latest):
    (run / "checkpoints" / "latest").write_bytes(latest.encode("latin-1"))
    chosen, notes = checkpoint.newest_complete(run / "checkpoints")
    assert chosen == run / "checkpoints" / "step_00000003"
    assert len(notes) == 1 and "latest" in notes[0] and "step_00000003" in notes[0]
    assert ("is empty" in notes[0]) if not latest else ("names" in notes[0])


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(run):
    ckpts = run / "checkpoints"
    size = (ckpts / "step_00000003" / OPTIM).stat().st_size
    os.truncate(ckpts / "step_00000003" / OPTIM, size // 2)
    (ckpts / "step_00000002" / "complete.json").unlink()  # as if killed before its record: skipped too
    chosen, notes = checkpoint.newest_complete(ckpts)
    assert chosen == ckpts / "step_00000001"
    assert f"{OPTIM} has {size // 2} bytes, {size} recorded" in notes[0] and "step_00000003" in notes[0]
    assert "step_00000002" in notes[1] and "no complete.json" in notes[1]
    assert "names 'step_00000003'" in notes[2]


def test_nothing_complete_means_a_fresh_start(run):
    for record in (run / "checkpoints").glob("step_*/complete.json"):
        record.write_text("{not json")
    chosen, notes = checkpoint.newest_complete(run / "checkpoints")
    assert chosen is None and len(notes) == STEPS + 1
    assert all("unreadable complete.json" in note for note in notes[:STEPS])


def test_rotation_never_removes_the_newest_complete_checkpoint(run):
    ckpts = run / "checkpoints"
    (ckpts / "step_00000003" / "complete.json").unlink()  # a save killed before it was published
    (ckpts / "step_00000004").mkdir()  # and one killed as it began
    checkpoint.rotate(ckpts, keep=1)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002"]
    assert checkpoint.newest_complete(ckpts)[0] == ckpts / "step_00000002"


def test_rotation_keeps_the_newest_complete_ones(run):
    ckpts = run / "checkpoints"
    checkpoint.rotate(ckpts, keep=2)
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000003"]


def _problems(tag_dir):
    record = json.loads((tag_dir / "complete.json").read_text())
    return checkpoint.verify(tag_dir, record, sorted(record["files"]))


def test_verify_names_a_flipped_byte_and_an_unrecorded_file(run):
    tag_dir = run / "checkpoints" / "step_00000003"
    assert _problems(tag_dir) == []
    data = bytearray((tag_dir / OPTIM).read_bytes())
    data[len(data) // 2] ^= 0x01
    (tag_dir / OPTIM).write_bytes(data)
    (tag_dir / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert _problems(tag_dir) == [
        "zero_pp_rank_2_mp_rank_00_optim_states.pt is not in its complete.json",
        f"{OPTIM} does not match the sha256 in complete.json (corrupt or tampered)",
    ]


def _plant_payload(tag_dir, marker, zipped=True):
    """Replaces rank 1's optimizer file with a payload and rewrites the record to match, as an attacker
    able to write the checkpoint directory could; `zipped=False` writes torch's legacy format, which
    torch's static scan of a file cannot read."""
    torch.save(_payload(marker), tag_dir / OPTIM, _use_new_zipfile_serialization=zipped)
    record = json.loads((tag_dir / "complete.json").read_text())
    record["files"][OPTIM] = {"bytes": (tag_dir / OPTIM).stat().st_size, "sha256": _sha256(tag_dir / OPTIM)}
    (tag_dir / "complete.json").write_text(json.dumps(record))


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_planted_payload_is_never_unpickled(run, tmp_path, zipped):
    """Even with its record rewritten to match, the payload is named by verify (zip format) and refused by
    the weights-only loading that DeepSpeed's own checkpoint engine then goes through (both formats)."""
    tag_dir, marker = run / "checkpoints" / "step_00000003", tmp_path / "payload-ran"
    _plant_payload(tag_dir, marker, zipped)
    named = [f"{OPTIM} holds pickled objects that are not data: posix.system"]
    assert _problems(tag_dir) == (named if zipped else [])
    engine = TorchCheckpointEngine()
    with (
        checkpoint.weights_only_loading(),
        pytest.raises(pickle.UnpicklingError, match="GLOBAL posix.system"),
    ):
        engine.load(str(tag_dir / OPTIM))
    assert not marker.exists()
    # the untouched files, of every kind DeepSpeed writes here, load under the same rule
    with checkpoint.weights_only_loading():
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            assert engine.load(str(tag_dir / name))["ds_version"]
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_resume_refuses_a_planted_payload_with_one_line(shards, run, tmp_path):
    """The payload the static scan cannot see: resume fails on its weights-only load, with one line."""
    tag_dir, marker = run / "checkpoints" / "step_00000003", tmp_path / "payload-ran"
    _plant_payload(tag_dir, marker, zipped=False)
    proc = subprocess.run(
        launch_command(_recipe(shards, run, steps=STEPS + 1), 2), cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("plmscale: error:")]
    assert proc.returncode != 0 and not marker.exists()
    assert len(errors) == 1, proc.stderr[-3000:]  # printed once, by rank 0, every rank stopped
    assert errors[0] == (
        f"plmscale: error: {tag_dir}: holds a pickled object that is not data: "
        "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
    )


def test_a_resume_past_an_incomplete_checkpoint_continues_the_run(shards, trained, run):
    """The newest checkpoint truncated, the run resumes from step 2 and writes what the run wrote."""
    os.truncate(run / "checkpoints" / "step_00000003" / OPTIM, 1000)
    out = launch(_recipe(shards, run, steps=STEPS))
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} (step 2)" in out
    resumed, straight = read_metrics(run)[STEPS], read_metrics(trained)[STEPS]
    assert (resumed["loss"], resumed["lr"]) == (straight["loss"], straight["lr"])


def test_a_model_directory_never_runs_code(run, tmp_path):
    """The run's model/ loads from safetensors, YAML and JSON; a python/* YAML tag is refused, not run."""
    model, marker = run / "model", tmp_path / "yaml-ran"
    assert model_dir.load_run_config(model).model.hidden_size == 64
    assert model_dir.load_state(model) and model_dir.load_meta(model)["step"] == STEPS
    (model / "config.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="config.yaml: not a run config written by plmscale .could not"):
        model_dir.load_run_config(model)
    assert not marker.exists()


def test_a_resume_with_another_schedule_is_warned_about(shards, tmp_path):
    """DeepSpeed's scheduler resumes its step count only: a grown train_steps reshapes the LR curve."""
    saved = load_config(_recipe(shards, tmp_path / "run")).model_dump(mode="json")
    grown = load_config(_recipe(shards, tmp_path / "run", steps=STEPS + 5)).model_dump(mode="json")
    assert checkpoint.schedule_changes(saved, saved) == []
    assert checkpoint.schedule_changes(saved, grown) == [
        f"train.train_steps {STEPS} -> {STEPS + 5} since the checkpoint: the learning-rate schedule is "
        "reshaped, and the resumed run follows the new curve from its current step"
    ]
