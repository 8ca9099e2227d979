"""Training speed: plmscale's real step against the Hugging Face model of the same shape, and per layout.

Side by side, in one run: plmscale's `Trainer` (built in this process's child, one rank: DeepSpeed ZeRO-1,
or ds_configs/NAME.json with --ds-config NAME, torch AdamW, clipping 1.0; fp32 on CPU, bf16 on an
accelerator) trains on real shards built from the embedded corpus; the peer is the `transformers` class of the same shape in a plain torch loop (fp32 weights,
bf16 autocast on an accelerator, AdamW fused there, clipping 1.0, random tokens, 15 % MLM labels):
`GPT2LMHeadModel` for the decoder and, for the encoder, both `MegatronBertForMaskedLM` (exactly plmscale's
trunk: pre-LN, no embedding LayerNorm, final LayerNorm, the export target, but eager attention) and
`BertForMaskedLM` (post-LN, same matmuls, SDPA attention: the faster one). Each side runs in its own
process, the sides alternate, and the best of --repeat runs counts (other work on the machine only slows).

Printed per shape: tokens/s, MFU (PaLM: 6 N + 12 L h s per token against a matmul peak measured in the
same run), peak memory (accelerator: max allocated; CPU: peak RSS of the process), plmscale's ratio to
each peer in tokens/s and in CPU time per step (the least of the repeats: on a shared machine the process's
CPU time is the steadier measure), and plmscale's step in phases (data, forward, loss, backward, optimizer, the rest) from a
separate pass that synchronizes the device around each phase. CPU shapes are small (2 cores, fp32); with
an accelerator the shapes of GPT-3 XL and BERT-large are measured too.

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
import functools
import gc
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT = "RESULT "
PEERS = {"decoder": ["gpt2"], "encoder": ["megatron_bert", "bert"]}
PEER_NAMES = {
    "gpt2": "GPT2LMHeadModel",
    "megatron_bert": "MegatronBertForMaskedLM",
    "bert": "BertForMaskedLM",
}
LR, BETAS, EPS, WEIGHT_DECAY, CLIP, MLM_PROB = 1e-4, (0.9, 0.98), 1e-8, 0.01, 1.0, 0.15


@dataclass(frozen=True)
class Shape:
    name: str
    kind: str  # encoder / decoder
    layers: int
    hidden: int
    heads: int
    seq: int
    micro: int


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


# ---------------------------------------------------------------------------------------------- data


def build_shards(root: Path, quick: bool) -> Path:
    """The embedded corpus (all of it; --quick: 0.4 MB), a SentencePiece tokenizer and its shards."""
    from data_prep.corpus import write_corpus
    from data_prep.shards import build_shards as write_shards
    from data_prep.tokenizer import train_tokenizer

    corpus = root / "corpus.jsonl"
    write_corpus(corpus, max_mb=0.4 if quick else 64)
    train_tokenizer([corpus], root / "tokenizer", vocab_size=2000 if quick else 8000)
    write_shards(
        [corpus], root / "tokenizer" / "tokenizer.model", root / "shards",
        workers=2, valid_fraction=0.05, progress=False,
    )  # fmt: skip
    return root / "shards"


def shard_vocab(shards: Path) -> int:
    return json.loads((shards / "manifest.json").read_text())["tokenizer"]["vocab_size"]


# ------------------------------------------------------------------------------------- measuring


def accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def on_cpu() -> bool:
    return accelerator().device_name() == "cpu"


def reset_peak_memory() -> None:
    if on_cpu():
        # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS.
        Path("/proc/self/clear_refs").write_text("5")
    else:
        accelerator().reset_peak_memory_stats()


def peak_memory_mib() -> float:
    if on_cpu():
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024
    return accelerator().max_memory_allocated() / 2**20


def timed_steps(step, warmup: int, steps: int) -> dict:
    """Wall and CPU (this process) seconds per step over `steps` after `warmup`; peak memory over both."""
    reset_peak_memory()
    for i in range(warmup):
        step(i)
    accelerator().synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + steps):
        step(i)
    accelerator().synchronize()
    return {
        "seconds": (time.perf_counter() - start) / steps,
        "cpu_seconds": (time.process_time() - cpu_start) / steps,
        "memory_mib": peak_memory_mib(),
    }


def matmul_peak() -> float:
    """FLOP/s of a large square matmul in the training dtype (fp32 on CPU, bf16 on an accelerator)."""
    import torch

    n, dtype = (2048, torch.float32) if on_cpu() else (8192, torch.bfloat16)
    a = torch.randn(n, n, dtype=dtype, device=accelerator().current_device_name())
    b = torch.randn_like(a)
    best = float("inf")
    for _ in range(5):
        accelerator().synchronize()
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        accelerator().synchronize()
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * n**3 / best


# --------------------------------------------------------------------------------------- plmscale


def run_config(shape: Shape, shards: Path, vocab: int, output: Path, steps: int, zero: str = "zero1"):
    from plmscale.config import RunConfig

    return RunConfig.model_validate(
        {
            "model": {
                "kind": shape.kind, "vocab_size": vocab, "hidden_size": shape.hidden,
                "num_layers": shape.layers, "num_heads": shape.heads, "max_position_embeddings": shape.seq,
                "hidden_dropout": 0.0, "attention_dropout": 0.0,
            },
            "data": {"shards": str(shards), "seq_length": shape.seq},
            "objective": {"name": "mlm" if shape.kind == "encoder" else "causal_lm"},
            "optimizer": {
                "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY, "warmup_steps": 1,
                "grad_clip": CLIP,
            },
            "train": {
                "deepspeed_config": str(REPO / "ds_configs" / f"{zero}.json"),
                "micro_batch_size": shape.micro, "global_batch_size": shape.micro, "train_steps": steps,
                "precision": "fp32" if on_cpu() else "bf16", "output_dir": str(output),
            },
        }
    )  # fmt: skip


class PhaseTimer:
    """Wraps the step's parts (on this trainer only) so that each is timed between device synchronizations."""

    PHASES = ("data", "forward", "loss", "backward", "optimizer")

    def __init__(self, trainer):
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self._wrap(trainer.train_data, "micro_batches", "data")
        self._wrap(trainer, "_to_device", "data")
        self._wrap(trainer.engine, "forward", "forward")
        self._wrap(trainer.objective, "loss_terms", "loss")
        self._wrap(trainer.engine, "backward", "backward")
        self._wrap(trainer.engine, "step", "optimizer")

    def _wrap(self, owner, attribute: str, phase: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args, **kwargs):
            accelerator().synchronize()
            start = time.perf_counter()
            result = inner(*args, **kwargs)
            accelerator().synchronize()
            self.totals[phase] += time.perf_counter() - start
            return result

        setattr(owner, attribute, timed)


def plmscale_side(shape: Shape, shards: Path, args) -> dict:
    from plmscale.plan import model_flops_per_token
    from plmscale.training.trainer import Trainer

    phase_steps = 3
    vocab = shard_vocab(shards)
    with tempfile.TemporaryDirectory() as output:
        cfg = run_config(
            shape, shards, vocab, Path(output), args.warmup + args.steps + phase_steps, args.ds_config
        )
        trainer = Trainer(cfg, 1)
        trainer.engine.train()
        result = timed_steps(trainer.train_step, args.warmup, args.steps)
        first = args.warmup + args.steps
        if args.profile:
            profile(lambda: [trainer.train_step(first + i) for i in range(phase_steps)], args.profile)
        timer = PhaseTimer(trainer)
        accelerator().synchronize()
        start = time.perf_counter()
        for i in range(first, first + phase_steps):
            trainer.train_step(i)
        accelerator().synchronize()
        whole = (time.perf_counter() - start) / phase_steps
        phases = {name: total / phase_steps for name, total in timer.totals.items()}
        phases["other"] = whole - sum(phases.values())
    return result | {"phases": phases, "flops_per_token": model_flops_per_token(cfg)}


def profile(run, rows: int) -> None:
    """torch.profiler's top operators of `run` (CPU time, and the accelerator's where there is one)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = None if on_cpu() else getattr(ProfilerActivity, accelerator().device_name().upper(), None)
    with torch_profile(activities=[ProfilerActivity.CPU] + ([device] if device else [])) as prof:
        run()
        accelerator().synchronize()
    sort = "self_device_time_total" if device else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows), file=sys.stderr)


# ------------------------------------------------------------------------------------------- peer


def peer_model(peer: str, shape: Shape, vocab: int):
    """The `transformers` model of the shape: configs as plmscale's exporter writes them (exact GELU)."""
    from transformers import BertConfig, BertForMaskedLM, GPT2LMHeadModel, MegatronBertForMaskedLM

    from plmscale.export.hf import hf_config

    config = hf_config(run_config(shape, Path("."), vocab, Path("."), steps=1).model)
    if peer == "gpt2":
        return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    if peer == "megatron_bert":  # eager attention: the class has no other
        return MegatronBertForMaskedLM(config)
    bert = BertConfig(
        **{k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type")}
    )
    return BertForMaskedLM._from_config(bert, attn_implementation="sdpa")


def peer_side(peer: str, shape: Shape, shards: Path, args) -> dict:
    """A plain torch loop: fp32 weights, bf16 autocast on an accelerator, AdamW, clipping, random tokens."""
    import torch

    from plmscale.tokenizer import MASK_ID

    vocab = shard_vocab(shards)
    device = torch.device(accelerator().current_device_name())
    model = peer_model(peer, shape, vocab).to(device).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, fused=not on_cpu())

    def step(_: int) -> None:
        input_ids = torch.randint(MASK_ID + 1, vocab, (shape.micro, shape.seq), device=device)
        if shape.kind == "encoder":
            chosen = torch.rand(input_ids.shape, device=device) < MLM_PROB
            labels = torch.where(chosen, input_ids, -100)
            input_ids = torch.where(chosen, MASK_ID, input_ids)
        else:
            labels = input_ids  # shifted inside the model
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not on_cpu()):
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss)  # a real loop logs its loss

    return timed_steps(step, args.warmup, args.steps)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(args) -> None:
    """One side (plmscale or the peers) over every shape, in this process; results on stdout."""
    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [Shape(**s) for s in json.loads(args.shapes)]
    results = {"matmul_flops": matmul_peak()} if args.worker == "plmscale" else {}
    if args.worker == "plmscale":
        # One rank in this process, as the launcher would set it up.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
    for shape in shapes:
        sides = ["plmscale"] if args.worker == "plmscale" else PEERS[shape.kind]
        results[shape.name] = {}
        for side in sides:
            run = plmscale_side if side == "plmscale" else functools.partial(peer_side, side)
            results[shape.name][side] = run(shape, args.shards, args)
            gc.collect()  # the side's model and optimizer are gone before the next one is built
            accelerator().empty_cache()
    print(RESULT + json.dumps(results), flush=True)


# ---------------------------------------------------------------------------------------- parent


def run_worker(side: str, shapes: list[Shape], shards: Path, args) -> dict:
    command = [
        sys.executable, __file__, "--worker", side, "--shards", str(shards),
        "--shapes", json.dumps([asdict(s) for s in shapes]),
        "--warmup", str(args.warmup), "--steps", str(args.steps), "--profile", str(args.profile),
        "--threads", str(args.threads), "--ds-config", args.ds_config,
    ]  # fmt: skip
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


def print_tables(best: dict, shapes: list[Shape], device: str, load: str) -> None:
    peak = best["matmul_flops"]
    print(f"\ndevice: {device}; matmul peak measured: {peak / 1e9:,.1f} GFLOP/s; load average: {load}")
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
    print_tables(best_of(runs), shapes, device, load_average())


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
