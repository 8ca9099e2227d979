"""The two sides that benchmarks/bench_train.py measures, each run in a worker process of its own:
plmscale's real step (its `Trainer`, one rank) and the `transformers` model of the same shape in a plain torch
loop; the shards they train on, and how a step is timed (wall and process CPU time, peak memory, and
plmscale's phases between device synchronizations)."""

from __future__ import annotations

import functools
import gc
import json
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
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
    if args.worker == "peer" and args.peer_keeps_memory and on_cpu():
        from plmscale.training.host_memory import keep_freed_memory

        keep_freed_memory()
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
