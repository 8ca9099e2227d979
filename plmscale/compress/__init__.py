"""Compression that ships, measured in one table: `plmscale compress`.

    plmscale compress --model teacher=runs/demo/teacher/model student=runs/demo/student/model \\
        --shards runs/demo/data/shards --task runs/demo/data/task_package --output runs/demo/compress

Each model (teacher first: ratios are against it) is deployed as fp32 PyTorch, int8 PyTorch (dynamic
quantization, `plmscale.compress.int8`), ONNX and ONNX int8 under onnxruntime (`plmscale.compress.onnx`,
the `deploy` extra); the table gives each variant's parameters, bytes on disk, CPU latency at batch 1 and
throughput at batch 32, held-out MLM (or LM) quality, logit parity with fp32 and, with `--task`, the dev
metric of the model fine-tuned by `plmscale finetune`'s code (`plmscale.compress.table`). OUTPUT receives
the variants' files, the fine-tuned models, compress.json and compress.png (quality against speed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from plmscale.arguments import positive
from plmscale.errors import UserError
from plmscale.finetune.settings import Settings

VARIANTS = ("fp32", "int8", "onnx", "onnx-int8")
ONNX_VARIANTS = ("onnx", "onnx-int8")


def _named_dir(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} must look like NAME=DIR")
    return name, path


def add_compress_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plmscale compress`."""
    defaults = Settings()
    parser = subparsers.add_parser(
        "compress",
        help="int8 / ONNX variants of models, with size, CPU speed, held-out and task quality in one table",
        description="Deploy each model as fp32, int8, ONNX and ONNX int8 and measure every variant.",
    )
    parser.add_argument(
        "--model", required=True, nargs="+", type=_named_dir, metavar="NAME=DIR",
        help="model directories, the reference (teacher) first: students, pruned models",
    )  # fmt: skip
    parser.add_argument("--shards", required=True, help="shard directory of the held-out split")
    parser.add_argument(
        "--output", required=True, help="directory for the variants, fine-tuned models, report"
    )
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="default: all (fp32 first)"
    )
    parser.add_argument("--task", help="a `plmscale finetune` task directory: adds the dev metric")
    held_out = parser.add_argument_group("held-out scoring (as `plmscale eval`)")
    held_out.add_argument("--split", default="valid")
    held_out.add_argument("--batches", type=positive(int), default=8, help="batches to score (default 8)")
    held_out.add_argument("--batch-size", type=positive(int), default=8, help="sequences a batch (default 8)")
    held_out.add_argument("--seed", type=int, default=1234, help="seeds the masks (default 1234)")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--threads", type=positive(int), help="CPU threads (default: torch's choice)")
    speed.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="time forward passes by wall clock, or by this process's CPU time, steadier on a machine shared "
        "with other work (a latency only with --threads 1: it sums every thread's time)",
    )  # fmt: skip
    parser.add_argument(
        "--speed-seconds", type=float,
        help="time each model's forward for at least this long per batch size and keep the best pass "
        "(default: plmscale eval's, 1 s)",
    )  # fmt: skip
    tune = parser.add_argument_group("fine-tuning (with --task; as `plmscale finetune`)")
    tune.add_argument("--epochs", type=positive(int), default=defaults.epochs)
    tune.add_argument("--lr", type=positive(float), default=defaults.lr)
    tune.add_argument("--max-seq-length", type=positive(int), default=defaults.max_seq_length)
    tune.add_argument("--finetune-batch-size", type=positive(int), default=defaults.batch_size)
    parser.add_argument("--plot", help="PNG of quality against speed (default OUTPUT/compress.png)")
    parser.set_defaults(func=run_compress_command)
    return parser


def check_inputs(models: dict[str, str], variants: list[str], shards: str, task_dir: str | None):
    """Every mistake as one line before anything is trained or exported; returns the loaded task."""
    from plmscale.compress.onnx import check_onnx_installed
    from plmscale.eval.evaluate import check_same_tokenizer
    from plmscale.model_dir import load_run_config

    if variants[0] != "fp32":
        raise UserError("--variants: fp32 comes first (the reference of parity and ratios)")
    if set(variants) & set(ONNX_VARIANTS):
        check_onnx_installed()
    for model_dir in models.values():
        run_cfg = load_run_config(model_dir)
        if run_cfg.model.generator_hidden_fraction is not None:
            raise UserError(f"{model_dir}: ELECTRA's generator-discriminator pair is not compressed here")
        check_same_tokenizer(Path(model_dir), shards)
    if task_dir is None:
        return None
    from plmscale.finetune.task import load_task
    from plmscale.finetune.train import check_model_dir

    task = load_task(task_dir, {})
    for model_dir in models.values():
        check_model_dir(model_dir, task)
    return task


def run_compress_command(args: argparse.Namespace) -> list[dict]:
    import torch

    from plmscale.compress import table
    from plmscale.eval.evaluate import SPEED_SECONDS
    from plmscale.model_dir import load_run_config

    if args.threads:
        torch.set_num_threads(args.threads)
    models = dict(args.model)
    if len(models) != len(args.model):
        raise UserError(f"--model: names must differ, got {[name for name, _ in args.model]}")
    variants = list(dict.fromkeys(args.variants))
    task = check_inputs(models, variants, args.shards, args.task)
    output = Path(args.output)
    settings = Settings(
        epochs=args.epochs,
        lr=args.lr,
        max_seq_length=args.max_seq_length,
        batch_size=args.finetune_batch_size,
    )
    held_out = dict(
        shards_dir=args.shards, split=args.split, batches=args.batches, batch_size=args.batch_size,
        seed=args.seed, seq_length=load_run_config(args.model[0][1]).data.seq_length,
    )  # fmt: skip
    speed_seconds = SPEED_SECONDS if args.speed_seconds is None else args.speed_seconds
    rows = table.measure(
        models,
        variants,
        held_out,
        output,
        args.clock,
        task,
        settings,
        args.threads,
        speed_seconds=speed_seconds,
    )
    threads = torch.get_num_threads()
    plot = table.plot(rows, Path(args.plot) if args.plot else output / "compress.png")
    setup = held_out | {"clock": args.clock, "threads": threads, "task": args.task}
    report = table.write_json(rows, setup, output / "compress.json")
    print(table.describe(rows, held_out, args.clock, threads, speed_seconds))
    print(table.format_table(rows))
    print(f"wrote {report} and {plot}")
    return rows


__all__ = ["add_compress_parser", "run_compress_command"]
