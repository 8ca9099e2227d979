"""Training-time data: packed token streams over indexed shards and a stateless, resumable batch order."""

from plmscale.data.loader import BatchSource
from plmscale.data.packed import PackedStream

__all__ = ["BatchSource", "PackedStream"]
