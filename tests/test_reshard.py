"""Resume in another layout, on real gloo process groups. A chain of runs, each resuming from the checkpoint
the one before it saved, follows the run that kept its layout: losses within 1e-5 relative, and the fp32
weights and Adam moments that each link and the reference save at the end agree.

    GPT:  TP2 x PP2 x DP2 ZeRO-1 -> TP1 x PP1 x DP4 ZeRO-1 -> ZeRO-2 -> TP1 x PP2 x DP1 -> TP2 x PP1 x DP2 ZeRO-3
    BERT with the NSP head: TP2 x PP2 x DP2 ZeRO-1 -> TP1 x PP1 x DP4 ZeRO-2 -> TP1 x PP2 x DP1 ZeRO-1
          -> TP2 x PP1 x DP2 ZeRO-0

(ZeRO-1 -> ZeRO-2 in the same layout for GPT only: it changes the optimizer's partitions, whatever the
model; 8 processes start in about a minute on 2 cores, so the chains are as short as the matrix allows.)
`plmscale checkpoint convert` rebuilds a layout-free state bit for bit from DeepSpeed's files; `info` lists
checkpoints; what may not change is refused, naming the key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import partial

import pytest
import torch
from conftest import BIN, REPO, free_port, launch, read_metrics, tiny_recipe, write_recipe
from safetensors.torch import load_file
from test_pair_objectives import PAIR_MODEL

from plmscale.cli import main
from plmscale.config import ConfigError
from plmscale.preflight import check_launch
from plmscale.training import reshard
from plmscale.training.layout import DIRECTORY, META, resume_line

pytestmark = pytest.mark.distributed

TP2_PP2, PP2, TP2 = (
    {"tensor_parallel": 2, "pipeline_parallel": 2},
    {"pipeline_parallel": 2},
    {"tensor_parallel": 2},
)
CHAINS = {  # model: links (name, processes, parallel section, ZeRO config, what it says on resuming)
    "gpt": [
        ("tp2_pp2_dp2", 8, TP2_PP2, "zero1", None),  # the reference
        ("dp4_zero2", 4, {}, "zero2", "step_00000001 (step 1) saved as TP2 x PP2 x DP2 ZeRO-1; "
                                      "now TP1 x PP1 x DP4 ZeRO-2; gradient accumulation 2 -> 1"),
        ("pp2", 2, PP2, "zero1", "saved as TP1 x PP1 x DP4 ZeRO-2; now TP1 x PP2 x DP1 ZeRO-1; "
                                 "gradient accumulation 1 -> 4"),
        ("tp2_dp2", 4, TP2, "zero3", "saved as TP1 x PP2 x DP1 ZeRO-1; now TP2 x PP1 x DP2 ZeRO-3; "
                                     "gradient accumulation 4 -> 2"),
    ],
    "bert_nsp": [
        ("tp2_pp2_dp2", 8, TP2_PP2, "zero1", None),
        ("dp4_zero2", 4, {}, "zero2", "saved as TP2 x PP2 x DP2 ZeRO-1; now TP1 x PP1 x DP4 ZeRO-2"),
        ("pp2", 2, PP2, "zero1", "saved as TP1 x PP1 x DP4 ZeRO-2; now TP1 x PP2 x DP1 ZeRO-1"),
        ("tp2_dp2", 4, TP2, "zero0", "saved as TP1 x PP2 x DP1 ZeRO-1; now TP2 x PP1 x DP2 ZeRO-0"),
    ],
}  # fmt: skip
MODELS = {"gpt": {"kind": "decoder"}, "bert_nsp": {"model": PAIR_MODEL, "objective": {"name": "mlm_nsp"}}}


def _recipe(shards, instance_sets, output, model: str, parallel: dict, zero: str):
    sections = dict(MODELS[model])
    if model == "bert_nsp":
        sections["data"] = {"instances": str(instance_sets["nsp"])}
    steps = len(CHAINS[model])  # link i resumes after step i and runs to the end
    return tiny_recipe(
        shards, output, kind=sections.pop("kind", "encoder"), parallel=parallel,
        train={"deepspeed_config": str(REPO / "ds_configs" / f"{zero}.json"), "micro_batch_size": 4,
               "global_batch_size": 16, "train_steps": steps, "save_interval": 1, "keep_checkpoints": steps,
               "eval_interval": steps},
        **sections,
    )  # fmt: skip


def _take_checkpoint(source, target, step: int) -> None:
    """`target` starts as a run whose latest checkpoint is `source`'s after `step` steps."""
    tag = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / tag, target / "checkpoints" / tag)
    (target / "checkpoints" / "latest").write_text(tag)


def layout_free_state(run, step: int) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(meta.json, {state: {parameter: tensor}}) of a run's checkpoint after `step` steps."""
    out = run / "checkpoints" / f"step_{step:08d}" / DIRECTORY
    meta = json.loads((out / META).read_text())
    states = {key: {} for key in reshard.STATES}
    for name in meta["files"]:
        states[name.split(".")[0]].update(load_file(out / name))
    return meta, states


@pytest.fixture(scope="module")
def chains(shards, instance_sets, shared_run, tmp_path_factory):
    """{model: {link: (run directory, launcher stdout)}}, built on first use. The reference is test_pipeline's
    TP2 x PP2 x DP2 run (the same recipe, launched once for both; its stdout is not read)."""
    root, built = tmp_path_factory.mktemp("reshard"), {}

    def chain(model: str) -> dict:
        if model not in built:
            (name, procs, parallel, zero, _), *links = CHAINS[model]
            recipe_for = partial(_recipe, shards, instance_sets, model=model, parallel=parallel, zero=zero)
            previous = shared_run(f"{model}_tp2_pp2_dp2", recipe_for, procs)
            runs = {name: (previous, "")}
            for step, (name, procs, parallel, zero, _) in enumerate(links, start=1):
                output = root / model / name
                _take_checkpoint(previous, output, step)
                recipe = _recipe(shards, instance_sets, output, model, parallel, zero)
                recipe = write_recipe(root / f"{model}_{name}.yaml", recipe)
                runs[name] = output, launch(recipe, nprocs=procs, timeout=600)
                previous = output
            built[model] = runs
        return built[model]

    return chain


@pytest.mark.parametrize("model", CHAINS)
def test_runs_resumed_in_other_layouts_follow_the_run_that_kept_its_layout(chains, model):
    runs, links = chains(model), CHAINS[model]
    steps = len(links)
    reference_dir, _ = runs["tp2_pp2_dp2"]
    reference = read_metrics(reference_dir)
    assert sorted(reference) == list(range(1, steps + 1))
    assert reference[steps]["loss"] < reference[1]["loss"]
    keys = [k for k in reference[1] if k.startswith(("loss", "targets")) or k in ("grad_norm", "lr")]
    ref_meta, ref_states = layout_free_state(reference_dir, steps)
    for resumed_at, (name, _, _, zero, line) in enumerate(links[1:], start=1):
        run, stdout = runs[name]
        assert line in stdout, stdout[-3000:]
        rows = read_metrics(run)
        assert sorted(rows) == list(range(resumed_at + 1, steps + 1)), name
        # DeepSpeed reports no gradient norm for ZeRO-0 in fp32 (its clipping computes one of its own)
        compared = [k for k in keys if k != "grad_norm" or zero != "zero0"]
        for step in rows:
            for key in compared:
                assert rows[step][key] == pytest.approx(reference[step][key], rel=1e-5), (name, step, key)
        held_out, ref_held_out = read_metrics(run, "eval")[steps], read_metrics(reference_dir, "eval")[steps]
        assert held_out["targets"] == ref_held_out["targets"], name  # the same sequences in every layout
        assert held_out["loss"] == pytest.approx(ref_held_out["loss"], rel=1e-5), name
        meta, states = layout_free_state(run, steps)
        for field in ("step", "optimizer_step", "lr_scheduler", "engine"):
            assert meta[field] == ref_meta[field], (name, field)
        assert meta["optimizer_step"] == steps
        for key, tensors in states.items():
            assert tensors.keys() == ref_states[key].keys(), (name, key)
            for param, tensor in tensors.items():
                expected = ref_states[key][param]
                # an Adam update is ~lr = 3e-3 in size: 1e-5 is fp32 rounding of the reduction order, not a step
                atol = 1e-5 if key == "fp32" else 1e-5 * expected.abs().max().item()
                torch.testing.assert_close(
                    tensor, expected, rtol=1e-4, atol=atol, msg=f"{name} {key} {param}"
                )


def test_info_lists_checkpoints_with_their_layout_and_state(chains, capsys):
    run, _ = chains("gpt")["dp4_zero2"]
    assert main(["checkpoint", "info", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{run / 'checkpoints'}: 4 checkpoint(s), latest step_00000004"
    assert lines[1].split() == ["tag", "step", "saved", "as", "layout-free", "state", "DeepSpeed", "files"]
    rows = [line.split() for line in lines[2:]]
    assert [row[0] for row in rows] == [f"step_{s:08d}" for s in range(1, 5)]
    assert rows[0][1:8] == ["1", "TP2", "x", "PP2", "x", "DP2", "ZeRO-1"]  # the copy the run resumed from
    assert rows[-1][1:10] == ["(latest)", "4", "TP1", "x", "PP1", "x", "DP4", "ZeRO-2", "complete,"]
    assert main(["checkpoint", "info", str(run.parent)]) == 2  # not a run directory
    assert "holds no checkpoints/" in capsys.readouterr().err


def test_convert_rebuilds_the_layout_free_state_from_deepspeeds_files(chains, tmp_path, capsys):
    """A checkpoint written without its layout-free state (one from before plmscale wrote it): `convert`,
    launched in the checkpoint's layout, writes the same tensors and meta.json, byte for byte."""
    source, _ = chains("gpt")["pp2"]
    run, tag = tmp_path / "run", "step_00000004"
    shutil.copytree(
        source / "checkpoints" / tag, run / "checkpoints" / tag, ignore=shutil.ignore_patterns(DIRECTORY)
    )
    (run / "checkpoints" / "latest").write_text(tag)
    shutil.copy(source / "config.yaml", run / "config.yaml")
    main(["checkpoint", "info", str(run)])
    columns = capsys.readouterr().out.splitlines()[-1].split()
    assert columns[:7] == [tag, "(latest)", "4", "unknown", "(no", "meta.json)", "absent"]

    command = [str(BIN / "deepspeed"), "--no_local_rank", "--num_gpus", "2", "--master_port", str(free_port()),
               "--module", "plmscale.cli", "checkpoint", "convert", str(run)]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"wrote {run / 'checkpoints' / tag / DIRECTORY} (step 4, saved as TP1 x PP2 x DP1 ZeRO-1)"
        in proc.stdout
    )
    original, converted = source / "checkpoints" / tag / DIRECTORY, run / "checkpoints" / tag / DIRECTORY
    assert sorted(p.name for p in converted.iterdir()) == sorted(p.name for p in original.iterdir())
    for path in original.iterdir():
        assert (converted / path.name).read_bytes() == path.read_bytes(), path.name


def test_what_may_not_change_is_refused_naming_the_key(chains, shards, instance_sets, tmp_path):
    """Before launch: a checkpoint saved in another layout without its tensors; bf16 with ZeRO-0, whose fp32
    masters DeepSpeed keeps out of reach. At resume (one process): a key that fixes the run (here the global
    batch) may not change, though the layout may."""
    source, _ = chains("gpt")["pp2"]
    run, tag = tmp_path / "run", "step_00000004"  # saved by the TP1 x PP2 x DP1 ZeRO-1 link
    shutil.copytree(source / "checkpoints" / tag, run / "checkpoints" / tag)
    (run / "checkpoints" / "latest").write_text(tag)
    meta_path = run / "checkpoints" / tag / DIRECTORY / META
    original = meta_path.read_text()
    meta = json.loads(original)
    recipe = _recipe(shards, instance_sets, run, "gpt", {}, "zero1")
    meta_path.write_text(json.dumps(meta | {"tensors": False, "files": {}}))  # as with reshardable: false
    with pytest.raises(ConfigError, match=r"saved as TP1 x PP2 x DP1 ZeRO-1 without its layout-free state .* "
                                          r"run `plmscale checkpoint convert` on it with 2 processes"):  # fmt: skip
        check_launch(write_recipe(tmp_path / "r.yaml", recipe), world_size=4)
    own_layout = _recipe(shards, instance_sets, run, "gpt", PP2, "zero1")
    config = check_launch(write_recipe(tmp_path / "own.yaml", own_layout), world_size=2)  # needs no tensors
    assert resume_line(run / "checkpoints" / tag, 4, config, 2) == (
        f"resumed from {run / 'checkpoints' / tag} (step 4) in its layout TP1 x PP2 x DP1 ZeRO-1; "
        "gradient accumulation 4"
    )
    bf16 = _recipe(shards, instance_sets, tmp_path / "new", "gpt", {}, "zero0")
    bf16["train"]["precision"] = "bf16"  # DeepSpeed's FP16 optimizer: fp32 masters out of reach
    with pytest.raises(ConfigError, match="train.reshardable_checkpoints: with precision bf16 and ZeRO-0"):
        check_launch(write_recipe(tmp_path / "bf16.yaml", bf16), world_size=2)
    meta_path.write_text(original)  # as recorded in the checkpoint's complete.json

    recipe["train"]["global_batch_size"] = 32
    code = (
        "import sys, torch.distributed as dist; from plmscale.config import load_config;"
        "from plmscale.training import checkpoint; from pathlib import Path;"
        f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{free_port()}', rank=0, world_size=1);"
        "checkpoint.resume(None, Path(sys.argv[2]), load_config(sys.argv[1]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(write_recipe(tmp_path / "big.yaml", recipe)), str(run / "checkpoints")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ | {"DS_ACCELERATOR": "cpu"},
    )  # fmt: skip
    assert (
        f"CheckpointError: {run / 'checkpoints' / tag} was written with train.global_batch_size=16, not 32"
        in (proc.stderr)
    )
