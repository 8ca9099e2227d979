"""Which samples go into which micro-batch: a pure function of (seed, step), so resume is exact.

Position p of the global sample order (p = step * global_batch + micro * micro_batch * dp + rank * micro_batch
+ j) maps to sample perm_epoch[p % N] with epoch = p // N; the permutation is seeded by (seed, epoch) and the
objective's randomness (masks) by (seed, p). Nothing about the order needs saving beyond the step.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from plmscale.data.packed import PackedStream
from plmscale.objectives import Objective
from plmscale.objectives.base import with_target_positions


class SampleOrder:
    """The order over `num_samples` samples; subclasses say how sample `index` is built."""

    def __init__(
        self, num_samples: int, micro_batch_size: int, dp_size: int, dp_rank: int, seed: int, shuffle: bool
    ):
        self.num_samples = num_samples
        self.micro_batch_size, self.dp_size, self.dp_rank = micro_batch_size, dp_size, dp_rank
        self.seed, self.shuffle = seed, shuffle

    @lru_cache(maxsize=2)  # noqa: B019 - one or two epochs are live at a time
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def sample(self, index: int, position: int) -> dict[str, np.ndarray]:
        """Sample `index`, seen at `position` of the global order (which seeds its randomness)."""
        raise NotImplementedError

    def example(self, position: int) -> dict[str, np.ndarray]:
        epoch, offset = divmod(position, self.num_samples)
        index = self._permutation(epoch)[offset] if self.shuffle else offset
        return self.sample(int(index), position)

    def positions(self, step: int, accumulation: int) -> list[range]:
        """The global positions of this rank's micro-batches for optimizer step `step`."""
        per_micro = self.micro_batch_size * self.dp_size
        base = step * per_micro * accumulation + self.dp_rank * self.micro_batch_size
        firsts = (base + micro * per_micro for micro in range(accumulation))
        return [range(first, first + self.micro_batch_size) for first in firsts]

    def batch(self, positions: range) -> dict[str, torch.Tensor]:
        """The examples at `positions`, with their target positions (found here, on the host: see
        `with_target_positions`)."""
        examples = [self.example(position) for position in positions]
        return with_target_positions(
            {k: torch.from_numpy(np.stack([e[k] for e in examples])) for k in examples[0]}
        )

    def micro_batches(self, step: int, accumulation: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for optimizer step `step`."""
        return [self.batch(positions) for positions in self.positions(step, accumulation)]


class BatchSource(SampleOrder):
    """Windows of a packed token stream, made into examples by the objective (masks drawn on the fly)."""

    def __init__(
        self,
        stream: PackedStream,
        objective: Objective,
        seq_length: int,
        micro_batch_size: int,
        dp_size: int,
        dp_rank: int,
        seed: int,
        shuffle: bool = True,
    ):
        self.stream, self.objective = stream, objective
        self.window_length = objective.window_length(seq_length)
        num_windows = stream.num_windows(self.window_length)
        if num_windows == 0:
            raise ValueError(
                f"the data holds {stream.total_tokens} tokens, fewer than one sample of {self.window_length}"
            )
        super().__init__(num_windows, micro_batch_size, dp_size, dp_rank, seed, shuffle)

    def sample(self, index: int, position: int) -> dict[str, np.ndarray]:
        tokens = self.stream.window(index, self.window_length)
        return self.objective.make_example(tokens, np.random.default_rng([self.seed, position]))


class Prefetched:
    """`source`'s micro-batches, the next step's built in a background thread while this one trains, so data
    is off the step's critical path. The order is untouched: a step's batches are a pure function of the step
    (a resumed run, or a step that was not the one prefetched, builds them in place). With `pin`, the tensors
    come in page-locked memory, so that the trainer's non-blocking copy to the accelerator is asynchronous."""

    def __init__(self, source: SampleOrder, last_step: int, pin: bool):
        self.source, self.last_step, self.pin = source, last_step, pin
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plmscale-data")
        self.ahead: tuple[int, int, Future] | None = None  # (step, accumulation, batches being built)

    def _build(self, step: int, accumulation: int) -> list[dict[str, torch.Tensor]]:
        batches = self.source.micro_batches(step, accumulation)
        if self.pin:
            batches = [{k: get_accelerator().pin_memory(t) for k, t in b.items()} for b in batches]
        return batches

    def micro_batches(self, step: int, accumulation: int) -> list[dict[str, torch.Tensor]]:
        ahead, self.ahead = self.ahead, None
        if ahead and ahead[:2] == (step, accumulation):
            batches = ahead[2].result()
        else:
            if ahead:
                ahead[2].cancel()
            batches = self._build(step, accumulation)
        if step + 1 < self.last_step:
            self.ahead = (step + 1, accumulation, self.worker.submit(self._build, step + 1, accumulation))
        return batches
