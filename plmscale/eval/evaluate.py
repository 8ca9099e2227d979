"""Held-out loss, target accuracy and CPU inference speed of a model directory, beside the unigram-frequency
baseline on the same targets.

Batches come from training's own `BatchSource`, unshuffled and seeded: every model evaluated on the same
shards with the same seed, batch shape and sequence length sees the same windows and the same masks, so a
teacher and its student are scored on exactly the same targets.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch

from plmscale.data import BatchSource, PackedStream
from plmscale.errors import UserError
from plmscale.eval.baseline import FrequencyBaseline, training_frequencies
from plmscale.manifest import load_manifest
from plmscale.model_dir import TOKENIZER, load_local_model, load_run_config
from plmscale.objectives import get_objective
from plmscale.tokenizer import file_sha256


def check_same_tokenizer(model_dir: Path, shards_dir: str | Path) -> None:
    """Shards of another tokenizer would give a meaningless loss: refuse them."""
    manifest = load_manifest(shards_dir, verify=False)
    if manifest["tokenizer"]["sha256"] != file_sha256(model_dir / TOKENIZER):
        raise UserError(
            f"{shards_dir} was tokenized with {manifest['tokenizer']['path']}, "
            f"not with {model_dir / TOKENIZER} (sha256 differs)"
        )


def term_metrics(sums: dict, counts: dict, hits: dict) -> dict[str, float]:
    """`loss`: the sum of the terms' means, as trained; `accuracy` and `targets`: the first term's (the
    masked or next tokens); with several terms, each one's `loss/NAME` and `NAME_accuracy` too."""
    first, *others = counts
    means = {name: sums[name] / max(counts[name], 1) for name in counts}
    metrics = {"loss": sum(means.values()), "accuracy": hits[first] / max(counts[first], 1)}
    metrics["targets"] = counts[first]
    for name in others:
        metrics |= {f"loss/{name}": means[name], f"{name}_accuracy": hits[name] / max(counts[name], 1)}
    return metrics


SPEED_BATCHES = (1, 32)  # deployment's two regimes: one request's latency, a full batch's throughput
SPEED_REPEATS = 10


def inference_speed(model, inputs: torch.Tensor, repeats: int = SPEED_REPEATS) -> dict[str, float]:
    """Forward passes of the trunk (embeddings and transformer layers, no vocabulary head: a classifier never
    runs it, fill-mask and generation at a few positions only) on [1, seq] and [32, seq] held-out inputs.
    Each figure is the best of `repeats` timed passes after one warm-up, the least disturbed by whatever
    else the machine runs (timeit's rule)."""
    speed = {}
    with torch.inference_mode():
        for batch_size in SPEED_BATCHES:
            rows = inputs[torch.arange(batch_size) % inputs.shape[0]]
            model.hidden_states(rows)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                model.hidden_states(rows)
                best = min(best, time.perf_counter() - start)
            speed[f"batch{batch_size}_ms"] = best * 1000
            speed[f"batch{batch_size}_tokens_per_s"] = rows.numel() / best
    return speed


def evaluate(
    model_dir: str | Path,
    shards_dir: str | Path,
    split: str = "valid",
    batches: int = 8,
    batch_size: int = 8,
    seed: int = 1234,
    seq_length: int | None = None,
    baseline: FrequencyBaseline | None = None,
) -> dict:
    """Score the unsharded model on `batches` x `batch_size` held-out sequences.

    `loss` is the objective's loss summed over all targets / number of targets (not a mean of batch
    means), summed over its terms (SpanBERT's MLM + SBO, ELECTRA's generator MLM + weighted RTD);
    `accuracy` is the masked (or next) tokens', with `sbo_accuracy`, `rtd_accuracy` for the other terms.
    `baseline_loss` and `baseline_accuracy` are the unigram-frequency baseline's on the same targets
    (`baseline`, or counted from the shards' training split). Speeds: see `inference_speed`, of the deployed
    model (ELECTRA: the discriminator).
    `seq_length` defaults to the model's training sequence length.
    """
    model_dir = Path(model_dir)
    run_cfg = load_run_config(model_dir)
    model, cfg = load_local_model(model_dir)
    objective = get_objective(run_cfg.objective.name, run_cfg.objective.params, cfg)
    check_same_tokenizer(model_dir, shards_dir)
    seq_length = seq_length or run_cfg.data.seq_length
    stream = PackedStream.from_manifest(str(shards_dir), split)
    source = BatchSource(
        stream, objective, seq_length, batch_size, dp_size=1, dp_rank=0, seed=seed, shuffle=False
    )
    data = source.micro_batches(step=0, accumulation=batches)
    if baseline is None:
        baseline = FrequencyBaseline(
            training_frequencies(str(shards_dir)), specials_are_targets=cfg.kind == "decoder"
        )

    sums, counts, hits, baseline_sum, baseline_correct = Counter(), Counter(), Counter(), 0.0, 0
    with torch.inference_mode():
        for batch in data:
            # scored as training's evaluation scores: the objective's own inputs and loss terms
            outputs = model(**objective.model_inputs(batch))
            for name, term in objective.loss_terms(outputs, batch, model.spec, count_correct=True).items():
                sums[name] += float(term.sum)
                counts[name] += term.count
                hits[name] += term.correct
            guessed_sum, guessed = baseline.score(objective.targets(batch).flatten())
            baseline_sum += guessed_sum
            baseline_correct += guessed
    tokens = sum(batch["input_ids"].numel() for batch in data)
    first_term = next(iter(counts))  # the masked (or next) tokens, which the baseline guesses too
    return {
        "model_dir": str(model_dir),
        "kind": cfg.kind,
        "objective": objective.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "split": split,
        "seed": seed,
        "batches": batches,
        "batch_size": batch_size,
        "seq_length": seq_length,
        **term_metrics(sums, counts, hits),
        "tokens": tokens,
        "baseline_loss": baseline_sum / max(counts[first_term], 1),
        "baseline_accuracy": baseline_correct / max(counts[first_term], 1),
        "baseline_tokens": baseline.tokens,
        **inference_speed(getattr(model, "deployed", model), torch.cat([batch["input_ids"] for batch in data])),
        "threads": torch.get_num_threads(),
    }
