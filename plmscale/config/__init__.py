"""One typed config tree for every plmscale run, loaded from YAML and validated before any process starts.

Validation is strict: a key given twice, a misspelled key, a bool or a string where a number goes, a number
outside its range are each one line naming the file and the key (ConfigError; the CLI prints it and exits
2). What needs the filesystem beyond the recipe and its DeepSpeed JSON (data, output directory, teacher) is
checked by plmscale/preflight.py.

    base.py            ConfigError, the strict base model, recipe paths
    model.py           ModelConfig: the transformer trunk
    sections.py        data, objective, parallel, optimizer and train sections
    distill.py         the distill section
    run.py             RunConfig: the sections together, checks across them and against the world size
    deepspeed_json.py  the ds_configs/ ZeRO file, and the DeepSpeed JSON derived from the recipe
    recipe_yaml.py     strict YAML (duplicate keys, YAML 1.2 floats)
    load.py            load_config / save_config, overrides
    recipe_checks.py   what load_config checks beyond RunConfig: objective params, distillation losses,
                       train.init_from, the warm-up schedule
"""

from plmscale.config.base import REPO_ROOT, ConfigError, resolve_path
from plmscale.config.deepspeed_json import RECIPE_OWNED_DS_KEYS, load_deepspeed_json, zero_stage
from plmscale.config.distill import DistillConfig, DistillLossConfig
from plmscale.config.load import apply_overrides, load_config, save_config
from plmscale.config.model import ModelConfig
from plmscale.config.run import RunConfig
from plmscale.config.sections import DataConfig, ObjectiveConfig, OptimizerConfig, ParallelConfig, TrainConfig

__all__ = [
    "REPO_ROOT",
    "RECIPE_OWNED_DS_KEYS",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "DistillLossConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "load_deepspeed_json",
    "resolve_path",
    "save_config",
    "zero_stage",
]
