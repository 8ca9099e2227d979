"""A table of bad recipes: each is rejected before any process starts, as one ConfigError naming the recipe
and the key (and the file at fault); a few also through the CLI and launch/train.sh (exit 2, one line)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from conftest import REPO, TEST_VOCAB, tiny_recipe

from plmscale.config import ConfigError
from plmscale.manifest import MANIFEST
from plmscale.preflight import check_launch

DELETE = object()


class Bad(NamedTuple):
    """`set`: dotted keys of the tiny recipe to set (DELETE removes one); `text`: an edit of its YAML;
    `ds`: a DeepSpeed JSON the recipe then names. Strings may name the `files` fixture's paths, {like_this}.
    The error must contain every string of `names`, formatted the same way, and the recipe's path."""

    id: str
    names: tuple[str, ...]
    set: dict[str, Any] = {}
    text: tuple[str, str] | None = None  # (old, new): replace in the dumped YAML; old "": all of it
    ds: str | None = None
    overrides: tuple[str, ...] = ()
    command: str = "train"
    world_size: int = 2


ZERO2 = '{"zero_optimization": {"stage": 2, "overlap_comm": false}}'

BAD = [
    # the YAML itself
    Bad("duplicate_key", ("optimizer.lr", "given twice"), text=("  lr: 0.003\n", "  lr: 0.003\n  lr: 500\n")),
    Bad("duplicate_section", ("optimizer", "given twice"), text=("train:\n", "optimizer:\n  lr: 1.0\ntrain:\n")),
    Bad("duplicate_nested_key", ("objective.params.mask_prob", "given twice"),
        set={"objective.params": {"mask_prob": 0.15}},
        text=("    mask_prob: 0.15\n", "    mask_prob: 0.15\n    mask_prob: 0.5\n")),
    Bad("invalid_yaml", ("invalid YAML",), text=("model:\n", "model:\n\t- [\n")),
    Bad("top_level_list", ("top level",), text=("", "- model\n- data\n")),
    Bad("section_not_mapping", ("optimizer", "section"), set={"optimizer": 5}),
    Bad("unknown_section", ("modle",), set={"modle": {"kind": "encoder"}}),
    Bad("missing_section", ("optimizer", "Field required"), set={"optimizer": DELETE}),
    Bad("unknown_key", ("model.hiden_size", "Extra inputs"), set={"model.hiden_size": 64}),
    Bad("missing_key", ("model.hidden_size", "Field required"), set={"model.hidden_size": DELETE}),
    # types: strict, no bool for a number, no string for a number, no inf
    Bad("train_steps_bool", ("train.train_steps", "valid integer"), set={"train.train_steps": True}),
    Bad("train_steps_string", ("train.train_steps", "valid integer"), set={"train.train_steps": "10"}),
    Bad("train_steps_float", ("train.train_steps", "valid integer"), set={"train.train_steps": 10.5}),
    Bad("lr_string", ("optimizer.lr", "valid number"), set={"optimizer.lr": "fast"}),
    Bad("lr_bool", ("optimizer.lr", "valid number"), set={"optimizer.lr": True}),
    Bad("lr_inf", ("optimizer.lr", "finite"), set={"optimizer.lr": float("inf")}),
    Bad("verify_checksums_string", ("data.verify_checksums", "valid boolean"), set={"data.verify_checksums": "no"}),
    Bad("seed_bool", ("train.seed", "valid integer"), set={"train.seed": True}),
    # ranges
    Bad("lr_zero", ("optimizer.lr", "greater than 0"), set={"optimizer.lr": 0}),
    Bad("betas_above_one", ("optimizer.betas", "[0, 1)"), set={"optimizer.betas": [1.5, 0.98]}),
    Bad("betas_one", ("optimizer.betas", "[0, 1)"), set={"optimizer.betas": [0.9, 1.0]}),
    Bad("betas_negative", ("optimizer.betas", "[0, 1)"), set={"optimizer.betas": [-0.1, 0.98]}),
    Bad("betas_three", ("optimizer.betas",), set={"optimizer.betas": [0.9, 0.98, 0.99]}),
    Bad("seed_negative", ("train.seed", "greater than or equal to 0"), set={"train.seed": -1}),
    Bad("eps_zero", ("optimizer.eps",), set={"optimizer.eps": 0}),
    Bad("warmup_zero", ("optimizer.warmup_steps=0", "DeepSpeed"), set={"optimizer.warmup_steps": 0}),
    Bad("warmup_over_steps", ("optimizer.warmup_steps=1000", "train.train_steps=8"),
        set={"optimizer.warmup_steps": 1000}),
    Bad("min_lr_ratio", ("optimizer.min_lr_ratio",), set={"optimizer.min_lr_ratio": 2}),
    Bad("weight_decay_negative", ("optimizer.weight_decay",), set={"optimizer.weight_decay": -0.1}),
    Bad("grad_clip_negative", ("optimizer.grad_clip",), set={"optimizer.grad_clip": -1}),
    Bad("decay_unknown", ("optimizer.decay",), set={"optimizer.decay": "exponential"}),
    Bad("precision_fp16", ("train.precision",), set={"train.precision": "fp16"}),
    Bad("on_nonfinite_unknown", ("train.on_nonfinite",), set={"train.on_nonfinite": "ignore"}),
    Bad("micro_batch_zero", ("train.micro_batch_size",), set={"train.micro_batch_size": 0}),
    Bad("log_interval_zero", ("train.log_interval",), set={"train.log_interval": 0}),
    Bad("keep_checkpoints_zero", ("train.keep_checkpoints",), set={"train.keep_checkpoints": 0}),
    Bad("output_dir_empty", ("train.output_dir",), set={"train.output_dir": ""}),
    Bad("model_kind", ("model.kind",), set={"model.kind": "encoder-decoder"}),
    Bad("vocab_tiny", ("model.vocab_size",), set={"model.vocab_size": 4}),
    Bad("dropout_one", ("model.hidden_dropout",), set={"model.hidden_dropout": 1.0}),
    Bad("heads_divide_hidden", ("model.num_heads=5",), set={"model.num_heads": 5}),
    Bad("pair_head_decoder", ("model.pair_head",),
        set={"model.kind": "decoder", "model.pair_head": True, "objective.name": "causal_lm"}),
    Bad("seq_over_positions", ("data.seq_length=128", "model.max_position_embeddings=64"),
        set={"data.seq_length": 128}),
    Bad("seq_length_tiny", ("data.seq_length",), set={"data.seq_length": 2}),
    # layout and batch arithmetic
    Bad("tensor_parallel_zero", ("parallel.tensor_parallel",), set={"parallel.tensor_parallel": 0}),
    Bad("tensor_parallel_heads", ("parallel.tensor_parallel=3", "model.num_heads=4"),
        set={"parallel.tensor_parallel": 3}),
    Bad("tensor_parallel_world", ("parallel.tensor_parallel=2", "world size 3"),
        set={"parallel.tensor_parallel": 2}, world_size=3),
    Bad("pipeline_with_zero2", ("ZeRO stage 2", "parallel.pipeline_parallel=2"),
        set={"parallel.pipeline_parallel": 2}),
    # the BERT family's pipeline refusals, each naming why (SpanBERT, UniLM, RoBERTa pipeline: test_pipeline.py)
    Bad("pipeline_albert_shared_layers", ("parallel.pipeline_parallel=2", "model.layer_groups=1", "shared"),
        set={"parallel.pipeline_parallel": 2, "model.layer_groups": 1, "train.deepspeed_config": "{zero1}"}),
    Bad("pipeline_electra", ("parallel.pipeline_parallel=2", "model.generator_hidden_fraction", "generator"),
        set={"parallel.pipeline_parallel": 2, "train.deepspeed_config": "{zero1}", "objective.name": "electra",
             "model.generator_hidden_fraction": 0.25, "model.layernorm_position": "post",
             "model.embedding_layernorm": True}),
    Bad("global_not_micro_multiple", ("train.global_batch_size=12",), set={"train.global_batch_size": 12}),
    Bad("global_not_dp_multiple", ("train.global_batch_size=24", "data-parallel size 2"),
        set={"train.global_batch_size": 24}),
    # the objective
    Bad("objective_unknown", ("objective", "mlmm"), set={"objective.name": "mlmm"}),
    Bad("objective_kind", ("objective", "model.kind"), set={"objective.name": "causal_lm"}),
    Bad("objective_params", ("mask_prob",), set={"objective.params": {"mask_prob": 1.5}}),
    Bad("instances_for_causal", ("data.instances",),
        set={"model.kind": "decoder", "objective.name": "causal_lm", "data.instances": "{instances}"}),
    # overrides
    Bad("override_no_equals", ("override", "section.key=value"), overrides=("train.train_steps",)),
    Bad("override_not_section", ("override", "is not a section"), overrides=("model.kind.x=1",)),
    Bad("override_bad_yaml", ("override", "invalid YAML"), overrides=("train.train_steps=[",)),
    Bad("override_bool", ("train.train_steps", "valid integer"), overrides=("train.train_steps=true",)),
    # the DeepSpeed JSON
    Bad("ds_missing", ("train.deepspeed_config", "not found"), set={"train.deepspeed_config": "{tmp}/none.json"}),
    Bad("ds_directory", ("train.deepspeed_config", "is a directory"), set={"train.deepspeed_config": "{tmp}"}),
    Bad("ds_invalid_json", ("{tmp}/ds.json", "invalid JSON at line 1"), ds='{"zero_optimization": {"stage": 1'),
    Bad("ds_empty", ("{tmp}/ds.json", "invalid JSON"), ds=""),
    Bad("ds_top_level_list", ("{tmp}/ds.json", "top level"), ds='[{"zero_optimization": {"stage": 1}}]'),
    Bad("ds_duplicate_key", ("{tmp}/ds.json", "zero_optimization", "given twice"),
        ds='{"zero_optimization": {"stage": 1}, "zero_optimization": {"stage": 3}}'),
    Bad("ds_misspelled_section", ("{tmp}/ds.json", "zero_optimisation", "did you mean 'zero_optimization'"),
        ds='{"zero_optimisation": {"stage": 2}}'),
    Bad("ds_unknown_top_level", ("{tmp}/ds.json", "gradient_clip"), ds='{"gradient_clip": 1.0}'),
    Bad("ds_misspelled_zero_key", ("{tmp}/ds.json", "zero_optimization.overlap_com"),
        ds='{"zero_optimization": {"stage": 2, "overlap_com": false}}'),
    Bad("ds_zero_value", ("{tmp}/ds.json", "zero_optimization.reduce_bucket_size"),
        ds='{"zero_optimization": {"stage": 2, "reduce_bucket_size": -1}}'),
    Bad("ds_offload_device", ("{tmp}/ds.json", "zero_optimization.offload_optimizer.device"),
        ds='{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}'),
    Bad("ds_stage_4", ("{tmp}/ds.json", "zero_optimization.stage"), ds='{"zero_optimization": {"stage": 4}}'),
    Bad("ds_stage_string", ("{tmp}/ds.json", "zero_optimization.stage"),
        ds='{"zero_optimization": {"stage": "two"}}'),
    Bad("ds_zero_not_object", ("{tmp}/ds.json", "zero_optimization"), ds='{"zero_optimization": true}'),
    Bad("ds_recipe_owned", ("{tmp}/ds.json", "train_batch_size", "set by the recipe"),
        ds='{"zero_optimization": {"stage": 1}, "train_batch_size": 8}'),
    Bad("ds_other_section", ("{tmp}/ds.json", "comms_logger"),
        ds='{"zero_optimization": {"stage": 1}, "comms_logger": {"enabled": false, "verbos": true}}'),
    # the data
    Bad("shards_missing", ("data.shards", "{tmp}/none", "no such directory"), set={"data.shards": "{tmp}/none"}),
    Bad("shards_is_a_file", ("data.shards", "{tmp}/ds.json", "not a directory"),
        set={"data.shards": "{tmp}/ds.json"}, ds=ZERO2),
    Bad("shards_empty_dir", ("data.shards", f"{{empty}}/{MANIFEST} not found"), set={"data.shards": "{empty}"}),
    Bad("unknown_train_split", ("data.train_split='tran'", "no such split"), set={"data.train_split": "tran"}),
    Bad("unknown_valid_split", ("data.valid_split='test'", "no such split"), set={"data.valid_split": "test"}),
    Bad("vocab_mismatch", ("model.vocab_size=3000", f"has {TEST_VOCAB}"), set={"model.vocab_size": 3000}),
    Bad("sequence_longer_than_data", ("data.seq_length=65536", "'valid'"),
        set={"data.seq_length": 65536, "model.max_position_embeddings": 65536}),
    Bad("manifest_truncated", (f"{{truncated}}/{MANIFEST}", "truncated"), set={"data.shards": "{truncated}"}),
    Bad("manifest_flipped_byte", (f"{{flipped}}/{MANIFEST}", "edited or corrupt"), set={"data.shards": "{flipped}"}),
    Bad("manifest_edited", (f"{{edited}}/{MANIFEST}", "edited or corrupt"), set={"data.shards": "{edited}"}),
    Bad("manifest_old_format", (f"{{old}}/{MANIFEST}", "plmscale-shards/1", "plmscale prep shards"),
        set={"data.shards": "{old}"}),
    Bad("tokenizer_missing", ("data.shards", "tokenizer", "not found"), set={"data.shards": "{no_tokenizer}"}),
    Bad("tokenizer_changed", ("data.shards", "tokenizer", "changed"), set={"data.shards": "{changed_tokenizer}"}),
    Bad("shard_truncated", ("data.shards", "{shard_truncated}/train_00000.bin", "truncated"),
        set={"data.shards": "{shard_truncated}", "data.verify_checksums": False}),
    Bad("shard_flipped_byte", ("data.shards", "{shard_flipped}/train_00000.bin", "sha256"),
        set={"data.shards": "{shard_flipped}"}),
    Bad("instances_missing", ("data.instances", "no such directory"), set={"data.instances": "{tmp}/none"}),
    Bad("instances_not_instances", ("data.instances", "plmscale-instances/2"), set={"data.instances": "{shards}"}),
    Bad("instances_too_long", ("data.seq_length=32", "data.instances"),
        set={"data.instances": "{instances}", "data.seq_length": 32}),
    Bad("instances_without_pair_label", ("data.instances", "pair_label"),
        set={"data.instances": "{instances}", "objective.name": "mlm_nsp", "model.pair_head": True}),
    # the output directory
    Bad("output_dir_is_file", ("train.output_dir", "not a directory"), set={"train.output_dir": "{tmp}/ds.json"},
        ds=ZERO2),
    Bad("output_dir_under_file", ("train.output_dir", "not a directory"),
        set={"train.output_dir": "{tmp}/ds.json/run"}, ds=ZERO2),
    Bad("output_dir_read_only", ("train.output_dir=/sys/plmscale_run", "cannot write in /sys"),
        set={"train.output_dir": "/sys/plmscale_run"}),
    # distillation
    Bad("distill_section_with_train", ("distill", "plmscale distill"), set={"distill": {"teacher": "{tmp}"}}),
    Bad("distill_without_section", ("distill",), command="distill"),
    Bad("teacher_missing", ("distill.teacher", "not a model directory"), set={"distill.teacher": "{tmp}/none"},
        command="distill"),
    Bad("student_layers_empty", ("distill.student_layers",),
        set={"distill": {"teacher": "{tmp}", "student_layers": []}}, command="distill"),
]  # fmt: skip


@pytest.fixture(scope="module")
def files(shards, tmp_path_factory) -> dict[str, Path]:
    """Broken copies of the session's data (each with its tokenizer beside it) and one instance set."""
    from data_prep.instances.build import build_instances

    root = tmp_path_factory.mktemp("bad_data")

    def copy(name: str) -> Path:
        shutil.copytree(shards.parent / "tokenizer", root / name / "tokenizer")
        return Path(shutil.copytree(shards, root / name / "shards"))

    def manifest(directory: Path) -> dict:
        return json.loads((directory / MANIFEST).read_text())

    paths = {"shards": shards, "empty": root / "empty", "zero1": REPO / "ds_configs" / "zero1.json"}
    paths["empty"].mkdir()
    paths["truncated"] = copy("truncated")
    text = (paths["truncated"] / MANIFEST).read_bytes()
    (paths["truncated"] / MANIFEST).write_bytes(text[: len(text) // 2])
    paths["flipped"] = copy("flipped")
    data = bytearray((paths["flipped"] / MANIFEST).read_bytes())
    data[data.index(b'"tokens": ') + 10] ^= 0x01  # a digit of a token count: valid JSON, another number
    (paths["flipped"] / MANIFEST).write_bytes(bytes(data))
    paths["edited"] = copy("edited")
    edited = manifest(paths["edited"])
    edited["tokenizer"]["vocab_size"] = 3000
    (paths["edited"] / MANIFEST).write_text(json.dumps(edited, indent=2))
    paths["old"] = copy("old")
    old = manifest(paths["old"]) | {"format": "plmscale-shards/1"}
    del old["manifest_sha256"]
    (paths["old"] / MANIFEST).write_text(json.dumps(old))
    paths["no_tokenizer"] = copy("no_tokenizer")
    shutil.rmtree(paths["no_tokenizer"].parent / "tokenizer")
    paths["changed_tokenizer"] = copy("changed_tokenizer")
    with open(paths["changed_tokenizer"].parent / "tokenizer" / "tokenizer.model", "ab") as handle:
        handle.write(b"\0")
    paths["shard_truncated"] = copy("shard_truncated")
    bin_file = paths["shard_truncated"] / "train_00000.bin"
    bin_file.write_bytes(bin_file.read_bytes()[:-2])
    paths["shard_flipped"] = copy("shard_flipped")
    bin_file = paths["shard_flipped"] / "train_00000.bin"
    data = bytearray(bin_file.read_bytes())
    data[100] ^= 0x01
    bin_file.write_bytes(bytes(data))
    paths["instances"] = root / "instances"
    build_instances(shards, "mlm", paths["instances"], params={"max_seq_length": 64}, progress=False)
    return paths


def _recipe(bad: Bad, tmp_path: Path, files: dict[str, Path]) -> Path:
    names = {name: str(path) for name, path in files.items()} | {"tmp": str(tmp_path)}
    recipe = tiny_recipe(files["shards"], tmp_path / "out")
    if bad.ds is not None:
        (tmp_path / "ds.json").write_text(bad.ds)
        recipe["train"]["deepspeed_config"] = str(tmp_path / "ds.json")
    for dotted, value in bad.set.items():
        *parents, leaf = dotted.split(".")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = _format(value, names)
    text = yaml.safe_dump(recipe, sort_keys=False)
    if bad.text:
        old, new = bad.text
        assert old in text, text
        text = text.replace(old, new, 1) if old else new
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _format(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {key: _format(item, names) for key, item in value.items()}
    return value


@pytest.mark.parametrize("bad", BAD, ids=[bad.id for bad in BAD])
def test_bad_recipe_is_one_error_naming_the_key(bad, files, tmp_path):
    path = _recipe(bad, tmp_path, files)
    with pytest.raises(ConfigError) as err:
        check_launch(path, list(bad.overrides), command=bad.command, world_size=bad.world_size)
    message = str(err.value)
    names = {name: str(p) for name, p in files.items()} | {"tmp": str(tmp_path)}
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for expected in bad.names:
        assert expected.format(**names) in message, message


def test_table_is_large_and_the_base_recipe_passes(files, tmp_path):
    assert len(BAD) >= 60 and len({bad.id for bad in BAD}) == len(BAD)
    path = _recipe(Bad("good", ()), tmp_path, files)
    assert check_launch(path, world_size=2).train.train_steps == 8
    assert check_launch(path, ["optimizer.lr=1e-3"], world_size=2).optimizer.lr == 1e-3  # YAML 1.2 float


def test_a_corrupt_shard_passes_without_checksums_but_not_with_them(files, tmp_path):
    """Without checksums a flipped byte is not seen before launch (only the sizes are checked): reading
    bounds-checks it instead (tests/test_manifest.py)."""
    recipe = _recipe(Bad("flipped", (), set={"data.shards": "{shard_flipped}"}), tmp_path, files)
    with pytest.raises(ConfigError, match="sha256"):
        check_launch(recipe, world_size=2)
    assert check_launch(recipe, ["data.verify_checksums=false"], world_size=2)


CLI_CASES = ["duplicate_key", "ds_misspelled_section", "ds_directory", "unknown_valid_split",
             "manifest_truncated", "pipeline_electra"]  # fmt: skip


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_exits_2_with_one_line(case, files, tmp_path):
    bad = next(bad for bad in BAD if bad.id == case)
    path = _recipe(bad, tmp_path, files)
    proc = subprocess.run(
        [sys.executable, "-m", "plmscale.cli", bad.command, "--config", str(path), "--validate-only",
         "--world-size", str(bad.world_size)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("plmscale: error: ")]
    assert len(errors) == 1 and str(path) in errors[0], proc.stderr


def test_train_sh_reports_a_bad_recipe_once_before_the_launcher(files, tmp_path):
    """The preflight in launch/train.sh: one line, exit 2, and the deepspeed launcher never starts."""
    path = _recipe(next(bad for bad in BAD if bad.id == "train_steps_bool"), tmp_path, files)
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "train.sh"), str(path)], capture_output=True, text=True, cwd=REPO,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "NUM_PROCS": "2"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("plmscale: error: ") == 1 and "train.train_steps" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "launcher" not in (proc.stdout + proc.stderr).lower()
