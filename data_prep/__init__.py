"""Offline data preparation: embedded corpus -> SentencePiece tokenizer -> megatron-core shards.

plmscale prep corpus      # stdlib docstrings -> data/corpus.jsonl (no download)
plmscale prep tokenizer   # -> data/tokenizer/tokenizer.model
plmscale prep shards      # -> data/shards/{train,valid}_NNNNN.{bin,idx} + manifest.json
"""


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, exit code 2, no traceback."""
