"""Held-out loss, target accuracy and CPU inference speed of a model directory.

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


DEPLOYED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def deployed_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward arguments of the timed pass, deployment's: token ids in, logits at every position out."""
    return {key: batch[key] for key in DEPLOYED_INPUTS if key in batch}


def term_metrics(sums: dict, counts: dict, hits: dict, breakdown: tuple = ()) -> dict[str, float]:
    """`loss`: the sum of the terms' means, as trained; `accuracy` and `targets`: the first term's (the
    masked or next tokens); with several terms, each one's `loss/NAME` and `NAME_accuracy` too, the
    `breakdown` terms (UniLM's modes) where they have targets, and not added into `loss`."""
    first, *others = [name for name in counts if name not in breakdown]
    means = {name: sums[name] / max(counts[name], 1) for name in counts}
    metrics = {"loss": sum(means[name] for name in (first, *others))}
    metrics |= {"accuracy": hits[first] / max(counts[first], 1), "targets": counts[first]}
    for name in [*others, *(name for name in breakdown if counts[name])]:
        metrics |= {f"loss/{name}": means[name], f"{name}_accuracy": hits[name] / max(counts[name], 1)}
    return metrics


def evaluate(
    model_dir: str | Path,
    shards_dir: str | Path,
    split: str = "valid",
    batches: int = 8,
    batch_size: int = 8,
    seed: int = 1234,
    seq_length: int | None = None,
) -> dict:
    """Score the unsharded model on `batches` x `batch_size` held-out sequences.

    `loss` is the objective's loss summed over all targets / number of targets (not a mean of batch
    means), summed over its terms (SpanBERT's MLM + SBO, ELECTRA's generator MLM + weighted RTD);
    `accuracy` is the masked (or next) tokens', with `sbo_accuracy`, `rtd_accuracy` for the other terms
    (UniLM: `loss/MODE` and `MODE_accuracy` per attention mode).
    `tokens_per_s` counts input positions of forward-only passes (logits at every position, as in
    deployment; ELECTRA's discriminator) after one warm-up batch.
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

    sums, counts, hits, seconds = Counter(), Counter(), Counter(), 0.0
    deployed = getattr(model, "deployed", model)  # ELECTRA: the discriminator
    with torch.inference_mode():
        deployed(**deployed_inputs(data[0]))  # warm-up: first-call allocations stay out of the timing
        for batch in data:
            start = time.perf_counter()
            deployed(**deployed_inputs(batch))
            seconds += time.perf_counter() - start
            # scored as training's evaluation scores: the objective's own inputs and loss terms
            outputs = model(**objective.model_inputs(batch))
            for name, term in objective.loss_terms(outputs, batch, model.spec, count_correct=True).items():
                sums[name] += float(term.sum)
                counts[name] += term.count
                hits[name] += term.correct
    tokens = sum(batch["input_ids"].numel() for batch in data)
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
        **term_metrics(sums, counts, hits, objective.breakdown_terms),
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "threads": torch.get_num_threads(),
    }
