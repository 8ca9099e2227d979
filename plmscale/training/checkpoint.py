"""Resumable checkpoints through DeepSpeed's engine: published only once complete, loaded without running code.

DeepSpeed saves the sharded model, optimizer and LR-scheduler state; plmscale adds the step (which alone fixes
the data order, see plmscale/data/loader.py) and the resolved run config. Two gaps of DeepSpeed's own
save and load are closed here, for any engine with DeepSpeedEngine's save_checkpoint / load_checkpoint:

- save_checkpoint lets rank 0 write `latest` before the other ranks have finished their files, so a kill
  can leave `latest` naming half a checkpoint. Here every rank's files are flushed to disk first; then
  rank 0 writes `complete.json` (each file's size and sha256) into the tag directory and only then
  `latest`, each through a temporary file and an atomic rename. A tag directory without its record is
  the leftover of an interrupted save: resume skips it, rotation removes it.
- load_checkpoint unpickles with torch.load(weights_only=False), so a planted payload would run on resume.
  Here each file is checked against its record and loaded weights-only, with the few DeepSpeed types its
  files hold allowed.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from plmscale.config import RunConfig
from plmscale.tokenizer import file_sha256
from plmscale.training import reshard
from plmscale.training.layout import layout_changed, read_meta, resume_line

RECORD, TRACKER = "complete.json", "latest"
_TAG = re.compile(r"step_(\d{8})")
# The non-tensor objects in DeepSpeed's checkpoint files, found in those of ZeRO 0-3 with and without
# offload, fp32 and bf16: the ZeRO optimizer states hold the stage, the (static) loss scaler and each
# parameter's fragment address. Plain containers and tensors are allowed by torch itself.
DEEPSPEED_SAFE_GLOBALS = [ZeroStageEnum, LossScaler, fragment_address]


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: tampered, corrupt, or written for another run."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save(engine, directory: Path, step: int, config: RunConfig, keep: int, is_main: bool) -> None:
    """Saves after `step` optimizer steps and publishes it once every rank's files are on disk; keeps the
    newest `keep` complete checkpoints."""
    tag = tag_for(step)
    tag_dir = directory / tag
    if is_main and tag_dir.exists():  # this step's save, interrupted by a kill that resume went back past
        shutil.rmtree(tag_dir)
    dist.barrier()
    client_state = {
        "step": step,
        "config": config.model_dump(mode="json"),
        # lets DeepSpeed's ds_to_universal convert this checkpoint for a different parallel layout
        "universal_checkpoint_info": {"universal_checkpoint_version": 0.2},
    }
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    reshard.save(engine, tag_dir, step, config)  # the layout-free state: resume in another layout
    write_record(tag_dir, step, config)
    if is_main:
        _write_atomically(directory / TRACKER, tag)
        rotate(directory, keep)


def write_record(tag_dir: Path, step: int, config: RunConfig) -> None:
    """Lists every file of the checkpoint with its size and sha256, once all are on disk. Collective."""
    # DeepSpeed's save ends in a barrier, as does reshard's: every rank's files are closed. A node's page
    # cache holds what all of its processes wrote, so one process per node flushes the whole tag directory.
    if os.environ.get("LOCAL_RANK", "0") == "0":
        _fsync_tree(tag_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    names = [_file_names(tag_dir) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    names = names[0]
    shares = [None] * world
    mine = {name: {"bytes": (tag_dir / name).stat().st_size, "sha256": file_sha256(tag_dir / name)}
            for name in names[rank::world]}  # each rank hashes a share  # fmt: skip
    dist.all_gather_object(shares, mine)  # also the barrier: every node has flushed before the record
    if rank == 0:
        files = {name: entry for share in shares for name, entry in share.items()}
        layout = {"world_size": world, "parallel": config.parallel.model_dump(mode="json")}
        record = {"tag": tag_dir.name, "step": step, **layout, "files": dict(sorted(files.items()))}
        _write_atomically(tag_dir / RECORD, json.dumps(record, indent=1) + "\n")


def rotate(directory: Path, keep: int) -> None:
    """Keeps the newest `keep` complete checkpoints; removes older ones and any incomplete directory."""
    kept = [d for d in _tag_dirs(directory) if (d / RECORD).is_file()][:keep]
    for old in _tag_dirs(directory):
        if old not in kept:
            # the record goes first: a kill inside rmtree leaves an incomplete directory, not a broken one
            (old / RECORD).unlink(missing_ok=True)
            shutil.rmtree(old)


def resume(engine, directory: Path, config: RunConfig) -> int:
    """Loads the newest complete checkpoint if there is one; returns the number of optimizer steps done."""
    is_main = dist.get_rank() == 0
    found = [None]
    if is_main:
        tag_dir, notes = newest_complete(directory)
        for note in notes:
            print(f"plmscale: {note}", file=sys.stderr, flush=True)
        found = [tag_dir and tag_dir.name]
    dist.broadcast_object_list(found, src=0)
    if found[0] is None:
        return 0
    tag_dir = directory / found[0]
    record = json.loads((tag_dir / RECORD).read_text())
    names = sorted(record["files"])
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, verify(tag_dir, record, names[dist.get_rank() :: dist.get_world_size()]))
    problem = next((p for share in problems for p in share), None)
    if problem:
        raise CheckpointError(f"{tag_dir}: {problem}; refusing to resume from it")
    # saved in another layout (TP, PP, DP, ZeRO stage, precision): DeepSpeed's files do not fit this engine
    moved = layout_changed(tag_dir, config, dist.get_world_size())
    if moved:
        client_state = read_meta(tag_dir)
        _check_same_run(tag_dir, client_state["config"], config.model_dump(mode="json"), moved)
        reshard.load(engine, tag_dir)
    else:
        client_state = _collectively(lambda: load_deepspeed(engine, directory, tag_dir))
        _check_same_run(tag_dir, client_state["config"], config.model_dump(mode="json"), moved)
    if is_main:
        print(
            f"plmscale: {resume_line(tag_dir, int(client_state['step']), config, dist.get_world_size())}",
            flush=True,
        )
        for warning in schedule_changes(client_state["config"], config.model_dump(mode="json")):
            print(f"plmscale: warning: {warning}", file=sys.stderr, flush=True)
    return int(client_state["step"])


_SCHEDULE = ("train.train_steps", "optimizer.lr", "optimizer.warmup_steps", "optimizer.decay",
             "optimizer.min_lr_ratio")  # fmt: skip


def schedule_changes(saved: dict, current: dict) -> list[str]:
    """What a resumed run changed of the learning-rate schedule: DeepSpeed's scheduler resumes its step
    count only and recomputes the curve from the current config, so the LR jumps to the new curve."""
    changed = [
        f"{key} {_lookup(saved, key)[key]!r} -> {_lookup(current, key)[key]!r}"
        for key in _SCHEDULE
        if _lookup(saved, key)[key] != _lookup(current, key)[key]
    ]
    if not changed:
        return []
    return [f"{', '.join(changed)} since the checkpoint: the learning-rate schedule is reshaped, and the "
            "resumed run follows the new curve from its current step"]  # fmt: skip


def load_deepspeed(engine, directory: Path, tag_dir: Path) -> dict:
    """DeepSpeed's own files, weights-only; returns the client state saved with them."""
    with weights_only_loading():
        try:
            path, client_state = engine.load_checkpoint(str(directory), tag=tag_dir.name)
        except pickle.UnpicklingError as err:  # torch's reason is the paragraph after its preamble
            reason = next((part.strip() for part in str(err).split("\n\n")[1:] if part.strip()), str(err))
            raise CheckpointError(f"{tag_dir}: holds a pickled object that is not data: {reason}") from None
    if path is None:
        raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it")
    return client_state


def _collectively(load):
    """Runs `load` on every rank and raises its error on all of them if it failed on any: each rank reads
    its own files, and a rank left to go on alone would wait in the first step's collectives."""
    try:
        result, problem = load(), None
    except CheckpointError as err:
        result, problem = None, str(err)
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    problem = next((p for p in problems if p), None)
    if problem:
        raise CheckpointError(problem)
    return result


def newest_complete(directory: Path) -> tuple[Path | None, list[str]]:
    """The newest tag directory whose record is present and whose files have their recorded sizes, and a
    note for each newer one skipped and for a `latest` that does not name it."""
    notes, chosen = [], None
    for tag_dir in _tag_dirs(directory):
        problem = _incomplete(tag_dir)
        if problem is None:
            chosen = tag_dir
            break
        notes.append(f"checkpoint {tag_dir} is incomplete ({problem}); skipping it")
    tracker = directory / TRACKER
    if tracker.is_file():
        named = tracker.read_bytes().decode(errors="replace").strip()
        if chosen is None or named != chosen.name:
            why = "is empty" if not named else f"names {named!r}"
            notes.append(f"{tracker} {why}; resuming from {chosen or 'scratch'} instead")
    return chosen, notes


def verify(tag_dir: Path, record: dict, names: list[str]) -> list[str]:
    """What is wrong with these recorded files: a missing or unrecorded file, another size or sha256 than
    recorded (corruption or tampering), a pickled object that weights-only loading would refuse."""
    problems = [
        f"{name} is not in its {RECORD}" for name in _file_names(tag_dir) if name not in record["files"]
    ]
    for name in names:
        path, want = tag_dir / name, record["files"][name]
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != want["bytes"] or file_sha256(path) != want["sha256"]:
            problems.append(f"{name} does not match the sha256 in {RECORD} (corrupt or tampered)")
        elif unsafe := _unsafe_globals(path):
            problems.append(f"{name} holds pickled objects that are not data: {', '.join(sorted(unsafe))}")
    return problems


@contextlib.contextmanager
def weights_only_loading():
    """Every torch.load inside loads weights-only, whatever its caller asks (DeepSpeed asks for
    weights_only=False): torch's own switch, with DeepSpeed's few types allowed."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


# What a checkpoint cannot be continued under if it changed (train.train_steps, say, may grow).
_MUST_MATCH = ("model", "objective", "parallel", "data.seq_length", "train.seed", "train.global_batch_size")


def _lookup(config: dict, dotted: str) -> dict:
    section, _, key = dotted.partition(".")
    return (
        {dotted: config[section][key]} if key else {f"{section}.{k}": v for k, v in config[section].items()}
    )


def _check_same_run(tag_dir: Path, saved: dict, current: dict, resharded: bool) -> None:
    """A resharded resume may change the parallel layout; nothing else of _MUST_MATCH."""
    for field in _MUST_MATCH:
        for key, value in _lookup(current, field).items():
            was = _lookup(saved, field).get(key)
            if was != value and not (resharded and field == "parallel"):
                raise CheckpointError(
                    f"{tag_dir} was written with {key}={was!r}, not {value!r}; use a new train.output_dir"
                )


def _tag_dirs(directory: Path) -> list[Path]:
    """The step_NNNNNNNN directories, newest first."""
    if not directory.is_dir():
        return []
    return sorted((d for d in directory.iterdir() if _TAG.fullmatch(d.name) and d.is_dir()), reverse=True)


def _incomplete(tag_dir: Path) -> str | None:
    """Why this tag directory is not a whole checkpoint (None if it is): what a kill during save leaves."""
    try:
        record = json.loads((tag_dir / RECORD).read_text())
        sizes = {name: int(entry["bytes"]) for name, entry in record["files"].items()}
        if not all(len(entry["sha256"]) == 64 for entry in record["files"].values()):
            raise ValueError("a file without its sha256")
    except FileNotFoundError:
        return f"no {RECORD}: its save was interrupted"
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable {RECORD} ({type(err).__name__}: {err})"
    for name, size in sizes.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} recorded"
    return None


def _file_names(tag_dir: Path) -> list[str]:
    """Every file under the tag directory but the record, relative to it."""
    paths = (p for p in tag_dir.rglob("*") if p.is_file() and p.name != RECORD)
    return sorted(str(p.relative_to(tag_dir)) for p in paths)


def _unsafe_globals(path: Path) -> list[str]:
    """The classes and functions a torch.save file's pickle names beyond what weights-only loading allows
    (read statically: nothing is unpickled). Files in torch's legacy format are left to the weights-only
    load itself."""
    try:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except ValueError:  # not a torch zip file
        return []


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file and directory under `root`, `root` itself and its parent, whose entry names it."""
    for path in sorted(root.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(root)
    _fsync(root.parent)


def _write_atomically(path: Path, text: str) -> None:
    """A reader (or a kill) sees the old content or the new one, never a torn file."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync(path.parent)
