"""Move models between plmscale and other frameworks: `plmscale export` and `plmscale import`."""

from __future__ import annotations

import argparse

FORMATS = ("hf",)


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plmscale export --model DIR --format hf --output DIR`."""
    parser = subparsers.add_parser(
        "export",
        help="export a model directory (e.g. to Hugging Face transformers), verified against plmscale",
        description="Export a model directory; the export is reloaded and its logits checked before exit.",
    )
    parser.add_argument("--model", required=True, help="model directory written by training or distillation")
    parser.add_argument("--format", choices=FORMATS, default="hf")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument(
        "--family",
        choices=("roberta",),
        help="another transformers family computing the same (an encoder in BERT's layout: RoBERTa); "
        "default: the model's own",
    )
    parser.set_defaults(func=run_export_command)
    return parser


def run_export_command(args: argparse.Namespace) -> None:
    from plmscale.export.hf import export_hf  # transformers loads only when exporting

    out = export_hf(args.model, args.output, {"roberta": "Roberta"}.get(args.family))
    print(f"exported {args.model} -> {out} ({args.format}, logits verified against plmscale)")


def add_import_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plmscale import --format hf --input DIR --output DIR [--tokenizer MODEL]`."""
    parser = subparsers.add_parser(
        "import",
        help="import a Hugging Face BERT / RoBERTa / Megatron-BERT / ALBERT / GPT-2 checkpoint as a model "
        "directory",
        description="Import a local checkpoint directory (nothing is downloaded); plmscale's logits are "
        "checked against transformers' before the model directory is written.",
    )
    parser.add_argument("--format", choices=FORMATS, default="hf")
    parser.add_argument("--input", required=True, help="checkpoint directory (config.json and weights)")
    parser.add_argument("--output", required=True, help="model directory to write")
    parser.add_argument(
        "--tokenizer",
        help="SentencePiece model with plmscale's special ids to ship with it (default: the input's "
        "tokenizer.model, if any)",
    )
    parser.set_defaults(func=run_import_command)
    return parser


def run_import_command(args: argparse.Namespace) -> None:
    from plmscale.export.hf_import import import_hf

    meta = import_hf(args.input, args.output, args.tokenizer)
    imported = meta["imported"]
    diff = max(imported["max_logit_difference"].values())
    print(
        f"imported {args.input} ({imported['architecture']}) -> {args.output} "
        f"(logits verified against transformers, max |difference| {diff:.2g})"
    )
    if imported["initialized"]:
        print(
            f"not in the checkpoint, initialized as transformers does: {', '.join(imported['initialized'])}"
        )


__all__ = ["add_export_parser", "add_import_parser", "run_export_command", "run_import_command"]
