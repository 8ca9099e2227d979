"""The BERT family at equal compute: BERT, RoBERTa, ALBERT, SpanBERT and ELECTRA trained on the same shards
for the same number of training FLOPs, then scored on the same held-out text.

Each model is its own recipe (launch/recipes/{bert_tiny_demo,roberta_tiny,albert_tiny,spanbert_tiny,
electra_tiny}.yaml: objective, masking, LayerNorm placement, factorized and shared layers, the generator)
brought to one common shape and schedule by overrides: 4 x 128, 4 heads, 32-token windows, batch 64, init_std
0.08, lr 2e-3 with 50 warm-up steps, no dropout, and one masking rate (--mask-prob, the papers' 15 %) for
every objective: the demo's measured choices for this corpus (see launch/recipes/bert_tiny_demo.yaml).
Training is `launch/train.sh` (one process by default, NUM_PROCS=--procs), scoring `plmscale eval`.

Compute is training FLOPs, forward + backward = 3 x forward, a multiply-add 2 FLOPs, counted from the model
shapes: every transformer layer at every position (6 N per token plus attention's 12 L h s, PaLM's count),
ALBERT's embedding projection, the heads where they run (the MLM head at the expected masked positions,
mask_prob x (seq - 2); ELECTRA's replaced-token head at every position; SpanBERT's boundary head at the masked
ones; the pair head per sequence), and ELECTRA's generator (its layers at every position, its head at the
masked ones). BERT trains --steps steps; every other model the number of steps that spends the same FLOPs.

Held-out (`plmscale eval`, the shards' valid split, 32 batches of 8 windows): masked-token accuracy of the
MLM head (ELECTRA: its generator's), each on its own objective's masks (SpanBERT's spans, ELECTRA's
85 % [MASK] / 15 % kept), beside the frequency baseline of the same targets; SpanBERT's boundary-head
accuracy; ELECTRA's replaced-token-detection accuracy; ALBERT's sentence-order accuracy on valid-split SOP
pairs. ALBERT trains from n-gram-masked SOP instances built here (`plmscale prep instances`).

    python benchmarks/bench_family.py                          # ~15 min on 2 CPU cores (BERT: 600 steps)
    python benchmarks/bench_family.py --steps 20               # a quick pass
    python benchmarks/bench_family.py --dry-run                # the plan: steps and FLOPs of each, no run
    python benchmarks/bench_family.py --data runs/demo/data --keep /tmp/family   # the demo's shards
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SEQ, BATCH, WARMUP = 32, 64, 50
EVAL = ["--batches", "32", "--batch-size", "8"]  # the demo's held-out text: ~8 windows of 128, 32 of 32


@dataclass(frozen=True)
class Member:
    name: str
    recipe: str
    word_starts: bool = False  # its masking reads word starts from the tokenizer


FAMILY = [
    Member("BERT", "bert_tiny_demo"),
    Member("RoBERTa", "roberta_tiny"),
    Member("ALBERT", "albert_tiny"),
    Member("SpanBERT", "spanbert_tiny", word_starts=True),
    Member("ELECTRA", "electra_tiny"),
]


# ------------------------------------------------------------------------------------------- compute


def layer_flops(model, seq: int) -> float:
    """Forward FLOPs of the transformer layers per position: 2 per weight applied, 4 s h for attention."""
    return 2 * model.non_embedding_params() + 4 * model.num_layers * model.hidden_size * seq


def forward_flops_per_sequence(cfg, mask_prob: float) -> float:
    """Forward FLOPs of one training sequence of `cfg` (see the module docstring for what is counted)."""
    m, seq = cfg.model, cfg.data.seq_length
    h, e, vocab = m.hidden_size, m.embed_size, m.padded_vocab_size
    masked = mask_prob * (seq - 2)
    flops = seq * layer_flops(m, seq)
    if m.embedding_size is not None:
        flops += seq * 2 * e * h
    if m.generator_hidden_fraction is not None:
        gen = m.generator_config()
        g = gen.hidden_size
        flops += seq * (2 * h * g * (g != h) + layer_flops(gen, seq))
        flops += masked * (2 * g * h + 2 * h * vocab)  # the generator's head
        flops += seq * (2 * h * h + 2 * h)  # the replaced-token head
    else:
        flops += masked * (2 * h * e + 2 * e * vocab)  # the MLM head
    if m.span_boundary_head:
        flops += masked * (2 * 3 * h * h + 2 * h * h + 2 * h * vocab)
    if m.pair_head:
        flops += 2 * h * h + 4 * h
    return flops


def train_flops_per_step(cfg, mask_prob: float) -> float:
    return 3 * forward_flops_per_sequence(cfg, mask_prob) * cfg.train.global_batch_size


# ------------------------------------------------------------------------------------------ the plan


def overrides(member: Member, data: Path, out: Path, steps: int, mask_prob: float) -> list[str]:
    common = [
        f"data.shards={data / 'shards'}", f"data.seq_length={SEQ}", f"model.max_position_embeddings={SEQ}",
        "model.init_std=0.08", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
        "optimizer.lr=2.0e-3", f"optimizer.warmup_steps={min(WARMUP, steps)}",
        f"train.micro_batch_size={BATCH}", f"train.global_batch_size={BATCH}", f"train.train_steps={steps}",
        f"train.output_dir={out / member.name.lower()}", "train.log_interval=10",
        f"train.eval_interval={steps}", "train.eval_batches=1", f"train.save_interval={steps}",
        f"objective.params.mask_prob={mask_prob}",  # ALBERT's training masks are its instances'
    ]  # fmt: skip
    if member.name == "ALBERT":
        common.append(f"data.instances={data / 'sop'}")
    if member.word_starts:
        common.append(f"objective.params.tokenizer={data / 'tokenizer' / 'tokenizer.model'}")
    return common


def plan(data: Path, out: Path, bert_steps: int, mask_prob: float) -> list[dict]:
    """Each member's overrides, steps and FLOPs: BERT's FLOPs for `bert_steps`, the others' steps to match."""
    from plmscale.config import load_config

    def config(member: Member, steps: int):
        recipe = REPO / "launch" / "recipes" / f"{member.recipe}.yaml"
        return load_config(recipe, overrides(member, data, out, steps, mask_prob))

    budget = bert_steps * train_flops_per_step(config(FAMILY[0], bert_steps), mask_prob)
    rows = []
    for member in FAMILY:
        per_step = train_flops_per_step(config(member, bert_steps), mask_prob)
        steps = max(1, round(budget / per_step))
        rows.append(
            {
                "member": member,
                "steps": steps,
                "flops_per_step": per_step,
                "flops": steps * per_step,
                "overrides": overrides(member, data, out, steps, mask_prob),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------- running


def plmscale(*args: str, cwd: Path) -> None:
    run([str(BIN / "plmscale"), *args], cwd)


def run(command: list[str], cwd: Path, env: dict | None = None) -> None:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{tail}")


def prepare_data(data: Path, mask_prob: float) -> None:
    """The demo's corpus, tokenizer and shards (launch/demo.sh's first three commands) unless `data` has
    them; ALBERT's n-gram-masked SOP instances of 32 tokens, for training and held out."""
    if not (data / "shards" / "manifest.json").is_file():
        plmscale("prep", "corpus", "--out", str(data / "corpus.jsonl"), cwd=REPO)
        plmscale("prep", "tokenizer", "--input", str(data / "corpus.jsonl"), "--vocab-size", "500",
                 "--out", str(data / "tokenizer"), cwd=REPO)  # fmt: skip
        plmscale("prep", "shards", "--input", str(data / "corpus.jsonl"), "--tokenizer",
                 str(data / "tokenizer" / "tokenizer.model"), "--workers", "2", "--valid-fraction", "0.05",
                 "--out", str(data / "shards"), cwd=REPO)  # fmt: skip
    sop = ["prep", "instances", "--shards", str(data / "shards"), "--objective", "sop", "--param",
           "masking=ngram", "--param", f"max_seq_length={SEQ}", "--param", f"mask_prob={mask_prob}",
           "--workers", "2", "--no-progress"]  # fmt: skip
    # two maskings of each document: ~830 steps of 64 before an instance repeats
    plmscale(*sop, "--dupe-factor", "2", "--out", str(data / "sop"), cwd=REPO)
    plmscale(*sop, "--split", "valid", "--out", str(data / "sop_valid"), cwd=REPO)


def train(row: dict, procs: int, threads: int) -> float:
    """`launch/train.sh` with the row's overrides; its wall-clock seconds."""
    env = os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "NUM_PROCS": str(procs),
        "MASTER_PORT": os.environ.get("MASTER_PORT", "29661"),
        "OMP_NUM_THREADS": str(threads),
    }
    recipe = REPO / "launch" / "recipes" / f"{row['member'].recipe}.yaml"
    start = time.perf_counter()
    run(["bash", str(REPO / "launch" / "train.sh"), str(recipe), *row["overrides"]], REPO, env)
    return time.perf_counter() - start


def evaluate(model: Path, data: Path, work: Path, threads: int, instances: Path | None = None) -> dict:
    out = work / f"eval_{model.parent.name}{'_pairs' if instances else ''}.json"
    extra = ["--instances", str(instances)] if instances else []
    plmscale("eval", "--teacher", str(model), "--shards", str(data / "shards"), *EVAL, *extra,
             "--threads", str(threads), "--json", str(out), cwd=REPO)  # fmt: skip
    return json.loads(out.read_text())["teacher"]


def tokens_per_second(run_dir: Path) -> float:
    """The median of the training log's windows (each `log_interval` steps), the first one left out: it
    holds the start-up (first batches, warm caches)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [row["tokens_per_s"] for row in rows if row["kind"] == "train"]
    return statistics.median(speeds[1:] or speeds)


# ---------------------------------------------------------------------------------------------- report


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def print_plan(rows: list[dict]) -> None:
    print("| model | recipe | steps | GFLOP/step | total TFLOP | x BERT's step |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['member'].name} | {row['member'].recipe} | {row['steps']} | "
            f"{row['flops_per_step'] / 1e9:,.1f} | {row['flops'] / 1e12:,.2f} | "
            f"{row['flops_per_step'] / rows[0]['flops_per_step']:.2f} |"
        )


def print_results(rows: list[dict]) -> None:
    print(
        "\n| model | params | steps | TFLOP | tokens/s | train s | MLM acc | baseline | SBO acc | RTD acc "
        "| SOP acc |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        held = row["eval"]
        print(
            f"| {row['member'].name} | {held['parameters']:,} | {row['steps']} | {row['flops'] / 1e12:,.2f} | "
            f"{row['tokens_per_s']:,.0f} | {row['seconds']:.0f} | {percent(held['accuracy'])} | "
            f"{percent(held['baseline_accuracy'])} | {percent(held.get('sbo_accuracy'))} | "
            f"{percent(held.get('rtd_accuracy'))} | {percent(row.get('pair_accuracy'))} |"
        )
    print(
        "\nMLM acc: held-out masked tokens (ELECTRA: its generator's), each on its objective's own masks; "
        "baseline: the unigram-frequency guess of the same targets. RTD acc: ELECTRA's discriminator over "
        "every held-out position (most are original: compare with always answering 'original'). ELECTRA's "
        "masks keep 15 % of the chosen tokens (BERT's 10 %), which its generator then gets right by copying. "
        "params: all weights (ELECTRA: both models). tokens/s: as the machine's load allowed."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=600, help="BERT's training steps; the others match its FLOPs"
    )
    parser.add_argument("--mask-prob", type=float, default=0.15, help="every objective's masking rate")
    parser.add_argument(
        "--data", type=Path, help="a directory with the demo's tokenizer/ and shards/ (reused)"
    )
    parser.add_argument(
        "--keep", type=Path, help="work (instances, runs, evaluations, results.json) in this directory"
    )
    parser.add_argument("--procs", type=int, default=1, help="training processes per run (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (steps, FLOPs) and stop")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if not 0 < args.mask_prob < 1:
        parser.error("--mask-prob must lie in (0, 1)")
    if args.data and not (args.data / "shards" / "manifest.json").is_file():
        parser.error(f"--data {args.data}: no shards/manifest.json there (launch/demo.sh's data directory)")

    with tempfile.TemporaryDirectory(prefix="bench_family_") as scratch:
        work = (args.keep or Path(scratch)).resolve()
        data = args.data.resolve() if args.data else work / "data"
        if args.data:  # instances go to the work directory, not into the given data directory
            (work / "data").mkdir(parents=True, exist_ok=True)
            for name in ("shards", "tokenizer"):
                link = work / "data" / name
                if not link.exists():
                    link.symlink_to(data / name)
            data = work / "data"
        rows = plan(data, work / "runs", args.steps, args.mask_prob)
        print_plan(rows)
        if args.dry_run:
            return
        data.mkdir(parents=True, exist_ok=True)
        prepare_data(data, args.mask_prob)
        for row in rows:
            name = row["member"].name
            print(f"training {name}: {row['steps']} steps", file=sys.stderr, flush=True)
            shutil.rmtree(
                work / "runs" / name.lower(), ignore_errors=True
            )  # a measured run, not a resumed one
            row["seconds"] = train(row, args.procs, args.threads)
            run_dir = work / "runs" / name.lower()
            row["tokens_per_s"] = tokens_per_second(run_dir)
            row["eval"] = evaluate(run_dir / "model", data, work, args.threads)
            if name == "ALBERT":
                pairs = evaluate(run_dir / "model", data, work, args.threads, data / "sop_valid")
                row["pair_accuracy"] = pairs["pair_accuracy"]
            print(
                f"{name}: {row['seconds']:.0f} s, held-out accuracy {percent(row['eval']['accuracy'])}",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            done = [r | {"member": r["member"].name} for r in rows if "eval" in r]
            (work / "results.json").write_text(json.dumps(done, indent=2) + "\n")
        print_results(rows)


if __name__ == "__main__":
    main()
