"""The model directory: what training and distillation hand to export and evaluation.

model.safetensors   full (unsharded) fp32 weights, parameter names of `TransformerLM`
config.yaml         the run config that produced it (its `model` section rebuilds the network)
tokenizer.model     the SentencePiece model the data was tokenized with (absent for a model imported without one)
meta.json           step, tokens seen, final validation metrics (or where an imported model came from)

Nothing in it is unpickled, so loading one never runs code: weights are safetensors, the config is read
with yaml.safe_load (a python/* tag is an error), the rest is JSON and SentencePiece's protobuf.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from plmscale.config import ConfigError, ModelConfig, RunConfig, save_config
from plmscale.model import Electra, TransformerLM, build_model

WEIGHTS, CONFIG, TOKENIZER, META = "model.safetensors", "config.yaml", "tokenizer.model", "meta.json"


def save_model_dir(
    directory: str | Path,
    state: dict[str, torch.Tensor],
    config: RunConfig,
    tokenizer: str | Path | None,
    meta: dict,
) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS))
    save_config(config, out / CONFIG)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / TOKENIZER)
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_run_config(directory: str | Path) -> RunConfig:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a plmscale model directory (no {CONFIG})")
    try:
        return RunConfig.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as err:
        reason = str(err).splitlines()[0]
        raise ConfigError(f"{path}: not a run config written by plmscale ({reason})") from None


def load_state(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / WEIGHTS))


def load_meta(directory: str | Path) -> dict:
    return json.loads((Path(directory) / META).read_text())


def load_local_model(directory: str | Path) -> tuple[TransformerLM | Electra, ModelConfig]:
    """The unsharded model in eval mode, for export, evaluation and inference."""
    cfg = load_run_config(directory).model
    model = build_model(cfg)
    model.load_state_dict(load_state(directory))
    return model.eval(), cfg
