"""Run on 2 processes (TP=2): for each ZeRO stage, the real Trainer takes healthy steps, then a step whose
loss is +inf on one rank only (its gradients would stay finite), then a healthy step again; reports what
changed across the skipped step.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/guard_skip.py RECIPE OUT.json
"""

import copy
import json
import math
import sys

import torch
import torch.distributed as dist

from plmscale.config import load_config
from plmscale.parallel.distributed import world_size_from_env
from plmscale.parallel.state_dict import full_state_dict
from plmscale.training.guard import DivergenceGuard, TrainingDiverged
from plmscale.training.trainer import Trainer

LAYOUTS = [("zero0.json", "fp32"), ("zero1.json", "fp32"), ("zero2.json", "fp32"), ("zero3.json", "fp32"),
           ("zero0.json", "bf16"), ("zero1_fp32_grads.json", "bf16")]  # fmt: skip


def tensors(tree, prefix=""):
    """The tensor leaves of a (nested) state dict, by path."""
    if torch.is_tensor(tree):
        return {prefix: tree}
    items = (
        tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else ()
    )
    return {path: t for key, value in items for path, t in tensors(value, f"{prefix}/{key}").items()}


def snapshot(trainer: Trainer) -> dict:
    return {
        "params": full_state_dict(trainer.model),
        "optimizer": {
            k: t.detach().clone() for k, t in tensors(trainer.engine.optimizer.state_dict()).items()
        },
        "scheduler": copy.deepcopy(trainer.scheduler.state_dict()),
    }


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def full_grad_norm(trainer: Trainer) -> list[float]:
    """Wraps the optimizer's step to record the norm of the unsharded gradients it is given."""
    norms, step = [], trainer.engine.optimizer.step

    def recording_step(*args, **kwargs):
        grads = full_state_dict(trainer.model, grads=True)
        norms.append(math.sqrt(sum(g.double().pow(2).sum().item() for g in grads.values())))
        return step(*args, **kwargs)

    trainer.engine.optimizer.step = recording_step
    return norms


def check(recipe: str, ds_file: str, precision: str) -> dict:
    overrides = [f"train.deepspeed_config=ds_configs/{ds_file}", f"train.precision={precision}"]
    cfg = load_config(recipe, overrides)
    trainer = Trainer(cfg, world_size_from_env())
    reference_norms = full_grad_norm(trainer) if cfg.guarded_optimizer else None
    poison = [False]
    train_terms = trainer.totals.terms  # the loss terms of every micro-batch

    def terms_with_infinite_loss(outputs, batch, count_correct):
        terms = train_terms(outputs, batch, count_correct)
        if poison[0] and dist.get_rank() == 1:  # + inf: the loss is not finite, its gradients are
            terms = {name: term._replace(sum=term.sum + math.inf) for name, term in terms.items()}
        return terms

    trainer.totals.terms = terms_with_infinite_loss
    engine = trainer.engine
    trainer.train_step(0)
    first_norm = float(engine.get_global_grad_norm())
    trainer.train_step(1)  # warm-up: DeepSpeed's schedule gives the first two steps lr 0
    lr = trainer.scheduler.get_last_lr()[0]
    before = snapshot(trainer)
    poison[0] = True
    stats = trainer.train_step(2)
    poison[0] = False
    skipped = {"applied": engine.was_step_applied(), "skipped_steps": engine.skipped_steps}
    policy = {"on_nonfinite": "skip", "loss_spike_factor": 3.0}
    skip_guard = DivergenceGuard(cfg.train.model_copy(update=policy), engine)
    skipped["skip_metrics"] = skip_guard.check(3, stats["loss"])
    try:
        DivergenceGuard(cfg.train, engine).check(3, stats["loss"])  # the default policy: stop
    except TrainingDiverged as err:
        skipped["stop_message"] = str(err)
    after = snapshot(trainer)
    healthy_loss = trainer.train_step(3)["loss"]
    skip_guard.check(4, healthy_loss)
    try:  # the same engine state, as if a later step had had this loss
        skip_guard.check(5, 3.1 * healthy_loss)
    except TrainingDiverged as err:
        skipped["spike_message"] = str(err)
    skipped["below_spike_metrics"] = skip_guard.check(5, 2.9 * healthy_loss)
    return {
        "first_norm": first_norm,
        "reference_norm": reference_norms[0] if reference_norms else None,
        "lr_of_poisoned_step": lr,
        "loss_of_poisoned_step": stats["loss"],
        "grad_norm_of_poisoned_step": stats["grad_norm"],
        **skipped,
        "params_unchanged": bitwise_equal(before["params"], after["params"]),
        "optimizer_unchanged": bitwise_equal(before["optimizer"], after["optimizer"]),
        "optimizer_tensors": len(after["optimizer"]),
        "scheduler_unchanged": before["scheduler"] == after["scheduler"],
        "next_step_applied": engine.was_step_applied(),
        "next_step_changed_params": not bitwise_equal(after["params"], full_state_dict(trainer.model)),
        "consecutive_after_next": skip_guard.consecutive,
        "healthy_loss": healthy_loss,
    }


if __name__ == "__main__":
    recipe, out = sys.argv[1:]
    report = {}
    for ds_file, precision in LAYOUTS:
        result = check(recipe, ds_file, precision)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, result)
        report[f"{ds_file[:-5]}-{precision}"] = per_rank
    if dist.get_rank() == 0:
        with open(out, "w") as handle:
            json.dump(report, handle, indent=1)
