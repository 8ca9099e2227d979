"""Every shipped recipe and DeepSpeed config validates; each class of bad config is rejected by key."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_recipe

from plmscale.config import ConfigError, load_config, load_deepspeed_json

RECIPES = sorted((REPO / "launch" / "recipes").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def test_shipped_files_exist():
    assert len(RECIPES) >= 5 and len(DS_CONFIGS) == 7


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    cfg = load_config(path)
    model_parallel = cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel
    planned = re.search(r"^# world_size: (\d+)$", path.read_text(), re.M)  # recipes planned for a cluster
    world = int(planned[1]) if planned else 2 * model_parallel
    ds = cfg.deepspeed_config(world)
    assert ds["train_batch_size"] == cfg.train.global_batch_size
    assert (
        ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * (world // model_parallel)
        == cfg.train.global_batch_size
    )


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_shipped_deepspeed_config_validates(path):
    ds = load_deepspeed_json(str(path))
    assert ds["zero_optimization"]["stage"] in (0, 1, 2, 3)


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _rejected(tmp_path, recipe, world_size=2) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, recipe)).deepspeed_config(world_size)
    return str(err.value)


def _base(tmp_path, **sections):
    return tiny_recipe(tmp_path / "shards", tmp_path / "out", **sections)


def test_unknown_key_is_rejected(tmp_path):
    recipe = _base(tmp_path, model={"hiden_size": 64})
    assert "model.hiden_size" in _rejected(tmp_path, recipe)


def test_tensor_parallel_must_divide_heads(tmp_path):
    message = _rejected(tmp_path, _base(tmp_path, parallel={"tensor_parallel": 3}))
    assert "parallel.tensor_parallel=3" in message and "model.num_heads=4" in message


def test_tensor_parallel_must_divide_world_size(tmp_path):
    message = _rejected(tmp_path, _base(tmp_path, parallel={"tensor_parallel": 2}), world_size=3)
    assert "parallel.tensor_parallel=2" in message and "world size 3" in message


def test_zero_2_and_3_rejected_with_pipeline_parallelism(tmp_path):
    for stage in (2, 3):
        recipe = _base(
            tmp_path, parallel={"pipeline_parallel": 2},
            train={"deepspeed_config": str(REPO / "ds_configs" / f"zero{stage}.json")},
        )  # fmt: skip
        message = _rejected(tmp_path, recipe)
        assert f"ZeRO stage {stage}" in message and "parallel.pipeline_parallel=2" in message


def test_batch_sizes_must_multiply_out(tmp_path):
    message = _rejected(tmp_path, _base(tmp_path, train={"global_batch_size": 12}))
    assert "train.global_batch_size=12" in message
    message = _rejected(tmp_path, _base(tmp_path, train={"global_batch_size": 24}), world_size=2)
    assert "train.global_batch_size=24" in message and "data-parallel size 2" in message


def test_deepspeed_json_may_not_set_recipe_owned_keys(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": 8}))
    message = _rejected(tmp_path, _base(tmp_path, train={"deepspeed_config": str(ds)}))
    assert "train_batch_size" in message and str(ds) in message


def test_objective_is_checked_against_the_model(tmp_path):
    assert "unknown objective 'mlmm'" in _rejected(tmp_path, _base(tmp_path, objective={"name": "mlmm"}))
    wrong_kind = _base(tmp_path, objective={"name": "causal_lm"})
    assert "model.kind" in _rejected(tmp_path, wrong_kind)
    bad_params = _base(tmp_path, objective={"name": "mlm", "params": {"mask_prob": 1.5}})
    assert "mask_prob" in _rejected(tmp_path, bad_params)


def test_overrides_apply_and_are_validated(tmp_path):
    path = _write(tmp_path, _base(tmp_path))
    assert load_config(path, ["train.train_steps=3"]).train.train_steps == 3
    with pytest.raises(ConfigError, match="train.train_steps"):
        load_config(path, ["train.train_steps=-1"])


def test_cli_reports_bad_config_without_traceback(tmp_path):
    path = _write(tmp_path, _base(tmp_path, model={"num_heads": 5}))
    proc = subprocess.run(
        [sys.executable, "-m", "plmscale.cli", "train", "--config", str(path), "--validate-only"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model.num_heads=5" in proc.stderr and str(path) in proc.stderr
