"""The divergence guard: a non-finite loss or gradient norm skips the update or stops the run.

DeepSpeed's optimizers already refuse a step whose global gradient norm is not finite (ZeRO 1-3, and the
bf16 wrappers it puts around a ZeRO-0 optimizer): they set `overflow`, leave parameters, optimizer state
and the LR schedule untouched, and the engine counts the step in `skipped_steps`. ZeRO-0 in fp32 steps the
bare torch optimizer, which applies a NaN gradient and reports no norm; `GuardedAdamW` gives it the same
protocol. `DivergenceGuard` then applies `train.on_nonfinite` after each step, reading only the engine, so
it holds wherever the step runs (Trainer.train_step, or inside DeepSpeed's pipeline engine).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch
from deepspeed.runtime.constants import PIPE_REPLICATED
from deepspeed.runtime.utils import (
    clip_tensors_by_global_norm,
    get_global_norm_of_tensors,
    is_invalid_grad_norm,
    is_model_parallel_parameter,
)
from deepspeed.runtime.zero.utils import get_norm_dtype
from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank

from plmscale.config import RunConfig, TrainConfig


class TrainingDiverged(RuntimeError):
    """The run stopped on a non-finite loss or gradient norm. Every rank raises it at the same step: the
    loss is all-reduced and the optimizer's overflow verdict is global, so no rank is left waiting."""


class GuardedAdamW(torch.optim.AdamW):
    """torch's AdamW speaking DeepSpeed's optimizer protocol, as ZeRO's optimizers do: `_global_grad_norm`
    is the norm before clipping over the whole model (a tensor-parallel shard counted once per shard, a
    replicated or pipeline-tied weight once), and `overflow` says it was not finite, in which case neither
    the parameters nor the optimizer state are touched (the engine then skips the LR schedule too)."""

    def __init__(self, params, mpu, max_norm: float, **adamw):
        super().__init__(params, **adamw)
        self.mpu = mpu
        self.max_norm = max_norm
        self.overflow = False
        self._global_grad_norm = None

    def _grads(self, for_norm: bool) -> list[torch.Tensor]:
        """All gradients (clipping scales each copy), or those that count once in the norm: the same
        filter as DeepSpeed's BF16_Optimizer.get_grads_for_norm."""
        tp_rank = bwc_tensor_model_parallel_rank(self.mpu)
        grads = []
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if for_norm and getattr(param, PIPE_REPLICATED, False):
                    continue
                if for_norm and tp_rank > 0 and not is_model_parallel_parameter(param):
                    continue
                grads.append(param.grad)
        return grads

    @torch.no_grad()
    def step(self, closure=None):
        # The global norm is the norm of the per-tensor norms. Taken in fp64 as ZeRO does (get_norm_dtype):
        # get_global_norm_of_tensors alone works in fp32, ~1e-6 off on a small model already.
        norms = [torch.linalg.vector_norm(g, dtype=get_norm_dtype()) for g in self._grads(for_norm=True)]
        norm = get_global_norm_of_tensors(norms, mpu=self.mpu)
        self.overflow = is_invalid_grad_norm(norm)  # DeepSpeed's helper masks inf / NaN as -1
        if self.overflow:
            self._global_grad_norm = float("inf")  # what ZeRO 1-3 report for a skipped step
            return None
        self._global_grad_norm = norm
        if self.max_norm > 0:
            clip_tensors_by_global_norm(self._grads(for_norm=False), self.max_norm, global_norm=norm)
        return super().step(closure)


def guarded_optimizer(cfg: RunConfig, param_groups: list[dict], mpu) -> GuardedAdamW | None:
    """The optimizer plmscale passes to deepspeed.initialize, or None where DeepSpeed builds its own from
    the JSON (see RunConfig.guarded_optimizer; the JSON then has no optimizer and no clipping)."""
    if not cfg.guarded_optimizer:
        return None
    o = cfg.optimizer
    return GuardedAdamW(
        param_groups, mpu, o.grad_clip, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
        fused=True,  # as DeepSpeed's torch AdamW (RunConfig.deepspeed_config)
    )  # fmt: skip


def nonfinite_to_nan(loss: torch.Tensor) -> torch.Tensor:
    """`loss` unchanged (times exactly 1) if finite, else times NaN: a non-finite loss whose gradients
    would still be finite (an overflowing sum, say) then fails the optimizer's check like any other."""
    finite = torch.isfinite(loss.detach())
    return loss * torch.where(finite, 1.0, math.nan).to(loss.dtype)


class DivergenceGuard:
    """Applies train.on_nonfinite after each optimizer step: `stop` raises TrainingDiverged at the first
    skipped step, `skip` after `max_skipped_steps` consecutive ones; DeepSpeed has already skipped the
    update itself. A step counts as skipped when the engine did not apply it (its gradient norm was not
    finite; a non-finite loss makes it so, see nonfinite_to_nan).

    With train.loss_spike_factor, a finite loss above that factor times the median of the last
    loss_spike_window healthy steps stops the run under either policy: the loss measures the weights that
    earlier updates made, so there is nothing left to skip, and no checkpoint of them is written."""

    def __init__(self, train: TrainConfig, engine):
        self.train = train
        self.engine = engine
        self.consecutive = 0
        self.recent_losses = deque(maxlen=train.loss_spike_window)

    @property
    def skipping(self) -> bool:
        """The latest step was skipped: the run may be diverging, so no checkpoint is written now (one
        would rotate away a good one)."""
        return self.consecutive > 0

    def check(self, step: int, loss: float) -> dict[str, float]:
        """After optimizer step `step` (counted from 1), whose global loss is `loss`: raises or returns the
        metrics to log."""
        applied = self.engine.was_step_applied()
        what = f"training diverged at step {step}: loss {loss:.4g}"
        if applied and math.isfinite(loss):
            self._check_spike(what, loss)
            self.consecutive = 0
            self.recent_losses.append(loss)
            return {"skipped_steps": self.engine.skipped_steps}
        what += f", gradient norm {_as_float(self.engine.get_global_grad_norm()):.4g}"
        if applied:  # only if the loss never reached a backward (see nonfinite_to_nan): nothing to skip
            raise TrainingDiverged(f"{what}, and the update was applied")
        self.consecutive += 1
        if self.train.on_nonfinite == "stop":
            raise TrainingDiverged(f"{what}; update skipped, run stopped (train.on_nonfinite=stop)")
        if self.consecutive >= self.train.max_skipped_steps:
            raise TrainingDiverged(
                f"{what}; {self.consecutive} consecutive updates skipped "
                f"(train.max_skipped_steps={self.train.max_skipped_steps})"
            )
        return {"skipped_steps": self.engine.skipped_steps}

    def _check_spike(self, what: str, loss: float) -> None:
        factor = self.train.loss_spike_factor
        if factor is None or not self.recent_losses:
            return
        median = statistics.median(self.recent_losses)
        if loss > factor * median:
            raise TrainingDiverged(
                f"{what} is above {factor:g} x {median:.4g}, the median of the last "
                f"{len(self.recent_losses)} steps (train.loss_spike_factor)"
            )


def _as_float(norm) -> float:
    return math.nan if norm is None else float(norm)
