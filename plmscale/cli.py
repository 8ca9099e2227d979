"""The `plmscale` command: prep, train, distill, export, eval.

    plmscale prep corpus|tokenizer|shards ...         offline data preparation (data_prep/)
    launch/train.sh RECIPE [key=value ...]             pre-train under the deepspeed launcher
    launch/train.sh RECIPE --distill                   distill a teacher into a smaller student
    plmscale export --model DIR --format hf --output DIR
    plmscale eval --teacher DIR --student DIR --shards DIR ...

User errors print one line naming the file or key and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings

# megatron-core warns on import that the CUDA-only Transformer Engine / Apex are absent; plmscale never uses them.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from data_prep import UserError  # noqa: E402
from data_prep.manifest import ManifestError  # noqa: E402
from plmscale.config import ConfigError, load_config  # noqa: E402


def _run_training(args: argparse.Namespace) -> None:
    from plmscale.parallel.distributed import world_size_from_env

    cfg = load_config(args.config, args.overrides)
    if args.command == "distill" and cfg.distill is None:
        raise UserError(f"{args.config}: `plmscale distill` needs a `distill:` section")
    if args.command == "train" and cfg.distill is not None:
        raise UserError(f"{args.config}: has a `distill:` section; run it with `plmscale distill`")
    world_size = args.world_size or world_size_from_env()
    if args.validate_only:
        import json

        print(json.dumps(cfg.deepspeed_config(world_size), indent=2))
        return
    from plmscale.training.checkpoint import CheckpointError
    from plmscale.training.trainer import Trainer

    try:
        Trainer(cfg, world_size).run()
    except CheckpointError as err:  # a user error too, found only once the process group is up
        raise UserError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    from data_prep.cli import add_prep_parser
    from plmscale.eval import add_eval_parser
    from plmscale.export import add_export_parser

    parser = argparse.ArgumentParser(prog="plmscale", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_prep_parser(sub)
    for name, text in (("train", "pre-train a model"), ("distill", "distill a teacher into a student")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", required=True, help="recipe YAML (launch/recipes/)")
        cmd.add_argument("overrides", nargs="*", help="section.key=value overrides")
        cmd.add_argument("--validate-only", action="store_true", help="check the config, print DeepSpeed's")
        cmd.add_argument(
            "--world-size", type=int, default=0, help="with --validate-only: processes to assume"
        )
        cmd.set_defaults(func=_run_training)
    add_export_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, UserError, ManifestError, FileNotFoundError) as err:
        print(f"plmscale: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
