"""`plmscale checkpoint info|convert`: what a run's checkpoints hold, and the layout-free state of one that
was written without it (plmscale/training/reshard.py).

    plmscale checkpoint info RUN_DIR
    deepspeed --num_gpus N --module plmscale.cli checkpoint convert RUN_DIR [--tag TAG] [key=value ...]

`convert` runs in the checkpoint's own layout (N = its TP x PP x DP processes), loads it through DeepSpeed and
writes TAG/layout_free/; the run can then resume in any layout. The config is the one in the checkpoint's
meta.json or, for a checkpoint written before plmscale wrote one, RUN_DIR/config.yaml (overrides name the
layout it was saved in, if the run changed it since).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from plmscale.config import ConfigError, RunConfig, apply_overrides
from plmscale.training.layout import DIRECTORY, Layout, read_meta


def add_checkpoint_parser(subparsers) -> None:
    parser = subparsers.add_parser("checkpoint", help="inspect a run's checkpoints; write layout-free state")
    actions = parser.add_subparsers(dest="action", required=True)
    info = actions.add_parser("info", help="each checkpoint's step, layout, layout-free state and size")
    info.add_argument("run_dir", type=Path, help="a run's train.output_dir")
    info.set_defaults(func=run_info)
    convert = actions.add_parser(
        "convert", help="write a checkpoint's layout-free state (launch with the checkpoint's processes)"
    )
    convert.add_argument("run_dir", type=Path, help="a run's train.output_dir")
    convert.add_argument("--tag", help="checkpoint to convert (default: the latest)")
    convert.add_argument(
        "overrides", nargs="*", help="section.key=value overrides of the checkpoint's config"
    )
    convert.set_defaults(func=run_convert)


def _checkpoints(run_dir: Path) -> Path:
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise ConfigError(f"{run_dir} holds no checkpoints/ (is it a run's train.output_dir?)")
    return directory


def _size(paths) -> int:
    return sum(path.stat().st_size for path in paths if path.is_file())


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def _layout_free_status(tag_dir: Path, meta: dict | None) -> str:
    out = tag_dir / DIRECTORY
    if meta is None:
        return "incomplete" if any(out.glob("*.safetensors")) else "absent"
    if not meta["tensors"]:
        return "not written"
    sizes = {name: (out / name).stat().st_size if (out / name).is_file() else None for name in meta["files"]}
    if sizes != meta["files"]:
        return "damaged"
    return f"complete, {_megabytes(sum(sizes.values()))}"


def info_lines(run_dir: Path) -> list[str]:
    directory = _checkpoints(run_dir)
    latest = (directory / "latest").read_text().strip() if (directory / "latest").is_file() else None
    tags = sorted(path for path in directory.glob("step_*") if path.is_dir())
    lines = [f"{directory}: {len(tags)} checkpoint(s), latest {latest or 'none'}"]
    rows = [("tag", "step", "saved as", "layout-free state", "DeepSpeed files")]
    for tag_dir in tags:
        meta = read_meta(tag_dir)
        layout = str(Layout.from_json(meta["layout"])) if meta else "unknown (no meta.json)"
        files = [path for path in tag_dir.iterdir() if path.is_file()]
        rows.append(
            (
                tag_dir.name + (" (latest)" if tag_dir.name == latest else ""),
                str(meta["step"]) if meta else tag_dir.name.removeprefix("step_").lstrip("0") or "0",
                layout,
                _layout_free_status(tag_dir, meta),
                f"{len(files)}, {_megabytes(_size(files))}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return lines


def run_info(args: argparse.Namespace) -> None:
    print("\n".join(info_lines(args.run_dir)))


def _checkpoint_config(run_dir: Path, tag_dir: Path, meta: dict | None, overrides: list[str]) -> RunConfig:
    """The config in the checkpoint's meta.json, else the run's resolved config.yaml (as the run saved it)."""
    source = tag_dir / DIRECTORY / "meta.json" if meta else run_dir / "config.yaml"
    if meta is None and not source.is_file():
        raise ConfigError(f"{source} not found: give the run directory (train.output_dir)")
    raw = meta["config"] if meta else yaml.safe_load(source.read_text())
    try:
        return RunConfig.model_validate(apply_overrides(raw, overrides))
    except ValueError as err:
        raise ConfigError(f"{source}: {' '.join(str(err).split())}") from None


def run_convert(args: argparse.Namespace) -> None:
    directory = _checkpoints(args.run_dir)
    tag = args.tag or ((directory / "latest").read_text().strip() if (directory / "latest").is_file() else "")
    tag_dir = directory / tag
    if not tag or not tag_dir.is_dir():
        raise ConfigError(f"{directory} has no checkpoint {tag or '(no latest)'}")
    meta = read_meta(tag_dir)
    config = _checkpoint_config(args.run_dir, tag_dir, meta, args.overrides)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by the deepspeed launcher
    layout = Layout.of(config, world_size)  # checks the world size fits the config
    if meta is not None and not Layout.from_json(meta["layout"]).shards_like(layout):
        saved = Layout.from_json(meta["layout"])
        raise ConfigError(f"{tag_dir} was saved as {saved}: launch convert with {saved.world_size} processes")

    from plmscale.training import checkpoint, reshard  # torch, DeepSpeed: only once the arguments are known
    from plmscale.training.trainer import Trainer

    engine = Trainer(config, world_size).engine
    client_state = checkpoint.load_deepspeed(engine, directory, tag_dir)
    step = int(client_state["step"])
    saved_config = RunConfig.model_validate(client_state["config"])
    reshard.save(engine, tag_dir, step, saved_config, tensors=True)
    checkpoint.write_record(tag_dir, step, saved_config)  # the record lists the new files
    if int(os.environ.get("RANK", "0")) == 0:
        meta = read_meta(tag_dir)
        print(f"wrote {tag_dir / DIRECTORY} (step {step}, saved as {layout}): "
              f"{_layout_free_status(tag_dir, meta)}")  # fmt: skip
