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
    from plmscale.parallel.distributed import world_size_from_env
    from plmscale.preflight import check_launch

    world_size = args.world_size or world_size_from_env()
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


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    from data_prep.cli import add_prep_parser
    from plmscale.compress import add_compress_parser
    from plmscale.distill.cache_command import add_distill_cache_parser
    from plmscale.eval import add_eval_parser
    from plmscale.export import add_export_parser, add_import_parser
    from plmscale.finetune import add_finetune_parser
    from plmscale.inference import add_inference_parsers
    from plmscale.plan import add_plan_parser
    from plmscale.prune import add_prune_parser
    from plmscale.training.checkpoint_tool import add_checkpoint_parser

    parser = argparse.ArgumentParser(prog="plmscale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('plmscale')}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_prep_parser(sub)
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
    add_distill_cache_parser(sub)
    add_export_parser(sub)
    add_import_parser(sub)
    add_eval_parser(sub)
    add_inference_parsers(sub)
    add_finetune_parser(sub)
    add_compress_parser(sub)
    add_plan_parser(sub)
    add_prune_parser(sub)
    add_checkpoint_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except (ConfigError, UserError, ManifestError, FileNotFoundError) as err:
        print(f"plmscale: error: {err}", file=sys.stderr)
        return 2
    # only training returns an exit status; other commands return what they computed, or nothing
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
