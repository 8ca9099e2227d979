"""Export a trained model directory to other frameworks' formats: `plmscale export`."""

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
    parser.set_defaults(func=run_export_command)
    return parser


def run_export_command(args: argparse.Namespace) -> None:
    from plmscale.export.hf import export_hf  # transformers loads only when exporting

    out = export_hf(args.model, args.output)
    print(f"exported {args.model} -> {out} ({args.format}, logits verified against plmscale)")


__all__ = ["add_export_parser", "run_export_command"]
