"""Held-out loss, target accuracy and CPU inference speed of a model directory.

Batches come from training's own `BatchSource`, unshuffled and seeded: every model evaluated on the same
shards with the same seed, batch shape and sequence length sees the same windows and the same masks, so a
teacher and its student are scored on exactly the same targets.
"""

from __future__ import annotations

import time
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


def full_forward(
    objective, batch: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Forward arguments without `target_mask`, so the timed pass is deployment's: logits everywhere."""
    inputs = objective.model_inputs(batch)
    return inputs, inputs.pop("target_mask", None)


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
    means); `tokens_per_s` counts input positions of forward-only passes (logits at every position, as
    in deployment) after one warm-up batch.
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

    loss_sum, targets, correct, seconds = 0.0, 0, 0, 0.0
    with torch.inference_mode():
        model(**full_forward(objective, data[0])[0])  # warm-up: first-call allocations stay out of the timing
        for batch in data:
            inputs, target_mask = full_forward(objective, batch)
            start = time.perf_counter()
            logits = model(**inputs)
            seconds += time.perf_counter() - start
            # the rows the head gives with `target_mask`, in the same order
            logits = logits.flatten(0, -2) if target_mask is None else logits[target_mask]
            batch_sum, count = objective.loss(logits, batch, model.spec)
            predicted = model.spec.gather_logits(logits).argmax(-1)
            loss_sum += float(batch_sum)
            targets += count
            correct += int((predicted == objective.targets(batch)).sum())
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
        "loss": loss_sum / max(targets, 1),
        "accuracy": correct / max(targets, 1),
        "targets": targets,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "threads": torch.get_num_threads(),
    }
