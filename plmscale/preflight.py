"""Pre-launch checks: everything a run needs that can be known before any process group starts.

`plmscale train|distill` (and `--validate-only`, the same checks) run `check_launch` in the launching
process, before `init_distributed`; `launch/train.sh` runs it once before the deepspeed launcher, so a bad
recipe is one line, exit status 2, within seconds, instead of a traceback from every rank. Beyond the
recipe itself (plmscale/config/) it checks the DeepSpeed JSON against DeepSpeed's own config models, the
data (manifests, splits, vocabulary, tokenizer, enough tokens for one sample), the teacher and the output
directory. Every error is a ConfigError naming the recipe and the key.
"""

from __future__ import annotations

import difflib
import logging
import tempfile
from collections.abc import KeysView
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from plmscale.config import ConfigError, RunConfig, load_config, load_deepspeed_json, resolve_path
from plmscale.manifest import ManifestError, load_manifest, tokenizer_path
from plmscale.objectives import get_objective
from plmscale.tokenizer import file_sha256
from plmscale.training.layout import check_layout_free


def check_launch(
    path: str | Path, overrides: list[str] | None = None, *, command: str = "train", world_size: int
) -> RunConfig:
    """The recipe, validated with everything it points at for a run of `world_size` processes."""
    cfg = load_config(path, overrides)
    try:
        if command == "distill" and cfg.distill is None:
            raise ConfigError("`plmscale distill` needs a `distill:` section")
        if command == "train" and cfg.distill is not None:
            raise ConfigError("has a `distill:` section; run it with `plmscale distill`")
        check_deepspeed(cfg, world_size)
        shards = check_data(cfg, verify=cfg.data.verify_checksums)
        check_teacher(cfg, shards)
        check_output_dir(cfg)
        check_layout_free(cfg, world_size)  # h-reshard: another layout needs the layout-free state
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return cfg


class _KeysRead(dict):
    """A dict that records every key looked up in it, to learn which top-level keys DeepSpeed reads."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def keys(self):
        return _RecordingKeys(self)


class _RecordingKeys(KeysView):
    def __contains__(self, key):
        return key in self._mapping  # through _KeysRead.__contains__, which records it


def check_deepspeed(cfg: RunConfig, world_size: int) -> None:
    """The DeepSpeed JSON the engine will get, validated by DeepSpeed itself: the ZeRO section by its strict
    config model (a misspelled key inside it is an error), the rest by `DeepSpeedConfig`; and a top-level
    key of the ds_configs file that DeepSpeed never reads (`zero_optimisation`) is an error, not ZeRO-0."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.utils import logger as deepspeed_logger

    file = resolve_path(cfg.train.deepspeed_config)
    where = f"train.deepspeed_config={file}"
    ds = cfg.deepspeed_config(world_size)  # checks the batch sizes against the world size
    try:
        DeepSpeedZeroConfig(strict=True, **ds.get("zero_optimization", {}))
    except ValidationError as err:
        problems = "; ".join(
            f"zero_optimization.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{where}: {problems}") from None
    # DeepSpeed derives train_batch_size from the world size it finds: none before init, so leave it out.
    keys_read = _KeysRead({k: v for k, v in ds.items() if k != "train_batch_size"})
    level = deepspeed_logger.level
    deepspeed_logger.setLevel(logging.WARNING)  # it logs its world size at INFO
    try:
        DeepSpeedConfig(keys_read)
    except ValidationError as err:  # one of its sections' models: find the section by the key at fault
        problems = []
        for error in err.errors():
            loc = ".".join(str(p) for p in error["loc"])
            first = error["loc"][0] if error["loc"] else None
            sections = [key for key, value in ds.items() if isinstance(value, dict) and first in value]
            key = f"{sections[0]}.{loc}" if len(sections) == 1 else f"{err.title}.{loc}"
            problems.append(f"{key}: {error['msg']}")
        raise ConfigError(f"{where}: {'; '.join(problems)}") from None
    except (AssertionError, ValueError, TypeError, KeyError, DeepSpeedConfigError) as err:
        raise ConfigError(f"{where}: DeepSpeed rejects it: {' '.join(str(err).split())}") from None
    finally:
        deepspeed_logger.setLevel(level)
    unknown = sorted(set(load_deepspeed_json(cfg.train.deepspeed_config)) - keys_read.read)
    if unknown:
        hint = difflib.get_close_matches(unknown[0], keys_read.read, n=1)
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}: not settings DeepSpeed reads"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )


def check_data(cfg: RunConfig, verify: bool) -> dict[str, Any]:
    """The shards (and instances) the recipe trains on: manifests intact, `verify`: every file's sha256,
    the tokenizer there and unchanged, its vocabulary the model's, the splits present and each long enough
    for one sample. Returns the shards' manifest."""
    data = cfg.data
    try:
        manifest = load_manifest(data.shards, verify=verify)
    except ManifestError as err:
        raise ConfigError(f"data.shards={data.shards}: {err}") from None
    where = Path(manifest["directory"]) / "manifest.json"
    vocab = manifest["tokenizer"]["vocab_size"]
    if vocab != cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} but the shards' tokenizer has {vocab} ({where})"
        )
    tokenizer = tokenizer_path(manifest)
    if not tokenizer.is_file():
        raise ConfigError(f"data.shards={data.shards}: tokenizer {tokenizer} named in {where} not found")
    if file_sha256(tokenizer) != manifest["tokenizer"]["sha256"]:
        raise ConfigError(
            f"data.shards={data.shards}: tokenizer {tokenizer} changed since the shards were built ({where})"
        )
    words = cfg.objective.params.get("tokenizer")  # word starts of whole-word and span masking
    if words is not None and not Path(words).is_file():
        raise ConfigError(f"objective.params.tokenizer={words}: file not found")
    if words is not None and file_sha256(words) != manifest["tokenizer"]["sha256"]:
        raise ConfigError(f"objective.params.tokenizer={words} is not the shards' tokenizer {tokenizer}")
    objective = get_objective(cfg.objective.name, cfg.objective.params, cfg.model)
    window = objective.window_length(data.seq_length)
    splits = {"data.valid_split": data.valid_split}
    if not data.instances:  # with instances, the shards give the held-out split only
        splits["data.train_split"] = data.train_split
    for key, split in splits.items():
        if split not in manifest["splits"]:
            raise ConfigError(
                f"{key}={split!r}: no such split in {where}; it has {sorted(manifest['splits'])}"
            )
        # the packed stream: each document's tokens and its separator
        tokens = sum(shard["tokens"] + shard["documents"] for shard in manifest["splits"][split])
        if tokens < window:
            raise ConfigError(
                f"data.seq_length={data.seq_length}: one sample takes {window} tokens but split {split!r} "
                f"({key}) holds {tokens} ({where})"
            )
    for name in ("instances", "eval_instances"):
        if getattr(data, name):
            _check_instances(cfg, manifest, objective, verify, name)
    return manifest


def _check_instances(cfg: RunConfig, shards: dict, objective, verify: bool, name: str) -> None:
    """An instance set (`data.instances`, `data.eval_instances`) must carry the fields the objective trains
    on (pair labels: only nsp / sop sets have them, and each means another task), come from the shards'
    tokenizer and fit `data.seq_length`."""
    from plmscale.data.instances import InstanceSetError, load_instance_manifest

    key = f"data.{name}={getattr(cfg.data, name)}"
    try:
        manifest = load_instance_manifest(getattr(cfg.data, name), verify=verify)
    except InstanceSetError as err:
        raise ConfigError(f"{key}: {err}") from None
    try:
        objective.check_instances(manifest, f"data.{name}")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if manifest["tokenizer"]["sha256"] != shards["tokenizer"]["sha256"]:
        raise ConfigError(f"{key}: built with another tokenizer than data.shards={cfg.data.shards}")
    longest = manifest["counts"]["longest_instance"]
    if longest > cfg.data.seq_length:
        raise ConfigError(
            f"data.seq_length={cfg.data.seq_length}: {key} holds instances of up to {longest} tokens"
        )
    if not manifest["counts"]["instances"]:
        raise ConfigError(f"{key}: holds no instance")


def check_teacher(cfg: RunConfig, shards: dict[str, Any]) -> None:
    """Distillation: the teacher is a model directory, the student differs from it in shape only, its losses
    fit both shapes, and the teacher was trained on the shards' tokenizer."""
    if cfg.distill is None:
        return
    from plmscale import model_dir
    from plmscale.distill import default_student_layers
    from plmscale.distill.losses import build_loss
    from plmscale.distill.student import check_student_config

    teacher = Path(cfg.distill.teacher)
    key = f"distill.teacher={teacher}"
    missing = [name for name in (model_dir.CONFIG, model_dir.WEIGHTS, model_dir.TOKENIZER)
               if not (teacher / name).is_file()]  # fmt: skip
    if missing:
        raise ConfigError(
            f"{key}: not a model directory written by `plmscale train` (no {', '.join(missing)})"
        )
    try:
        teacher_model = model_dir.load_run_config(teacher).model
    except (ValidationError, ValueError) as err:
        raise ConfigError(
            f"{key}: {teacher / model_dir.CONFIG} is invalid: {' '.join(str(err).split())}"
        ) from None
    layers = cfg.distill.student_layers or default_student_layers(
        teacher_model.num_layers, cfg.model.num_layers
    )
    try:
        check_student_config(teacher_model, cfg.model, layers)
        for index, (name, _, params) in enumerate(cfg.distill.loss_entries()):
            build_loss(name, params, cfg.model, teacher_model, f"distill.losses.{index}")
    except ValueError as err:
        raise ConfigError(f"{err} ({key})") from None
    tp = cfg.parallel.tensor_parallel
    if teacher_model.num_heads % tp or teacher_model.ffn_size % tp:
        raise ConfigError(
            f"parallel.tensor_parallel={tp} must divide the teacher's heads ({teacher_model.num_heads}) and "
            f"FFN ({teacher_model.ffn_size}), as the teacher runs in the student's layout ({key})"
        )
    if file_sha256(teacher / model_dir.TOKENIZER) != shards["tokenizer"]["sha256"]:
        raise ConfigError(f"{key}: trained with another tokenizer than data.shards={cfg.data.shards}")
    if cfg.distill.teacher_cache:
        from plmscale.distill.cache import CacheError, check_cache

        try:
            check_cache(cfg, shards, verify=cfg.data.verify_checksums)
        except CacheError as err:
            raise ConfigError(str(err)) from None


def check_output_dir(cfg: RunConfig) -> None:
    """The output directory (or the nearest of its parents that exists) takes a file: tried, not guessed
    from permission bits (root passes those, a read-only filesystem does not)."""
    out = Path(cfg.train.output_dir).absolute()
    key = f"train.output_dir={cfg.train.output_dir}"
    existing = next(path for path in (out, *out.parents) if path.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"{key}: cannot write in {existing} ({err.strerror})") from None
