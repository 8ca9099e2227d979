"""Use a trained model: `plmscale generate` continues a prompt with a decoder, `plmscale fill-mask` fills
the [MASK]s of a text with an encoder; either reads a model directory or its Hugging Face export, on CPU.

    plmscale generate --model runs/gpt_tiny/model --prompt "Return the absolute" --strategy sample --top-p 0.9
    plmscale fill-mask --model runs/demo/teacher/model --text "Return the absolute [MASK] of the argument."

Python: `load_language_model(DIR)`, then `generate(lm, prompt, ...)` or `fill_mask(lm, text)`. The heavy
imports happen when a command runs, not when the CLI is built.
"""

from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def add_inference_parsers(subparsers) -> None:
    """Register `plmscale generate` and `plmscale fill-mask`."""
    model_help = "model directory (written by training or distillation) or its `plmscale export --format hf`"
    gen = subparsers.add_parser(
        "generate",
        help="continue a prompt with a decoder (GPT) model",
        description="Continue a prompt: greedy, or sampled with temperature, top-k and top-p (nucleus).",
    )
    gen.add_argument("--model", required=True, help=model_help)
    gen.add_argument("--prompt", required=True, help='the text to continue ("" starts a new document)')
    gen.add_argument(
        "--max-new-tokens", type=_positive_int, default=32, help="at most this many (default 32)"
    )
    gen.add_argument("--strategy", choices=("greedy", "sample"), default="greedy")
    gen.add_argument("--temperature", type=float, default=1.0, help="sample: divides the logits (default 1)")
    gen.add_argument("--top-k", type=int, default=0, help="sample: from the k most probable (default 0: all)")
    gen.add_argument(
        "--top-p", type=float, default=1.0, help="sample: from the smallest set reaching p (default 1: all)"
    )
    gen.add_argument("--seed", type=int, default=0, help="seeds the sampling (default 0)")
    gen.add_argument(
        "--num-return-sequences", type=_positive_int, default=1, help="continuations (default 1)"
    )
    gen.set_defaults(func=run_generate)

    fill = subparsers.add_parser(
        "fill-mask",
        help="fill the [MASK]s of a text with an encoder (BERT family) model",
        description="Print the most probable tokens at each [MASK], with their probabilities, and the text filled.",
    )
    fill.add_argument("--model", required=True, help=model_help)
    fill.add_argument("--text", required=True, help='a text with one or more "[MASK]"')
    fill.add_argument("--top-k", type=_positive_int, default=5, help="candidates per mask (default 5)")
    fill.set_defaults(func=run_fill_mask)


def run_generate(args: argparse.Namespace) -> None:
    from plmscale.inference.generate import Sampling, generate
    from plmscale.inference.model import load_language_model

    sampling = Sampling(args.strategy, args.temperature, args.top_k, args.top_p)
    lm = load_language_model(args.model)
    outputs = generate(lm, args.prompt, args.max_new_tokens, sampling, args.seed, args.num_return_sequences)
    for number, output in enumerate(outputs, 1):
        print(output.text if len(outputs) == 1 else f"[{number}] {output.text}")


def run_fill_mask(args: argparse.Namespace) -> None:
    from plmscale.inference.fill_mask import fill_mask
    from plmscale.inference.model import load_language_model

    result = fill_mask(load_language_model(args.model), args.text, args.top_k)
    for number, candidates in enumerate(result.candidates, 1):
        print(f"[MASK] {number}:")
        for candidate in candidates:
            print(f"  {candidate.probability:7.4f}  {candidate.token!r}")
    print(f"filled: {result.text}")


__all__ = ["add_inference_parsers", "run_fill_mask", "run_generate"]
