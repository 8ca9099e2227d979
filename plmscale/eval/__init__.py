"""Evaluation of model directories and the end-of-pipeline report: `plmscale eval`.

    plmscale eval --teacher runs/bert_tiny_demo/model --student runs/bert_tiny_distill/model \\
        --runs pretrain=runs/bert_tiny_demo distill=runs/bert_tiny_distill \\
        --export exports/bert_tiny_hf --plot reports/loss_curves.png --json reports/eval.json

Both models are scored on the same held-out windows and masks (same shards, seed, batch shape and the
teacher's sequence length). The heavy imports happen when the command runs, not when the CLI is built.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _named_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} must look like NAME=DIR")
    return name, path


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plmscale eval`."""
    parser = subparsers.add_parser(
        "eval",
        help="held-out loss, accuracy and CPU speed of a teacher (and student), plus loss curves",
        description="Evaluate model directories on held-out shards and print the pipeline report.",
    )
    parser.add_argument("--teacher", required=True, help="model directory (e.g. the pre-trained model)")
    parser.add_argument("--student", help="a second model directory to compare (e.g. the distilled one)")
    parser.add_argument("--shards", help="shard directory (default: the teacher's data.shards)")
    parser.add_argument("--split", default="valid")
    parser.add_argument(
        "--instances",
        help="held-out instances (`plmscale prep instances --split valid`) instead of the shards' split: "
        "adds pair_accuracy (NSP/SOP) and, on ERNIE sets, unit_accuracy",
    )
    parser.add_argument("--batches", type=int, default=8, help="batches to score (default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--seed", type=int, default=1234, help="seeds the masks (default 1234)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--runs",
        nargs="*",
        type=_named_path,
        default=[],
        metavar="NAME=DIR",
        help="training output directories (with metrics.jsonl) whose loss curves to plot and summarize",
    )
    parser.add_argument("--export", help="a Hugging Face export directory, to list among the outputs")
    parser.add_argument(
        "--fill-mask",
        nargs="*",
        default=[],
        metavar="TEXT",
        help='texts with "[MASK]"s (held-out sentences) to fill with each encoder, top 3 per mask',
    )
    parser.add_argument("--plot", default="loss_curves.png", help="PNG of the loss curves (with --runs)")
    parser.add_argument("--json", help="also write the evaluation numbers to this JSON file")
    parser.set_defaults(func=run_eval_command)
    return parser


def run_eval_command(args: argparse.Namespace) -> str:
    import torch

    from plmscale.config import resolve_path
    from plmscale.eval.evaluate import SPEED_SECONDS, evaluate
    from plmscale.eval.report import report
    from plmscale.model_dir import load_run_config

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher_cfg = load_run_config(args.teacher)
    shards = args.shards or resolve_path(teacher_cfg.data.shards)
    common = dict(
        shards_dir=shards,
        split=args.split,
        batches=args.batches,
        batch_size=args.batch_size,
        seed=args.seed,
        seq_length=teacher_cfg.data.seq_length,
        instances_dir=args.instances,
        speed_seconds=SPEED_SECONDS,
    )
    teacher = evaluate(args.teacher, **common)
    student = evaluate(args.student, **common) if args.student else None
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"teacher": teacher, "student": student}, indent=2) + "\n")
    models = {"teacher": args.teacher} | ({"student": args.student} if args.student else {})
    examples = fill_mask_examples(models, args.fill_mask)
    return report(teacher, student, dict(args.runs), args.plot, args.export, examples)


def fill_mask_examples(models: dict[str, str], texts: list[str], top_k: int = 3) -> dict:
    """text -> model name -> `FilledText`, with `plmscale fill-mask`'s own code."""
    if not texts:
        return {}
    from plmscale.inference.fill_mask import fill_mask
    from plmscale.inference.model import load_language_model

    loaded = {name: load_language_model(directory) for name, directory in models.items()}
    return {text: {name: fill_mask(lm, text, top_k) for name, lm in loaded.items()} for text in texts}


__all__ = ["add_eval_parser", "run_eval_command"]
