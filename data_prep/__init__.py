"""Offline data preparation: embedded corpus -> SentencePiece tokenizer -> megatron-core shards.

plmscale prep corpus      # stdlib docstrings -> data/corpus.jsonl (no download)
plmscale prep tokenizer   # -> data/tokenizer/tokenizer.model
plmscale prep shards      # -> data/shards/{train,valid}_NNNNN.{bin,idx} + manifest.json
"""

from plmscale.errors import UserError

__all__ = ["UserError"]
