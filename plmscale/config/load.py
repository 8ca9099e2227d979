"""Recipe files in and out: YAML (plmscale/config/recipe_yaml.py) plus `section.key=value` overrides,
validated into a RunConfig, every error one line naming the file and the key; and a RunConfig saved as a
recipe that loads back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from plmscale.config.base import ConfigError, validation_problems
from plmscale.config.deepspeed_json import load_deepspeed_json
from plmscale.config.recipe_checks import check_recipe
from plmscale.config.recipe_yaml import DuplicateKeyError, parse_yaml
from plmscale.config.run import RunConfig


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`train.train_steps=50`-style overrides; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        try:
            node[leaf] = parse_yaml(value)
        except (yaml.YAMLError, DuplicateKeyError) as err:
            raise ConfigError(f"override {item!r}: invalid YAML value: {_one_line(err)}") from None
    return raw


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Loads and validates a recipe; every error names the file and the key."""
    file = Path(path)
    try:
        raw = parse_yaml(file.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"config file not found: {file}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: invalid YAML: {_one_line(err)}") from None
    except DuplicateKeyError as err:
        raise ConfigError(f"{file}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections")
    try:
        raw = apply_overrides(raw, overrides or [])
        for name, section in raw.items():
            if not isinstance(section, dict):
                raise ConfigError(f"{name}: must be a section (a mapping of keys), got {section!r}")
        deepspeed_json = raw.get("train", {}).get("deepspeed_config")
        if isinstance(deepspeed_json, str) and deepspeed_json:
            load_deepspeed_json(deepspeed_json)  # its errors name it, not the validator below
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{file}: {validation_problems(err)}") from None
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from None
    check_recipe(file, config)
    return config


def save_config(config: RunConfig, path: str | Path) -> None:
    """As a recipe that `load_config` reads back: unset optional keys and sections are left out."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False))
