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
from plmscale.data.instances import InstanceBatchSource, InstanceSet, InstanceSetError
from plmscale.data.masking import ERNIE_LEVELS
from plmscale.errors import UserError
from plmscale.eval.baseline import FrequencyBaseline, training_frequencies
from plmscale.manifest import load_manifest
from plmscale.model_dir import TOKENIZER, load_local_model, load_run_config
from plmscale.objectives import IGNORE_INDEX, get_objective, term_metrics
from plmscale.tokenizer import file_sha256


def check_same_tokenizer(model_dir: Path, shards_dir: str | Path) -> None:
    """Shards of another tokenizer would give a meaningless loss: refuse them."""
    manifest = load_manifest(shards_dir, verify=False)
    if manifest["tokenizer"]["sha256"] != file_sha256(model_dir / TOKENIZER):
        raise UserError(
            f"{shards_dir} was tokenized with {manifest['tokenizer']['path']}, "
            f"not with {model_dir / TOKENIZER} (sha256 differs)"
        )


def check_instances(model_dir: Path, instances: InstanceSet, objective) -> None:
    """Held-out instances must share the model's tokenizer and suit its objective."""
    manifest = instances.manifest
    if manifest["tokenizer"]["sha256"] != file_sha256(model_dir / TOKENIZER):
        raise UserError(
            f"{manifest['directory']} was built with another tokenizer than {model_dir / TOKENIZER}"
        )
    if manifest.get("split") == "train":
        raise UserError(
            f"{manifest['directory']} holds instances of the train split: build held-out ones with "
            "`plmscale prep instances --split valid`"
        )
    if objective.pair_task and "pair_label" in manifest["fields"]:
        try:  # nsp pair labels do not score an SOP head, nor the reverse
            objective.check_instances(manifest, "--instances")
        except ValueError as exc:
            raise UserError(str(exc)) from None


def unit_counts(hit: torch.Tensor, unit_ids: torch.Tensor, unit_levels: torch.Tensor) -> Counter:
    """Entity and phrase units, and those whose every token was predicted right: `hit` [batch, seq] is
    True where the prediction is right (or nothing is predicted), `unit_ids` numbers each sequence's units
    from 1 (0: no unit), `unit_levels` gives each position's unit level (ERNIE_LEVELS)."""
    counts = Counter()
    in_unit = unit_ids > 0
    key = torch.arange(len(unit_ids)).unsqueeze(1) * (unit_ids.shape[1] + 1) + unit_ids  # unique per unit
    for level in (ERNIE_LEVELS.index("phrase"), ERNIE_LEVELS.index("entity")):
        at = in_unit & (unit_levels == level)
        units, wrong = key[at].unique(), key[at & ~hit].unique()
        counts[ERNIE_LEVELS[level]] += len(units)
        counts[f"{ERNIE_LEVELS[level]}_correct"] += len(units) - len(wrong)
    return counts


def unit_metrics(counts: Counter) -> dict[str, float]:
    """`unit_accuracy`: the share of masked entity and phrase units predicted whole (every token right)."""
    units, correct = counts["phrase"] + counts["entity"], counts["phrase_correct"] + counts["entity_correct"]
    metrics = {"units": units, "unit_accuracy": correct / max(units, 1)}
    for level in ("entity", "phrase"):
        metrics[f"{level}_units"] = counts[level]
        metrics[f"{level}_unit_accuracy"] = counts[f"{level}_correct"] / max(counts[level], 1)
    return metrics


def position_hits(logits: torch.Tensor, batch: dict[str, torch.Tensor], objective, spec) -> torch.Tensor:
    """[batch, seq]: True where the argmax is the label, or where there is no label."""
    hit = torch.ones(batch["labels"].shape, dtype=torch.bool)
    right = spec.gather_logits(logits).argmax(-1) == objective.targets(batch, logits)
    if right.dim() == 2:  # the head ran at every position
        return hit & (right | (batch["labels"] == IGNORE_INDEX))
    hit[batch["labels"] != IGNORE_INDEX] = right
    return hit


SPEED_BATCHES = (1, 32)  # deployment's two regimes: one request's latency, a full batch's throughput
SPEED_REPEATS = 10  # passes at least
SPEED_SECONDS = 1.0  # and for the commands' reports, as many more as fit in this time per batch size


def inference_speed(
    model, inputs: torch.Tensor, repeats: int = SPEED_REPEATS, clock=time.perf_counter, seconds: float = 0.0
) -> dict[str, float]:
    """Forward passes of the trunk (embeddings and transformer layers, no vocabulary head: a classifier never
    runs it, fill-mask and generation at a few positions only) on [1, seq] and [32, seq] held-out inputs.
    Each figure is the best of the timed passes after one warm-up, the least disturbed by whatever else the
    machine runs (timeit's rule): `repeats` of them and as many more as fit in `seconds`, so that a busy
    machine still leaves some passes undisturbed. `clock=time.process_time` counts this process's CPU
    time instead of wall time: on a machine shared with other work it is what the model itself costs."""
    speed = {}
    with torch.inference_mode():
        for batch_size in SPEED_BATCHES:
            rows = inputs[torch.arange(batch_size) % inputs.shape[0]]
            model.hidden_states(rows)
            best, passes, until = float("inf"), 0, time.perf_counter() + seconds
            while passes < repeats or time.perf_counter() < until:
                start = clock()
                model.hidden_states(rows)
                best = min(best, clock() - start)
                passes += 1
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
    instances_dir: str | Path | None = None,
    model=None,
    clock=time.perf_counter,
    speed_seconds: float = 0.0,
) -> dict:
    """Score the unsharded model on `batches` x `batch_size` held-out sequences.

    `loss` is the objective's loss summed over all targets / number of targets (not a mean of batch
    means), summed over its terms (SpanBERT's MLM + SBO, ELECTRA's generator MLM + weighted RTD);
    `accuracy` is the masked (or next) tokens', with `sbo_accuracy`, `rtd_accuracy` for the other terms
    (UniLM: `loss/MODE` and `MODE_accuracy` per attention mode).
    `baseline_loss` and `baseline_accuracy` are the unigram-frequency baseline's on the same targets
    (`baseline`, or counted from the shards' training split). Speeds: see `inference_speed` (timed for at
    least `speed_seconds` per batch size), of the deployed model (ELECTRA: the discriminator).
    `seq_length` defaults to the model's training sequence length.

    With `instances_dir` (held-out instances, `plmscale prep instances --split valid`), the batches are
    those instances, unshuffled, with their own masks: pair sets add `pair_accuracy` (NSP/SOP) for a model
    with a pair head, and ERNIE sets `unit_accuracy`, the share of entity and phrase units whose every
    token is predicted right. At most the set's instances are scored, each once.

    `model`: score this one instead of the directory's own (its int8 or ONNX variant, `plmscale compress`);
    `clock`: see `inference_speed`.
    """
    model_dir = Path(model_dir)
    run_cfg = load_run_config(model_dir)
    model, cfg = load_local_model(model_dir) if model is None else (model, run_cfg.model)
    objective = get_objective(run_cfg.objective.name, run_cfg.objective.params, cfg)
    check_same_tokenizer(model_dir, shards_dir)
    seq_length = seq_length or run_cfg.data.seq_length
    order = dict(micro_batch_size=batch_size, dp_size=1, dp_rank=0, seed=seed, shuffle=False)
    if instances_dir is None:
        source = BatchSource(
            PackedStream.from_manifest(str(shards_dir), split), objective, seq_length, **order
        )
    else:
        try:
            instances = InstanceSet(instances_dir)
            check_instances(model_dir, instances, objective)
            source = InstanceBatchSource(instances, seq_length, objective=objective, units=True, **order)
        except InstanceSetError as exc:
            raise UserError(str(exc)) from None
        split = f"instances of {instances.manifest['split']}"
        batches = min(batches, max(1, len(instances) // batch_size))
    data = source.micro_batches(step=0, accumulation=batches)
    if baseline is None:
        baseline = FrequencyBaseline(
            training_frequencies(str(shards_dir)), specials_are_targets=cfg.kind == "decoder"
        )

    sums, counts, hits, units, baseline_sum, baseline_correct = (
        Counter(),
        Counter(),
        Counter(),
        Counter(),
        0.0,
        0,
    )
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
            if "unit_ids" in batch:
                logits = outputs[0] if isinstance(outputs, tuple) else outputs
                hit = position_hits(logits, batch, objective, model.spec)
                units += unit_counts(hit, batch["unit_ids"], batch["unit_levels"])
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
        **term_metrics(sums, counts, hits, objective.breakdown_terms),
        **(unit_metrics(units) if "unit_ids" in data[0] else {}),
        "tokens": tokens,
        "baseline_loss": baseline_sum / max(counts[first_term], 1),
        "baseline_accuracy": baseline_correct / max(counts[first_term], 1),
        "baseline_tokens": baseline.tokens,
        **inference_speed(
            getattr(model, "deployed", model),
            torch.cat([batch["input_ids"] for batch in data]),
            clock=clock,
            seconds=speed_seconds,
        ),
        "threads": torch.get_num_threads(),
    }
