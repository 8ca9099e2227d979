"""How much the loss leans on each attention head, FFN neuron and layer: first-order Taylor importance.

Gate a unit's output with a scalar xi (1 in the model as trained); removing the unit sets xi to 0, and to
first order the loss changes by dL/dxi = sum over the batch's positions of (the unit's output x the loss's
gradient with respect to it). The importance of a unit is |dL/dxi| summed over batches (Michel et
al. 2019, "Are Sixteen Heads Really Better than One?", for heads; Molchanov et al. 2017 for neurons): a
unit whose removal would move the loss either way scores high. The "outputs" are a head's context vector
(its slice of the output projection's input), a neuron's activation (the FFN output projection's input)
and a layer's residual update (its output minus its input: dropping a layer makes it the identity).
Gradients only are read; the weights are not changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from plmscale.model import TransformerLM


@dataclass
class Importance:
    """Scores summed over `batches` batches: heads [layers, heads], neurons [layers, ffn],
    layers [layers]."""

    heads: torch.Tensor
    neurons: torch.Tensor
    layers: torch.Tensor
    batches: int


def taylor_importance(
    model: TransformerLM,
    batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: Callable[[TransformerLM, dict[str, torch.Tensor]], torch.Tensor],
) -> Importance:
    """|sum over each batch of output x gradient| of every head, neuron and layer, summed over `batches`;
    `loss_fn(model, batch)` is the scalar loss whose gradients are read. Dropout is off (eval mode)."""
    cfg = model.cfg
    n, heads, d = cfg.num_layers, cfg.num_heads, cfg.head_dim
    scores = Importance(torch.zeros(n, heads), torch.zeros(n, cfg.ffn_size), torch.zeros(n), 0)

    def on_backward(output: torch.Tensor, add: Callable[[torch.Tensor], None]) -> None:
        kept = output.detach()
        output.register_hook(lambda grad: add((kept * grad).float()))

    def head_outputs(i: int):
        def add(product: torch.Tensor) -> None:
            scores.heads[i] += product.view(*product.shape[:-1], heads, d).sum((0, 1, 3)).abs().cpu()

        return lambda module, args: on_backward(args[0], add)

    def neuron_outputs(i: int):
        def add(product: torch.Tensor) -> None:
            scores.neurons[i] += product.sum((0, 1)).abs().cpu()

        return lambda module, args: on_backward(args[0], add)

    def layer_update(i: int):
        def add(product: torch.Tensor) -> None:
            scores.layers[i] += product.sum().abs().cpu()

        def hook(module, args, output):
            update = (output - args[0]).detach()
            output.register_hook(lambda grad: add((update * grad).float()))

        return hook

    handles = []
    for i in range(n):
        block = model.layers[str(i)]
        handles += [
            block.attn.proj.register_forward_pre_hook(head_outputs(i)),
            block.mlp.fc_out.register_forward_pre_hook(neuron_outputs(i)),
            block.register_forward_hook(layer_update(i)),
        ]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            loss_fn(model, batch).backward()
            model.zero_grad(set_to_none=True)
            scores.batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return scores
