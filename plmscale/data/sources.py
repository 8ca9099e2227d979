"""The samples a recipe trains (or is scored) on: one place that picks the source, so that the trainer and the
offline teacher cache (plmscale/distill/cache.py) see the same samples at the same positions."""

from __future__ import annotations

from plmscale.config import RunConfig
from plmscale.data.instances import InstanceBatchSource, InstanceSet
from plmscale.data.loader import BatchSource, SampleOrder
from plmscale.data.packed import PackedStream
from plmscale.objectives import Objective


def sample_order(
    cfg: RunConfig, objective: Objective, split: str, shuffle: bool, dp_size: int = 1, dp_rank: int = 0
) -> SampleOrder:
    """Pre-masked instances where the recipe names them for `split`, else windows of the packed shards."""
    t, data = cfg.train, cfg.data
    order = (t.micro_batch_size, dp_size, dp_rank, t.seed, shuffle)
    held_out = data.eval_instances if split == data.valid_split else None
    if held_out or (data.instances and split == data.train_split):
        instances = InstanceSet(held_out or data.instances, verify=False)  # verified before launch
        return InstanceBatchSource(instances, data.seq_length, *order, objective=objective)
    stream = PackedStream.from_manifest(data.shards, split, verify=False)
    return BatchSource(stream, objective, data.seq_length, *order)
