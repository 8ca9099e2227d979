"""`plmscale plan`: the layouts of a recipe that fit a cluster, fastest first, as ready-to-run overrides.

    plmscale plan --gpt3 175B --nodes 128 --gpus-per-node 8 --gpu-memory 80 --intra-bw 300 --inter-bw 25
    plmscale plan --recipe launch/recipes/bert_large.yaml --nodes 4

`plmscale.plan.estimate` holds the arithmetic (parameters, FLOPs per token, model-state and activation
bytes), `plmscale.plan.search` the layouts and their step time; the training loop takes its MFU and HFU
FLOPs from here.
"""

from __future__ import annotations

import argparse
import os

from plmscale.config import REPO_ROOT, ConfigError, load_config
from plmscale.plan.estimate import hardware_flops_per_token, model_flops_per_token
from plmscale.plan.search import Cluster, Planner

GPT3_SIZES = ("125m", "350m", "760m", "1.3b", "2.7b", "6.7b", "13b", "175b")


def gpt3_recipe(size: str) -> str:
    path = REPO_ROOT / "launch" / "recipes" / f"gpt3_{size.lower()}.yaml"
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plmscale plan`."""
    parser = subparsers.add_parser(
        "plan",
        help="memory, FLOPs and the fastest TP x PP x DP layouts of a recipe on a cluster",
        description="Estimate parameters, FLOPs, model-state and activation bytes, and rank the layouts "
        "that fit a cluster by estimated step time.",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--recipe", help="recipe YAML (its model, sequence, global batch and precision)")
    model.add_argument(
        "--gpt3", type=str.lower, choices=GPT3_SIZES, help="a GPT-3 size (launch/recipes/gpt3_SIZE.yaml)"
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--intra-bw", type=float, default=300.0, help="GB/s per GPU in a node (default 300)")
    parser.add_argument("--inter-bw", type=float, default=25.0, help="GB/s per GPU across nodes (default 25)")
    parser.add_argument(
        "--peak-flops", type=float, help="FLOP/s per GPU (default: the recipe's train.peak_flops)"
    )
    parser.add_argument(
        "--mfu", type=float, default=0.5, help="fraction of peak the kernels reach (default 0.5)"
    )
    parser.add_argument("--headroom", type=float, default=0.1, help="share of memory left free (default 0.1)")
    parser.add_argument("--top", type=int, default=10, help="layouts to list (default 10)")
    parser.set_defaults(func=run_plan_command)
    return parser


def run_plan_command(args: argparse.Namespace) -> None:
    from plmscale.plan.report import print_plan

    for name in ("nodes", "gpus_per_node", "top"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("gpu_memory", "intra_bw", "inter_bw"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if not 0 < args.mfu <= 1 or not 0 <= args.headroom < 1:
        raise ConfigError("--mfu must lie in (0, 1] and --headroom in [0, 1)")
    recipe = args.recipe or gpt3_recipe(args.gpt3)
    cfg = load_config(recipe)
    cluster = Cluster(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_memory_gib=args.gpu_memory,
        intra_bw=args.intra_bw,
        inter_bw=args.inter_bw,
        peak_flops=args.peak_flops or cfg.train.peak_flops,
        efficiency=args.mfu,
        headroom=args.headroom,
    )
    print_plan(Planner(cfg, cluster), str(recipe), args.top)


__all__ = [
    "Cluster",
    "Planner",
    "add_plan_parser",
    "hardware_flops_per_token",
    "model_flops_per_token",
    "run_plan_command",
]
