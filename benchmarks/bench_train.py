"""Training speed: plmscale's real step against the Hugging Face model of the same shape, and per layout.

Side by side, in one run: plmscale's `Trainer` (built in this process's child, one rank: DeepSpeed ZeRO-1,
or ds_configs/NAME.json with --ds-config NAME, torch AdamW, clipping 1.0; fp32 on CPU, bf16 on an
accelerator) trains on real shards built from the embedded corpus; the peer is the `transformers` class of
the same shape in a plain torch loop (fp32 weights, bf16 autocast on an accelerator, AdamW fused there,
clipping 1.0, random tokens, 15 % MLM labels): `GPT2LMHeadModel` for the decoder and, for the encoder, both
`MegatronBertForMaskedLM` (exactly plmscale's trunk: pre-LN, no embedding LayerNorm, final LayerNorm, the
export target, but eager attention) and `BertForMaskedLM` (post-LN, same matmuls, SDPA attention: the faster
one). Each side runs in a process of its own (the sides: benchmarks/train_sides.py), the sides alternate,
and the best of --repeat runs counts (other work on the machine only slows).

Printed per shape: tokens/s, MFU (PaLM: 6 N + 12 L h s per token against a matmul peak measured in the
same run), peak memory (accelerator: max allocated; CPU: peak RSS of the process), plmscale's ratio to
each peer in tokens/s and in CPU time per step (the least of the repeats: on a shared machine the process's
CPU time is the steadier measure), and plmscale's step in phases (data, forward, loss, backward,
optimizer, the rest) from a separate pass that synchronizes the device around each phase. CPU shapes are
small (2 cores, fp32); with an accelerator the shapes of GPT-3 XL and BERT-large are measured too.

`--layouts` trains the small GPT recipe under the real launcher (on CPU, gloo): 1 process, TP2, PP2 and
TP2 x PP2 x DP2 (8 processes), and prints tokens/s and step time per layout from metrics.jsonl.

    python benchmarks/bench_train.py                      # CPU shapes (+ GPT-3 XL / BERT-large on a GPU)
    python benchmarks/bench_train.py --quick              # tiny shapes, 2 steps: a smoke run
    python benchmarks/bench_train.py --profile 25         # + torch.profiler's top ops of plmscale's step
    python benchmarks/bench_train.py --layouts            # step time per parallel layout, CPU
    bash benchmarks/gpu_check.sh                          # GPU: the two large shapes only (issue 8)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from train_sides import (
    PEER_NAMES,
    PEERS,
    REPO,
    RESULT,
    PhaseTimer,
    Shape,
    accelerator,
    build_shards,
    free_port,
    on_cpu,
    run_config,
    shard_vocab,
    worker,
)

CPU_SHAPES = [
    Shape("GPT 4 x 256, seq 256, micro 4", "decoder", 4, 256, 4, 256, 4),
    Shape("BERT 4 x 256, seq 128, micro 8", "encoder", 4, 256, 4, 128, 8),
]
QUICK_SHAPES = [
    Shape("GPT 2 x 64, seq 64, micro 2", "decoder", 2, 64, 4, 64, 2),
    Shape("BERT 2 x 64, seq 64, micro 2", "encoder", 2, 64, 4, 64, 2),
]
ACCELERATOR_SHAPES = [
    Shape("GPT 24 x 2048, seq 2048, micro 8 (GPT-3 XL)", "decoder", 24, 2048, 16, 2048, 8),
    Shape("BERT 24 x 1024, seq 512, micro 32 (BERT-large)", "encoder", 24, 1024, 16, 512, 32),
]
LAYOUTS = [("1 process", 1, 1, 1), ("TP2", 2, 1, 2), ("PP2", 1, 2, 2), ("TP2 x PP2 x DP2", 2, 2, 8)]


def run_worker(side: str, shapes: list[Shape], shards: Path, args) -> dict:
    command = [
        sys.executable, __file__, "--worker", side, "--shards", str(shards),
        "--shapes", json.dumps([asdict(s) for s in shapes]),
        "--warmup", str(args.warmup), "--steps", str(args.steps), "--profile", str(args.profile),
        "--threads", str(args.threads), "--ds-config", args.ds_config,
    ] + ["--peer-keeps-memory"] * args.peer_keeps_memory  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench_train: the {side} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    if args.profile and side == "plmscale":
        print(proc.stderr[proc.stderr.find("-----") - 200 :])
    line = next(line for line in proc.stdout.splitlines() if line.startswith(RESULT))
    return json.loads(line[len(RESULT) :])


def best_of(runs: list[dict]) -> dict:
    """Per shape and implementation, the fastest run (with its memory and phases), and the least CPU time of
    any run: on a loaded machine the wall clock measures the other work too, the process's CPU time less."""
    best = {"matmul_flops": max(r["matmul_flops"] for r in runs if "matmul_flops" in r)}
    for run in runs:
        for shape, sides in run.items():
            if shape == "matmul_flops":
                continue
            for side, result in sides.items():
                kept = best.setdefault(shape, {}).get(side)
                least_cpu = min(result["cpu_seconds"], kept["cpu_seconds"]) if kept else result["cpu_seconds"]
                if kept is None or result["seconds"] < kept["seconds"]:
                    best[shape][side] = dict(result)
                best[shape][side]["cpu_seconds"] = least_cpu
    return best


def print_tables(best: dict, shapes: list[Shape], device: str, load: str, peer_keeps_memory: bool) -> None:
    peak = best["matmul_flops"]
    print(f"\ndevice: {device}; matmul peak measured: {peak / 1e9:,.1f} GFLOP/s; load average: {load}")
    if peer_keeps_memory:
        print("the peers keep freed memory as plmscale's CPU trainer does (--peer-keeps-memory)")
    print(
        "| shape | implementation | tokens/s | step ms | CPU ms | MFU | peak memory MiB | plmscale / this "
        "| same, CPU time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        sides = best[shape.name]
        tokens = shape.micro * shape.seq
        flops = sides["plmscale"]["flops_per_token"]
        ours = tokens / sides["plmscale"]["seconds"]
        ours_cpu = sides["plmscale"]["cpu_seconds"]
        for side in ["plmscale", *PEERS[shape.kind]]:
            result = sides[side]
            rate = tokens / result["seconds"]
            name = "plmscale" if side == "plmscale" else PEER_NAMES[side]
            print(
                f"| {shape.name} | {name} | {rate:,.0f} | {result['seconds'] * 1e3:.1f} | "
                f"{result['cpu_seconds'] * 1e3:.1f} | "
                f"{rate * flops / peak:.1%} | {result['memory_mib']:,.0f} | {ours / rate:.2f} | "
                f"{result['cpu_seconds'] / ours_cpu:.2f} |"
            )
    print("\nplmscale's step in phases (ms; device synchronized around each, a separate pass):")
    print("| shape | " + " | ".join(PhaseTimer.PHASES) + " | other | step |")
    print("|---|" + "---|" * (len(PhaseTimer.PHASES) + 2))
    for shape in shapes:
        phases = best[shape.name]["plmscale"]["phases"]
        cells = [f"{phases[p] * 1e3:.1f}" for p in (*PhaseTimer.PHASES, "other")]
        print(f"| {shape.name} | " + " | ".join(cells) + f" | {sum(phases.values()) * 1e3:.1f} |")


def chosen_shapes(args) -> list[Shape]:
    """--quick: the tiny ones; --sizes small: the CPU shapes; large: GPT-3 XL and BERT-large (an
    accelerator's); auto: small, and large too where there is an accelerator."""
    if args.quick:
        return QUICK_SHAPES
    large = args.sizes == "large" or (args.sizes == "auto" and not on_cpu())
    return ([] if args.sizes == "large" else CPU_SHAPES) + (ACCELERATOR_SHAPES if large else [])


def compare(args, shards: Path, shapes: list[Shape]) -> None:
    device = accelerator().device_name()
    runs = []
    for repeat in range(args.repeat):
        for side in ("plmscale", "peer") if repeat % 2 == 0 else ("peer", "plmscale"):
            runs.append(run_worker(side, shapes, shards, args))
            print(f"repeat {repeat + 1}/{args.repeat}: {side} done", file=sys.stderr)
    print_tables(best_of(runs), shapes, device, load_average(), args.peer_keeps_memory)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


def layouts(args, shards: Path, root: Path) -> None:
    """The small GPT recipe under launch/train.sh, on CPU (gloo), in each layout."""
    import yaml

    recipe = REPO / "launch" / "recipes" / "gpt_tiny.yaml"
    train = yaml.safe_load(recipe.read_text())["train"]
    tokens_per_step = train["global_batch_size"] * yaml.safe_load(recipe.read_text())["data"]["seq_length"]
    steps = args.warmup + args.steps
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    print(
        f"\n{recipe.relative_to(REPO)}: {tokens_per_step} tokens per step; steps after the first {args.warmup}"
    )
    print("| layout | processes | tokens/s | step ms (median) |")
    print("|---|---|---|---|")
    for name, tp, pp, procs in LAYOUTS:
        output = root / f"tp{tp}_pp{pp}"
        command = [
            "bash", str(REPO / "launch" / "train.sh"), str(recipe), f"data.shards={shards}",
            f"model.vocab_size={shard_vocab(shards)}", f"parallel.tensor_parallel={tp}",
            f"parallel.pipeline_parallel={pp}", f"train.train_steps={steps}", "train.log_interval=1",
            f"train.eval_interval={steps}", f"train.save_interval={steps}", "train.eval_batches=1",
            f"train.output_dir={output}",
        ]  # fmt: skip
        layout_env = env | {"NUM_PROCS": str(procs), "MASTER_PORT": str(free_port())}
        proc = subprocess.run(command, cwd=REPO, env=layout_env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench_train: layout {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        times = [
            tokens_per_step / r["tokens_per_s"]
            for r in rows
            if r["kind"] == "train" and r["step"] > args.warmup
        ]
        print(
            f"| {name} | {procs} | {tokens_per_step * len(times) / sum(times):,.0f} | "
            f"{statistics.median(times) * 1e3:.0f} |",
            flush=True,
        )
    print(f"load average: {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 timed steps, 1 repeat")
    parser.add_argument("--layouts", action="store_true", help="step time per parallel layout (CPU)")
    parser.add_argument(
        "--sizes", choices=["auto", "small", "large"], default="auto",
        help="small: CPU shapes; large: GPT-3 XL and BERT-large (needs an accelerator); auto: both there",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    parser.add_argument("--shards", type=Path, help="existing shards to train on (default: built here)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--repeat", type=int, default=3, help="runs per side; the fastest counts")
    parser.add_argument(
        "--ds-config", default="zero1", choices=sorted(p.stem for p in (REPO / "ds_configs").glob("*.json")),
        help="plmscale's DeepSpeed file, ds_configs/NAME.json (one rank has nothing to partition)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch threads per side (default: torch's)")
    parser.add_argument(
        "--peer-keeps-memory", action="store_true",
        help="the peers' processes set glibc's malloc as plmscale's CPU trainer does (host_memory.py)",
    )  # fmt: skip
    parser.add_argument("--profile", type=int, default=0, help="print this many of the profiler's top ops")
    parser.add_argument("--worker", choices=["plmscale", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--shapes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.warmup, args.steps, args.repeat = 1, 2, 1
    if args.shards and not (args.shards / "manifest.json").is_file():
        parser.error(f"--shards {args.shards}: no manifest.json there (a directory of shards is expected)")
    shapes = chosen_shapes(args)
    if args.dry_run:
        return dry_run(args, shapes)
    if any(shape in ACCELERATOR_SHAPES for shape in shapes) and on_cpu():
        parser.error("--sizes large needs an accelerator; DeepSpeed found none (this is the CPU)")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        shards = args.shards or build_shards(Path(tmp), args.quick)
        if args.layouts:
            layouts(args, shards, Path(tmp))
        else:
            compare(args, shards, shapes)


def dry_run(args, shapes: list[Shape]) -> None:
    """What the arguments select, and that everything this run would import is there."""
    import deepspeed
    import torch
    import transformers

    from plmscale.training.trainer import Trainer  # noqa: F401 - the import is the check

    print(f"device: {accelerator().device_name()}; torch {torch.__version__}, deepspeed {deepspeed.__version__},"
          f" transformers {transformers.__version__}")  # fmt: skip
    what = "layouts " + ", ".join(name for name, *_ in LAYOUTS) if args.layouts else "plmscale vs peers"
    print(f"would run: {what}; {args.warmup} warm-up + {args.steps} timed steps, {args.repeat} repeat(s), "
          f"ds_configs/{args.ds_config}.json, shards: {args.shards or 'built from the embedded corpus'}")  # fmt: skip
    for shape in [] if args.layouts else shapes:
        peers = ", ".join(PEER_NAMES[p] for p in PEERS[shape.kind])
        cfg = run_config(shape, Path("."), 8000, Path("."), args.warmup + args.steps, args.ds_config)
        print(
            f"  {shape.name}: {shape.micro * shape.seq} tokens per step, {cfg.train.precision}, against {peers}"
        )


if __name__ == "__main__":
    main()
