"""Run on 2 processes: a TP=2 model's forward and backward against the unsharded reference (the trunk, and
the models of SpanBERT and ELECTRA with their loss terms).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/tp_equivalence.py OUT.json
"""

import json
import sys

import numpy as np
import torch

from plmscale.config import ModelConfig
from plmscale.model import TransformerLM, build_model
from plmscale.objectives import IGNORE_INDEX, get_objective
from plmscale.objectives.span_boundary import span_boundaries
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


# objectives whose model has more than the trunk's head: SpanBERT's boundary head, ELECTRA's generator
HEADS = {
    "mlm_sbo": {"span_boundary_head": True},
    "electra": {"layernorm_position": "post", "embedding_layernorm": True, "generator_hidden_fraction": 0.5},
}


def compare_objective(name: str) -> dict:
    """Each loss term, the gradients and (ELECTRA) the generator's samples, sharded vs unsharded."""
    cfg = ModelConfig(
        kind="encoder", vocab_size=250, pad_vocab_to_multiple_of=64, hidden_size=32, num_layers=2, num_heads=4,
        max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0, **HEADS[name],
    )  # fmt: skip
    objective = get_objective(name, {"tokenizer": "unread"} if name == "mlm_sbo" else {}, cfg)
    torch.manual_seed(0)
    sharded = build_parallel_model(cfg)
    reference = build_model(cfg)
    reference.load_state_dict(full_state_dict(sharded))

    input_ids = torch.randint(5, cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    spans = [[[2, 5], [9, 10]], [[1, 3]], [[6, 8], [11, 13]]]
    boundaries = torch.from_numpy(np.stack([span_boundaries(row, 16) for row in spans]))
    labels = torch.where(boundaries[..., 0] >= 0, input_ids, IGNORE_INDEX)
    attention_mask = torch.ones(3, 16, dtype=torch.long)
    attention_mask[1, 11:] = 0
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    batch |= {"span_boundaries": boundaries, "sample_seed": torch.full((3,), 123)}

    results = {}
    for which, model in (("tp", sharded), ("ref", reference)):
        outputs = model(**objective.model_inputs(batch))
        terms = objective.loss_terms(outputs, batch, model.spec, count_correct=True)
        sum(term.sum / term.count for term in terms.values()).backward()
        results[which] = {
            "terms": {term_name: term.sum.item() / term.count for term_name, term in terms.items()},
            "samples": outputs[2] if name == "electra" else input_ids,
        }
    grads_ref = {k: p.grad for k, p in reference.named_parameters()}
    tp, ref = results["tp"], results["ref"]
    return {
        "terms": max(abs(tp["terms"][k] - ref["terms"][k]) for k in ref["terms"]),
        "term_values": ref["terms"],
        "grads": max_diff(full_state_dict(sharded, grads=True), grads_ref),
        "grad_scale": max(g.abs().max().item() for g in grads_ref.values()),
        "same_samples": bool(torch.equal(tp["samples"], ref["samples"])),
    }


if __name__ == "__main__":
    topo = init_distributed(tensor_parallel=2)
    report = {"tp_size": topo.tp_size, **{name: compare(name) for name in MODELS}}
    report |= {name: compare_objective(name) for name in HEADS}
    if topo.is_main:
        with open(sys.argv[1], "w") as handle:
            json.dump(report, handle)
