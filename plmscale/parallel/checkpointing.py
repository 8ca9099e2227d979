"""Activation checkpointing: a checkpointed transformer layer keeps only its input in the forward pass and
recomputes its activations in the backward pass, trading about a third more compute for memory.

Applied to every k-th layer of a model (or of a pipeline stage: layers keep their global index, so a layout
does not change which layers are checkpointed; with shared layers, `model.layer_groups`, k counts distinct
layers, and a checkpointed one is recomputed each time it runs). Recomputation replays the CPU and device
RNG states, so dropout draws the same masks and results equal those without checkpointing.
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint

from plmscale.model import TransformerLM


def _recomputed(forward):
    def run(*args):
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True)

    return run


def checkpoint_layers(model: nn.Module, every: int) -> int:
    """Checkpoints the layers whose index is a multiple of `every` (1: all; 0: none); returns how many."""
    if not every:
        return 0
    count = 0
    for trunk in (m for m in model.modules() if isinstance(m, TransformerLM)):
        for index, block in trunk.layers.items():
            if int(index) % every == 0:
                block.forward = _recomputed(block.forward)
                count += 1
    return count
