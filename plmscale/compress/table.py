"""The compression table: every model and each of its deployed variants, measured the same way.

Held-out quality and CPU speed are `plmscale eval`'s own (`plmscale.eval.evaluate`, with the variant in place
of the model: the same windows, masks and unigram baseline for all), the task metric is `plmscale finetune`'s
(each fp32 model fine-tuned, then its variants scored on dev by the same code), logit parity is measured on
the held-out targets against the fp32 model, bytes are the sizes of the variants' files. Speed ratios and the
task metric's share are against the first model's fp32 row (the teacher).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from plmscale.compress.variants import Deployment, logit_parity
from plmscale.data import BatchSource, PackedStream
from plmscale.eval.baseline import FrequencyBaseline, training_frequencies
from plmscale.eval.evaluate import SPEED_REPEATS, evaluate
from plmscale.model_dir import TOKENIZER, WEIGHTS, load_local_model, load_run_config
from plmscale.objectives import IGNORE_INDEX, get_objective
from plmscale.tokenizer import Tokenizer

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def heldout_batches(model_dir: Path, held_out: dict) -> list[dict[str, torch.Tensor]]:
    """The batches `evaluate` scores (same shards, split, seed and shape), for the parity check."""
    run_cfg = load_run_config(model_dir)
    objective = get_objective(run_cfg.objective.name, run_cfg.objective.params, run_cfg.model)
    source = BatchSource(
        PackedStream.from_manifest(str(held_out["shards_dir"]), held_out["split"]),
        objective,
        held_out["seq_length"],
        micro_batch_size=held_out["batch_size"],
        dp_size=1,
        dp_rank=0,
        seed=held_out["seed"],
        shuffle=False,
    )
    return source.micro_batches(step=0, accumulation=held_out["batches"])


def parity(reference, variant, batches: list[dict]) -> dict[str, float]:
    """`logit_parity` over all batches: the largest difference, agreement weighted by targets."""
    results = [
        (logit_parity(reference, variant, b), int((b["labels"] != IGNORE_INDEX).sum())) for b in batches
    ]
    targets = sum(n for _, n in results)
    return {
        "max_logit_difference": max(r["max_logit_difference"] for r, _ in results),
        "top1_agreement": sum(r["top1_agreement"] * n for r, n in results) / max(targets, 1),
    }


def task_scores(name: str, model_dir: Path, task, settings, out_dir: Path, variants, threads, log) -> dict:
    """Fine-tune the fp32 model with `plmscale finetune`'s code, then score each variant of the fine-tuned
    classifier on dev: variant -> dev metrics."""
    from plmscale.finetune.head import task_kind
    from plmscale.finetune.train import encode_examples, finetune, load_finetuned
    from plmscale.finetune.train import evaluate as score_dev

    finetuned = out_dir / "finetuned"
    log(f"fine-tuning {name} ({model_dir}) -> {finetuned}")
    finetune(model_dir, task, settings, finetuned, log=log)
    classifier, results = load_finetuned(finetuned)
    kind = task_kind(task.spec.kind, task.labels)
    max_length = results["settings"]["max_seq_length"]
    dev = encode_examples(Tokenizer(finetuned / TOKENIZER), task.examples["dev"], max_length)
    deployment = Deployment(classifier, finetuned / WEIGHTS, out_dir / "task", threads)
    cpu = torch.device("cpu")
    return {v: score_dev(deployment.load(v), dev, kind, settings.batch_size, cpu) for v in variants}


def measure(
    models: dict[str, str],
    variants: list[str],
    held_out: dict,
    output: Path,
    clock: str = "wall",
    task=None,
    settings=None,
    threads: int | None = None,
    log=print,
    speed_seconds: float = 0.0,
) -> list[dict]:
    """One row per model and variant (see the module docstring); speeds timed for at least `speed_seconds`
    per batch size (see `inference_speed`)."""
    first = load_run_config(next(iter(models.values())))
    baseline = FrequencyBaseline(
        training_frequencies(str(held_out["shards_dir"])), specials_are_targets=first.model.kind == "decoder"
    )
    rows = []
    for name, model_dir in models.items():
        model_dir = Path(model_dir)
        fp32, _ = load_local_model(model_dir)
        deployment = Deployment(fp32, model_dir / WEIGHTS, output / name, threads)
        batches = heldout_batches(model_dir, held_out)
        tasks = (
            task_scores(name, model_dir, task, settings, output / name, variants, threads, log)
            if task
            else {}
        )
        for variant in variants:
            log(f"measuring {name} {variant}")
            runner = deployment.load(variant)
            scores = evaluate(
                model_dir,
                **held_out,
                baseline=baseline,
                model=runner,
                clock=CLOCKS[clock],
                speed_seconds=speed_seconds,
            )
            path = deployment.file(variant)
            rows.append(
                {
                    "model": name,
                    "variant": variant,
                    "file": str(path),
                    "bytes": path.stat().st_size,
                    "parameters": sum(p.numel() for p in fp32.parameters()),
                    **{k: scores[k] for k in ("loss", "accuracy", "targets", "baseline_accuracy")},
                    **{k: v for k, v in scores.items() if k.startswith("batch")},
                    **(parity(fp32, runner, batches) if variant != "fp32" else {}),
                    **({"task": tasks[variant]} if tasks else {}),
                }
            )
    return rows


def task_metric(rows: list[dict]) -> str | None:
    """The task's main metric: accuracy, or Pearson's r for regression (the one after the loss)."""
    return list(rows[0]["task"])[1] if "task" in rows[0] else None


def format_table(rows: list[dict]) -> str:
    reference = rows[0]  # the first model's fp32 row: the teacher
    metric = task_metric(rows)
    header = ["model", "variant", "parameters", "MB", "b1 ms", "b1 x", "b32 tok/s", "b32 x", "MLM acc",
              "loss", "max |dlogit|", "top-1 agree"]  # fmt: skip
    if metric:
        header += [f"task {metric}", "/ teacher"]
    lines = []
    for r in rows:
        cells = [
            r["model"], r["variant"], f"{r['parameters']:,}", f"{r['bytes'] / 1e6:.2f}",
            f"{r['batch1_ms']:.2f}", f"{reference['batch1_ms'] / r['batch1_ms']:.2f}",
            f"{r['batch32_tokens_per_s']:,.0f}",
            f"{r['batch32_tokens_per_s'] / reference['batch32_tokens_per_s']:.2f}",
            f"{r['accuracy']:.4f}", f"{r['loss']:.4f}",
            f"{r['max_logit_difference']:.2g}" if "max_logit_difference" in r else "-",
            f"{r['top1_agreement']:.2%}" if "top1_agreement" in r else "-",
        ]  # fmt: skip
        if metric:
            ours, theirs = r["task"][metric], reference["task"][metric]
            cells += [f"{ours:.4f}", f"{ours / theirs:.1%}" if theirs else "n/a"]
        lines.append(cells)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i > 1 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *lines]
    )


def plot(rows: list[dict], path: Path) -> Path:
    """Quality against batch-32 speed (x the teacher's), one colour per model and one marker per variant:
    held-out MLM accuracy (with the unigram baseline), and the task metric when there is one."""
    metric = task_metric(rows)
    panels = [("held-out MLM accuracy", lambda r: r["accuracy"])]
    if metric:
        panels.append((f"task dev {metric}", lambda r: r["task"][metric]))
    fig = Figure(figsize=(6.5 * len(panels), 4.8), layout="constrained")
    models = list(dict.fromkeys(r["model"] for r in rows))
    markers = {"fp32": "o", "int8": "s", "onnx": "^", "onnx-int8": "D"}
    reference = rows[0]["batch32_tokens_per_s"]
    for ax, (title, value) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for r in rows:
            color = f"C{models.index(r['model'])}"
            speed = r["batch32_tokens_per_s"] / reference
            label = f"{r['model']} {r['variant']}"
            ax.scatter(speed, value(r), color=color, marker=markers[r["variant"]], s=50, label=label)
        if title.startswith("held-out"):
            ax.axhline(rows[0]["baseline_accuracy"], color="gray", linestyle=":", label="unigram baseline")
        ax.legend(fontsize=7)
        ax.set(xlabel="CPU speed at batch 32 (x the teacher's fp32)", ylabel=title, title=title)
        ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def describe(rows: list[dict], held_out: dict, clock: str, threads: int, speed_seconds: float) -> str:
    what = "CPU time of this process" if clock == "cpu" else "wall time"
    return (
        f"Held-out {held_out['split']} split: {held_out['batches']} x {held_out['batch_size']} sequences of "
        f"{held_out['seq_length']}, seed {held_out['seed']}, {rows[0]['targets']:,} targets (unigram baseline "
        f"accuracy {rows[0]['baseline_accuracy']:.4f}). Speed: forward of the trunk, best pass of "
        f"{speed_seconds:g} s, at least {SPEED_REPEATS}, {what}, {threads} thread(s); x: ratio to "
        f"{rows[0]['model']} fp32. Parity: against the same model's fp32 logits at the held-out targets."
    )


def write_json(rows: list[dict], setup: dict, path: Path) -> Path:
    path.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2, default=str) + "\n")
    return path
