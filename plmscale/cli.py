"""The `plmscale` command: prep, train, distill, export, import, eval.

    plmscale prep corpus|tokenizer|shards ...         offline data preparation (data_prep/)
    launch/train.sh RECIPE [key=value ...]             pre-train under the deepspeed launcher
    launch/train.sh RECIPE --distill                   distill a teacher into a smaller student
    plmscale distill-cache --config RECIPE --top-k K --output DIR   the teacher's top-k logits, cached offline
    plmscale export --model DIR --format hf --output DIR
    plmscale import --format hf --input HF_DIR --output DIR [--tokenizer MODEL]
    plmscale eval --teacher DIR --student DIR --shards DIR ...
    plmscale generate --model DIR --prompt TEXT        continue a prompt (decoder)
    plmscale fill-mask --model DIR --text TEXT         fill the [MASK]s of a text (encoder)
    plmscale finetune --model DIR --task DIR --output DIR   fine-tune and score on a downstream task
    plmscale prune --model DIR --heads K --ffn N --output DIR  prune heads, neurons, layers by importance
    plmscale compress --model NAME=DIR ... --shards DIR --output DIR   int8 / ONNX variants in one table
    plmscale plan --gpt3 175B --nodes 128                layouts that fit a cluster, fastest first
    plmscale checkpoint info|convert RUN_DIR          a run's checkpoints; their layout-free state

User errors print one line naming the file or key and exit with status 2; a training run stopped by the
divergence guard (train.on_nonfinite) prints one line naming the step and exits with status 3.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# megatron-core warns on import that the CUDA-only Transformer Engine / Apex are absent; plmscale never uses them.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from plmscale.config import ConfigError  # noqa: E402
from plmscale.errors import UserError  # noqa: E402
from plmscale.manifest import ManifestError  # noqa: E402


def _run_training(args: argparse.Namespace) -> int:
    from plmscale.preflight import check_launch

    world_size = args.world_size
    if not world_size:  # a rank, or a check of the launching process's own world (the import takes seconds)
        from plmscale.parallel.distributed import world_size_from_env

        world_size = world_size_from_env()
    # before any process group: an error is one line here, not a traceback on every rank
    cfg = check_launch(args.config, args.overrides, command=args.command, world_size=world_size)
    if int(os.environ.get("RANK", "0")) == 0:
        for warning in cfg.warnings(world_size):
            print(f"plmscale: warning: {warning}", file=sys.stderr)
    if args.validate_only:
        import json

        print(json.dumps(cfg.deepspeed_config(world_size), indent=2))
        return 0
    import torch.distributed as dist

    from plmscale.training.checkpoint import CheckpointError
    from plmscale.training.guard import TrainingDiverged
    from plmscale.training.trainer import Trainer

    try:
        Trainer(cfg, world_size).run()
    except TrainingDiverged as err:  # raised on every rank at the same step
        if dist.get_rank() == 0:
            print(f"plmscale: error: {err}", file=sys.stderr, flush=True)
        dist.barrier()  # the launcher kills the other ranks when the first one exits
        return 3
    except CheckpointError as err:  # a user error too, found only once the process group is up
        if dist.get_rank() == 0:  # raised on every rank (checkpoint.resume finds it collectively)
            print(f"plmscale: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


# Each command's parser, from the module that runs it: a command imports only its own module, so that, say,
# `plmscale prep` or a pre-launch check does not pay seconds for the model's libraries (megatron-core, ...).
COMMANDS = {  # command: (module, function that adds its parser; None: this one's), in `--help`'s order
    "prep": ("data_prep.cli", "add_prep_parser"),
    "train": None,
    "distill": None,
    "distill-cache": ("plmscale.distill.cache_command", "add_distill_cache_parser"),
    "export": ("plmscale.export", "add_export_parser"),
    "import": ("plmscale.export", "add_import_parser"),
    "eval": ("plmscale.eval", "add_eval_parser"),
    "generate": ("plmscale.inference", "add_inference_parsers"),
    "fill-mask": ("plmscale.inference", "add_inference_parsers"),
    "finetune": ("plmscale.finetune", "add_finetune_parser"),
    "compress": ("plmscale.compress", "add_compress_parser"),
    "plan": ("plmscale.plan", "add_plan_parser"),
    "prune": ("plmscale.prune", "add_prune_parser"),
    "checkpoint": ("plmscale.training.checkpoint_tool", "add_checkpoint_parser"),
}


def _add_training_parsers(sub) -> None:
    for name, text in (("train", "pre-train a model"), ("distill", "distill a teacher into a student")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", required=True, help="recipe YAML (launch/recipes/)")
        cmd.add_argument("overrides", nargs="*", help="section.key=value overrides")
        cmd.add_argument(
            "--validate-only", action="store_true", help="run the pre-launch checks, print DeepSpeed's JSON"
        )
        cmd.add_argument(
            "--world-size", type=int, default=0, help="with --validate-only: processes to assume"
        )
        cmd.set_defaults(func=_run_training)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of `command`'s alone when it names one."""
    from importlib import import_module
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="plmscale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('plmscale')}")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = [COMMANDS[command]] if command in COMMANDS else COMMANDS.values()
    for entry in dict.fromkeys(wanted):  # once each: one function adds several commands
        add = _add_training_parsers if entry is None else getattr(import_module(entry[0]), entry[1])
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(next(iter(argv), None)).parse_args(argv)
    try:
        status = args.func(args)
    except (ConfigError, UserError, ManifestError, FileNotFoundError) as err:
        print(f"plmscale: error: {err}", file=sys.stderr)
        return 2
    # only training returns an exit status; other commands return what they computed, or nothing
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
