"""Downstream fine-tuning and evaluation of pre-trained encoders: `plmscale finetune`.

    plmscale finetune --model runs/demo/teacher/model --task runs/demo/data/task_package --output runs/demo/ft
    plmscale finetune --model teacher=T_DIR student=S_DIR --task TASK --output DIR   # one table for both
    plmscale finetune --model S_DIR --teacher FINETUNED_T_DIR --task TASK --output DIR   # task distillation

Sequence classification or regression, single sentences or pairs, from GLUE-format TSV or JSON Lines
(`plmscale.finetune.task`); scored with accuracy and F1 (binary and macro) or Pearson and Spearman; the
fine-tuned model is a model directory with its head (`plmscale.finetune.train`), exported on request as
`transformers`' `*ForSequenceClassification` (`plmscale.finetune.export`); with a teacher, the student
learns from it (TinyBERT's task distillation, `plmscale.finetune.distill`). In Python:
`finetune_models({"teacher": DIR, ...}, TASK_DIR, OUTPUT, Settings(...))`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from plmscale.arguments import fraction, positive
from plmscale.errors import UserError
from plmscale.finetune.settings import TINYBERT_TASK_LOSSES, DistillSettings, Settings


def _model_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    return (name, path) if sep and name and path else (text, text)


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plmscale finetune`."""
    defaults = Settings()
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune encoders on a classification or regression task and score them on its dev split",
        description="Fine-tune each model on TASK/train.{tsv,jsonl}, score it on TASK/dev.{tsv,jsonl}, "
        "print a table.",
    )
    parser.add_argument(
        "--model", required=True, nargs="+", type=_model_arg, metavar="[NAME=]DIR",
        help="model directories (encoders written by training, distillation or import); with several, "
        "each is fine-tuned into OUTPUT/NAME",
    )  # fmt: skip
    parser.add_argument("--task", required=True, help="directory with train and dev splits (and task.json)")
    parser.add_argument("--output", required=True, help="fine-tuned model directory to write")
    parser.add_argument("--export", help="also export as transformers' *ForSequenceClassification here")
    task = parser.add_argument_group("task columns (override TASK/task.json)")
    task.add_argument("--kind", choices=("classification", "regression"))
    task.add_argument("--text-a", help="column of the (first) text (default: sentence)")
    task.add_argument("--text-b", help="column of the second text of a sentence pair")
    task.add_argument("--label", help="column of the label (default: label)")
    task.add_argument(
        "--no-header",
        action="store_const",
        const=False,
        dest="header",
        help="TSV without a header row: columns are 0-based indices",
    )
    task.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="reject bad rows (counted by reason) instead of stopping at the first",
    )
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=positive(int), default=defaults.epochs)
    train.add_argument("--batch-size", type=positive(int), default=defaults.batch_size)
    train.add_argument(
        "--lr", type=positive(float), default=defaults.lr, help=f"peak learning rate (default {defaults.lr})"
    )
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument(
        "--warmup-fraction", type=fraction, default=defaults.warmup_fraction, help="share of the steps"
    )
    train.add_argument(
        "--max-seq-length",
        type=positive(int),
        default=defaults.max_seq_length,
        help="tokens per example, [CLS] and [SEP]s included",
    )
    train.add_argument(
        "--dropout", type=fraction, default=defaults.dropout, help="of the classification head"
    )
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--threads", type=positive(int), help="torch CPU threads (default: torch's choice)")
    distill = parser.add_argument_group("task distillation (TinyBERT's second stage)")
    distill.add_argument(
        "--teacher",
        metavar="FINETUNED_DIR",
        help="learn from this model, fine-tuned on the same task by `plmscale finetune`, instead of the labels alone",
    )
    distill.add_argument(
        "--distill-losses",
        metavar="YAML",
        help="weighted losses as in a recipe's distill.losses, a YAML list or a file holding one (default: "
        + ", ".join(e["name"] for e in TINYBERT_TASK_LOSSES)
        + " at temperature 1, TinyBERT's)",
    )
    distill.add_argument(
        "--intermediate-epochs",
        type=int,
        help="train the intermediate-layer losses alone for this many epochs, then the prediction-layer ones "
        "for --epochs (TinyBERT's order; default: as many as --epochs); 0: all together",
    )
    parser.set_defaults(func=run_finetune_command)
    return parser


def run_finetune_command(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [name for name, _ in args.model]
    if len(set(names)) != len(names):
        raise UserError(f"--model: names must differ, got {names}")
    settings = Settings(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_fraction=args.warmup_fraction, max_seq_length=args.max_seq_length, dropout=args.dropout,
        seed=args.seed,
    )  # fmt: skip
    columns = {
        "kind": args.kind,
        "text_a": args.text_a,
        "text_b": args.text_b,
        "label": args.label,
        "header": args.header,
    }
    distill = None
    if args.teacher:
        from plmscale.finetune.distill import parse_losses

        losses = parse_losses(args.distill_losses) if args.distill_losses else TINYBERT_TASK_LOSSES
        if args.intermediate_epochs is not None and args.intermediate_epochs < 0:
            raise UserError(f"--intermediate-epochs must be 0 or more, got {args.intermediate_epochs}")
        distill = DistillSettings(args.teacher, losses, args.intermediate_epochs)
    elif args.distill_losses or args.intermediate_epochs is not None:
        raise UserError("--distill-losses and --intermediate-epochs need --teacher")
    return finetune_models(
        dict(args.model),
        args.task,
        args.output,
        settings,
        columns,
        not args.skip_bad_rows,
        args.export,
        distill,
    )


def finetune_models(
    models: dict[str, str],
    task_dir: str | Path,
    output: str | Path,
    settings: Settings,
    columns: dict | None = None,
    strict: bool = True,
    export: str | Path | None = None,
    distill: DistillSettings | None = None,
    log=print,
) -> dict[str, dict]:
    """Fine-tune each model on the task (with `distill`, from its teacher) and print one table of their dev
    scores; return each one's results. One model is written to `output` (and `export`), several to
    `output/NAME` (and `export/NAME`)."""
    from plmscale.finetune.task import load_task
    from plmscale.finetune.train import check_model_dir, finetune

    task = load_task(task_dir, columns, strict)
    for model_dir in models.values():  # every mistake before the first model trains
        check_model_dir(model_dir, task)
        if distill:
            from plmscale.finetune.distill import check_distill

            check_distill(distill, task, Path(model_dir), settings.epochs)
    for directory in (output, export):
        try:
            if directory:
                Path(directory).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot write {directory}: {err.strerror}") from None
    log(describe_task(task))
    several = len(models) > 1
    results = {}
    for name, model_dir in models.items():
        out = Path(output) / name if several else Path(output)
        log(f"fine-tuning {model_dir} -> {out}")
        results[name] = finetune(model_dir, task, settings, out, log=log, distill=distill)
        if export:
            from plmscale.finetune.export import export_classifier_hf

            target = export_classifier_hf(out, Path(export) / name if several else export)
            log(f"exported {out} -> {target} (logits verified against transformers)")
    if distill:  # the teacher's own dev scores first: the students' share of them
        from plmscale.finetune.train import read_results

        log(
            results_table(
                {f"{Path(distill.teacher).name} (teacher)": read_results(distill.teacher)} | results
            )
        )
    else:
        log(results_table(results))
    return results


def describe_task(task) -> str:
    spec, counts = task.spec, {split: len(examples) for split, examples in task.examples.items()}
    what = f"{spec.kind}, {'sentence pairs' if task.pair else 'single sentences'}"
    labels = f", {len(task.labels)} classes" if task.labels else ""
    lines = [
        f"task {task.files['train'].parent}: {what}{labels}; {counts['train']} train, {counts['dev']} dev"
    ]
    for split, rejected in task.rejected.items():
        for reason, entry in rejected.by_reason.items():
            lines.append(
                f"  rejected from {split}: {reason}: {entry['count']} (first: {'; '.join(entry['examples'])})"
            )
    return "\n".join(lines)


def results_table(results: dict[str, dict]) -> str:
    """Dev scores of each model; with several, the main metric as a share of the first model's."""
    names = list(results)
    first = results[names[0]]["dev"]
    metrics = list(first)
    main = metrics[1]  # accuracy, or pearson: the metric after the loss
    compare = len(names) > 1
    header = ["model", *metrics, "seconds"] + [f"{main} / {names[0]}"] * compare
    rows = [
        [name, *(f"{r['dev'][m]:.4f}" for m in metrics), f"{r['seconds']:.1f}"]
        + [f"{r['dev'][main] / first[main]:.1%}" if first[main] else "n/a"] * compare
        for name, r in results.items()
    ]
    majority = results[names[0]]["majority_accuracy"]
    if majority is not None:
        rows.append(["majority class", "", f"{majority:.4f}"] + [""] * (len(header) - 3))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


__all__ = ["DistillSettings", "Settings", "add_finetune_parser", "finetune_models", "run_finetune_command"]
