"""Run on 2 processes: a TP=2 model's forward and backward against the unsharded reference.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/tp_equivalence.py OUT.json
"""

import json
import sys

import torch

from plmscale.config import ModelConfig
from plmscale.model import TransformerLM
from plmscale.objectives import IGNORE_INDEX, get_objective
from plmscale.parallel.distributed import init_distributed
from plmscale.parallel.state_dict import full_state_dict, load_full_state_dict
from plmscale.parallel.tensor_parallel import build_parallel_model


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


MODELS = {
    "encoder": {"kind": "encoder"},
    "decoder": {"kind": "decoder"},
    # ALBERT: a factorized embedding (replicated E -> H projection, vocabulary-parallel E-wide embedding)
    # and both layers sharing one set of weights
    "albert": {"kind": "encoder", "embedding_size": 16, "layer_groups": 1, "layernorm_position": "post",
               "embedding_layernorm": True},
}  # fmt: skip


def compare(name: str) -> dict:
    cfg = ModelConfig(
        **MODELS[name], vocab_size=250, pad_vocab_to_multiple_of=64, hidden_size=32, num_layers=2,
        num_heads=4, max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    objective = get_objective("mlm" if cfg.kind == "encoder" else "causal_lm", {}, cfg)
    torch.manual_seed(0)
    sharded = build_parallel_model(cfg)
    full = full_state_dict(sharded)
    reference = TransformerLM(cfg)
    reference.load_state_dict(full)

    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, cfg.vocab_size, (3, 16), generator=gen)
    labels = torch.where(torch.rand(3, 16, generator=gen) < 0.3, input_ids, IGNORE_INDEX)
    attention_mask = torch.ones(3, 16, dtype=torch.long)
    attention_mask[1, 11:] = 0
    labels[1, 11:] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    results = {}
    for name, model in (("tp", sharded), ("ref", reference)):
        logits = model(**objective.model_inputs(batch))
        loss_sum, count = objective.loss(logits, batch, model.spec)
        (loss_sum / count).backward()
        results[name] = {
            "logits": model.spec.gather_logits(logits).detach(),
            "all_logits": model.spec.gather_logits(model(input_ids, attention_mask)).detach(),
            "loss": loss_sum.detach() / count,
        }
    grads_tp = full_state_dict(sharded, grads=True)
    grads_ref = {k: p.grad for k, p in reference.named_parameters()}

    reloaded = build_parallel_model(cfg)
    load_full_state_dict(reloaded, full)
    return {
        "logits": (results["tp"]["logits"] - results["ref"]["logits"]).abs().max().item(),
        "all_logits": (results["tp"]["all_logits"] - results["ref"]["all_logits"]).abs().max().item(),
        "loss": abs(results["tp"]["loss"].item() - results["ref"]["loss"].item()),
        "grads": max_diff(grads_tp, grads_ref),
        "grad_scale": max(g.abs().max().item() for g in grads_ref.values()),
        "reload": max_diff(full_state_dict(reloaded), full),
        "loss_value": results["ref"]["loss"].item(),
    }


if __name__ == "__main__":
    topo = init_distributed(tensor_parallel=2)
    report = {"tp_size": topo.tp_size, **{name: compare(name) for name in MODELS}}
    if topo.is_main:
        with open(sys.argv[1], "w") as handle:
            json.dump(report, handle)
