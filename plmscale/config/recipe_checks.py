"""What `load_config` checks beyond RunConfig's own validation: what needs the objective or distillation-loss
registries (they import this package, so they are imported inside the functions) or another model directory
(train.init_from), and what only a launch needs (a model directory saved by a run that warmed up longer than
it trained still loads as a RunConfig). Each error is one line naming the recipe file and the key."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from plmscale.config.base import ConfigError, validation_problems
from plmscale.config.model import ModelConfig
from plmscale.config.run import RunConfig


def check_recipe(file: Path, config: RunConfig) -> None:
    """Raises ConfigError naming `file` and the key of the first problem found."""
    from plmscale.objectives import available, get_objective, get_objective_class

    try:  # the objective validates its own params
        objective = get_objective(config.objective.name, config.objective.params, config.model)
    except ValidationError as err:
        raise ConfigError(f"{file}: {validation_problems(err, ('objective', 'params'))}") from None
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{file}: objective: {err.args[0]}") from None
    for key in ("instances", "eval_instances"):
        if getattr(config.data, key) and not objective.instance_fields:
            trained = [name for name in available() if get_objective_class(name).instance_fields]
            raise ConfigError(
                f"{file}: data.{key} serves the {', '.join(trained)} objectives, not {objective.name!r}"
            )
    _check_schedule(file, config)
    if config.train.init_from:
        _check_init_from(file, config)
    if config.distill:
        _check_distill_losses(file, config)
    if config.distill and objective.pair_task:
        raise ConfigError(
            f"{file}: distill: the distillation loss covers the token loss only, not objective "
            f"{objective.name!r}'s pair loss; use objective mlm (the student keeps the teacher's pair head)"
        )


def _check_distill_losses(file: Path, config: RunConfig) -> None:
    """Each loss's own keys; what needs the teacher's shape is checked before launch (plmscale/preflight.py)."""
    from plmscale.distill.losses import loss_class, validated_params

    for index, (name, _, params) in enumerate(config.distill.loss_entries()):
        key = f"distill.losses.{index}"
        try:
            validated_params(name, params, key)
        except ValueError as err:
            raise ConfigError(f"{file}: {err}") from None
        if config.distill.teacher_cache and not loss_class(name, key).from_cache:
            raise ConfigError(
                f"{file}: {key}.name={name} reads the teacher's layers, which distill.teacher_cache "
                "does not hold (its top-k logits only): needs the live teacher"
            )
        if loss_class(name, key).internals and config.parallel.pipeline_parallel > 1:
            raise ConfigError(
                f"{file}: {key}.name={name} reads the student's layers, which pipeline stages split: "
                "needs parallel.pipeline_parallel=1"
            )


def _check_schedule(file: Path, config: RunConfig) -> None:
    """What launching needs of the schedule (not part of RunConfig's validation: model directories saved by
    runs that warmed up longer than they trained still load)."""
    warmup, steps = config.optimizer.warmup_steps, config.train.train_steps
    if warmup < 1:  # WarmupDecayLR and WarmupCosineLR raise on warmup_num_steps <= 0
        raise ConfigError(
            f"{file}: optimizer.warmup_steps={warmup}: DeepSpeed's warm-up schedulers need >= 1"
        )
    if warmup > steps:
        raise ConfigError(f"{file}: optimizer.warmup_steps={warmup} exceeds train.train_steps={steps}")


def _check_init_from(file: Path, config: RunConfig) -> None:
    """The starting weights must be those of the network the recipe builds; only training-time settings
    (dropout, the init scale) may differ."""
    directory = Path(config.train.init_from)
    if config.distill and config.distill.student_layers is not None:
        raise ConfigError(
            f"{file}: distill.student_layers picks the teacher layers a student starts from; with "
            "train.init_from it starts from those weights (a pruned model's recovery)"
        )
    if not (directory / "config.yaml").is_file() or not (directory / "model.safetensors").is_file():
        raise ConfigError(
            f"{file}: train.init_from: {directory} is not a model directory (config.yaml, model.safetensors)"
        )
    theirs = ModelConfig.model_validate(yaml.safe_load((directory / "config.yaml").read_text())["model"])
    free = {"hidden_dropout", "attention_dropout", "init_std"}
    for key in ModelConfig.model_fields:
        if key not in free and getattr(theirs, key) != getattr(config.model, key):
            raise ConfigError(
                f"{file}: model.{key}={getattr(config.model, key)!r} but train.init_from={directory} has "
                f"{getattr(theirs, key)!r}"
            )
