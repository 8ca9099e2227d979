"""`plmscale prune`: score a model's heads, neurons and layers on training data, keep the most important to
a target size, and write a normal model directory (updated config, same tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import ValidationError

from plmscale.config import RunConfig, resolve_path
from plmscale.data import BatchSource, PackedStream
from plmscale.errors import UserError
from plmscale.eval.evaluate import check_same_tokenizer
from plmscale.model_dir import CONFIG, TOKENIZER, load_local_model, load_run_config, save_model_dir
from plmscale.objectives import get_objective
from plmscale.prune.importance import taylor_importance
from plmscale.prune.structure import Kept, most_important, prune_state, pruned_config


def target_count(option: str, value: int | float | None, available: int, per: str) -> int:
    """A count (>= 1) or a fraction in (0, 1) of `available` units, at least one; None keeps all."""
    if value is None:
        return available
    if isinstance(value, float):
        return max(1, round(value * available))
    if value > available:
        raise UserError(f"{option} {value}: the model has {available} {per}")
    return value


def undropped_layers(drop_layers: list[int], num_layers: int) -> list[int]:
    """The layers `--drop-layers` leaves."""
    outside = sorted({i for i in drop_layers if not 0 <= i < num_layers})
    if outside:
        raise UserError(f"--drop-layers {outside}: the model's layers are 0..{num_layers - 1}")
    kept = [i for i in range(num_layers) if i not in drop_layers]
    if not kept:
        raise UserError(f"--drop-layers drops all {num_layers} layers; keep at least one")
    return kept


def prune_model_dir(
    model_dir: str | Path,
    output_dir: str | Path,
    heads: int | float | None = None,
    ffn: int | float | None = None,
    layers: int | None = None,
    drop_layers: list[int] | None = None,
    shards: str | Path | None = None,
    split: str = "train",
    batches: int = 16,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """Prune `model_dir` into `output_dir`; returns what the new meta.json records."""
    if heads is None and ffn is None and layers is None and drop_layers is None:
        raise UserError("nothing to prune: give --heads, --ffn, --layers or --drop-layers")
    model_dir = Path(model_dir)
    run_cfg = load_run_config(model_dir)
    model, cfg = load_local_model(model_dir)
    if cfg.layer_groups is not None or cfg.generator_hidden_fraction is not None:
        raise UserError(
            f"{model_dir / CONFIG}: shared layers (model.layer_groups) and ELECTRA's pair of models "
            "(model.generator_hidden_fraction) are not pruned"
        )
    keep_heads = target_count("--heads", heads, cfg.num_heads, "heads per layer")
    keep_neurons = target_count("--ffn", ffn, cfg.ffn_size, "FFN neurons per layer")
    keep_layers = target_count("--layers", layers, cfg.num_layers, "layers")
    undropped = undropped_layers(drop_layers, cfg.num_layers) if drop_layers is not None else None

    shards = shards or resolve_path(run_cfg.data.shards)
    check_same_tokenizer(model_dir, shards)
    objective = get_objective(run_cfg.objective.name, run_cfg.objective.params, cfg)
    order = dict(micro_batch_size=batch_size, dp_size=1, dp_rank=0, seed=seed, shuffle=False)
    stream = PackedStream.from_manifest(str(shards), split)
    source = BatchSource(stream, objective, run_cfg.data.seq_length, **order)

    def loss(model, batch):  # the objective's terms, each a mean over its targets, as training adds them
        terms = objective.loss_terms(model(**objective.model_inputs(batch)), batch, model.spec)
        return sum(term.sum / max(term.count, 1) for term in terms.values())

    scores = taylor_importance(model, source.micro_batches(step=0, accumulation=batches), loss)
    kept_layer_list = undropped or most_important(scores.layers, keep_layers)
    kept = Kept(
        kept_layer_list,
        [most_important(scores.heads[i], keep_heads) for i in kept_layer_list],
        [most_important(scores.neurons[i], keep_neurons) for i in kept_layer_list],
    )
    new_cfg = pruned_config(cfg, kept)
    raw = run_cfg.model_dump(mode="json", exclude_none=True) | {"model": new_cfg.model_dump(mode="json")}
    raw.pop("distill", None)  # this model was pruned, not distilled (yet)
    raw["train"].pop("init_from", None)
    try:
        new_run_cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(
            f"the pruned model does not fit {model_dir / CONFIG}: {err.errors()[0]['msg']}"
        ) from None
    state = prune_state(model.state_dict(), cfg, kept)
    meta = {
        "pruned_from": str(model_dir),
        "parameters": {
            "before": sum(p.numel() for p in model.parameters()),
            "after": sum(map(torch.numel, state.values())),
        },
        "kept_layers": kept.layers,
        "kept_heads": kept.heads,
        "kept_neurons": kept.neurons,
        "importance": {
            "method": "first-order Taylor, |sum over a batch of output x gradient|, summed over batches",
            "shards": str(shards),
            "split": split,
            "batches": scores.batches,
            "batch_size": batch_size,
            "seed": seed,
            "heads": scores.heads.tolist(),
            "layers": scores.layers.tolist(),
        },
    }
    save_model_dir(output_dir, state, new_run_cfg, model_dir / TOKENIZER, meta)
    return meta
