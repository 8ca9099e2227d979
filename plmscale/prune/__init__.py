"""Structured pruning of a model directory: `plmscale prune`.

    plmscale prune --model runs/demo/teacher/model --heads 2 --ffn 256 --output runs/demo/pruned

Heads and FFN neurons are scored by first-order Taylor importance on batches of the model's own objective
(`importance.py`), the most important kept in every layer (`structure.py`), whole layers dropped by name or
by score. The batches come from the training split: scored on the valid split, the units would be selected
by the very data `plmscale eval` then reports the pruned model's accuracy on. The output is a normal model
directory: every command loads it, `plmscale export` exports it, and distillation from the unpruned model
recovers what pruning cost (README, "Pruning").
"""

from __future__ import annotations

import argparse

from plmscale.arguments import positive


def count_or_fraction(text: str) -> int | float:
    """A count of units (an integer >= 1) or a fraction of them (a number in (0, 1))."""
    try:
        value = int(text) if text.strip().lstrip("+-").isdigit() else float(text)
    except ValueError:
        value = None
    if (
        value is None
        or (isinstance(value, int) and value < 1)
        or (isinstance(value, float) and not 0 < value < 1)
    ):
        raise argparse.ArgumentTypeError(f"{text} is neither a count >= 1 nor a fraction in (0, 1)")
    return value


count_or_fraction.__name__ = "count"


def layer_list(text: str) -> list[int]:
    """Comma-separated layer indices."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer indices") from None


def add_prune_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plmscale prune`."""
    parser = subparsers.add_parser(
        "prune",
        help="prune attention heads, FFN neurons and layers by importance on training data",
        description="Score heads, FFN neurons and layers by first-order Taylor importance on batches "
        "of the training split, keep the most important, and write a model directory.",
    )
    parser.add_argument("--model", required=True, help="model directory to prune")
    parser.add_argument("--output", required=True, help="model directory to write")
    parser.add_argument(
        "--heads", type=count_or_fraction, help="attention heads to keep per layer (a count, or a fraction)"
    )
    parser.add_argument(
        "--ffn", type=count_or_fraction, help="FFN neurons to keep per layer (a count, or a fraction)"
    )
    depth = parser.add_mutually_exclusive_group()
    depth.add_argument("--layers", type=positive(int), help="layers to keep, the most important")
    depth.add_argument("--drop-layers", type=layer_list, help="layers to drop, e.g. 1,2 (0 is the first)")
    parser.add_argument("--shards", help="data to score on (default: the model's data.shards)")
    parser.add_argument(
        "--split", default="train", help="split of the shards (default train: valid is what eval reports)"
    )
    parser.add_argument("--batches", type=positive(int), default=16, help="batches to score (default 16)")
    parser.add_argument(
        "--batch-size", type=positive(int), default=32, help="sequences per batch (default 32)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the masks of the scoring batches")
    parser.set_defaults(func=run_prune_command)
    return parser


def run_prune_command(args: argparse.Namespace) -> None:
    from plmscale.prune.run import prune_model_dir

    meta = prune_model_dir(
        args.model,
        args.output,
        heads=args.heads,
        ffn=args.ffn,
        layers=args.layers,
        drop_layers=args.drop_layers,
        shards=args.shards,
        split=args.split,
        batches=args.batches,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    from plmscale.model_dir import load_run_config

    params, cfg = meta["parameters"], load_run_config(args.output).model
    print(
        f"pruned {args.model} -> {args.output}: layers {meta['kept_layers']}, "
        f"{len(meta['kept_heads'][0])} heads and {len(meta['kept_neurons'][0])} FFN neurons per layer, "
        f"{params['before']:,} -> {params['after']:,} parameters"
    )
    shape = {
        key: getattr(cfg, key) for key in ("num_layers", "num_heads", "attention_head_dim", "ffn_hidden_size")
    }
    print(
        f"recover: launch/train.sh RECIPE --distill distill.teacher={args.model} "
        f"train.init_from={args.output} distill.student_layers=null "
        + " ".join(f"model.{key}={value}" for key, value in shape.items() if value is not None)
    )
