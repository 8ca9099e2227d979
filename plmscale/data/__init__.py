"""Training-time data: packed token streams over indexed shards, pre-masked instance sets, and a stateless,
resumable batch order over either."""

from plmscale.data.instances import InstanceBatchSource, InstanceSet
from plmscale.data.loader import BatchSource
from plmscale.data.packed import PackedStream

__all__ = ["BatchSource", "InstanceBatchSource", "InstanceSet", "PackedStream"]
