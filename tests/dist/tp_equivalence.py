"""Run on 2 processes: a TP=2 model's forward and backward against the unsharded reference (the trunk, and
the models of SpanBERT, ELECTRA and UniLM with their loss terms), and every distillation loss from a TP=2 teacher
into a narrower TP=2 student against the same at TP=1.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/tp_equivalence.py OUT.json
"""

import json
import sys

import numpy as np
import torch

from plmscale.config import DistillConfig, ModelConfig
from plmscale.distill import Distillation
from plmscale.model import TransformerLM, build_model
from plmscale.objectives import IGNORE_INDEX, get_objective
from plmscale.objectives.span_boundary import span_boundaries
from plmscale.objectives.unilm import LEFT_TO_RIGHT, RIGHT_TO_LEFT, SEQ2SEQ, attention_pattern
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


# objectives whose model has more than the trunk's head (SpanBERT's boundary head, ELECTRA's generator) or
# more than a padding mask (UniLM's per-sample attention patterns)
HEADS = {
    "mlm_sbo": {"span_boundary_head": True},
    "electra": {"layernorm_position": "post", "embedding_layernorm": True, "generator_hidden_fraction": 0.5},
    "unilm": {"type_vocab_size": 2},
}
# UniLM's modes of the three samples (the second padded): right to left, seq2seq from a 5-token source, left
# to right; the other objectives ignore these fields
MODES = [(RIGHT_TO_LEFT, 0), (SEQ2SEQ, 5), (LEFT_TO_RIGHT, 0)]


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
    batch |= {
        "attention_pattern": torch.from_numpy(np.stack([attention_pattern(*mode) for mode in MODES])),
        "mode": torch.tensor([mode for mode, _ in MODES]),
    }

    results = {}
    for which, model in (("tp", sharded), ("ref", reference)):
        outputs = model(**objective.model_inputs(batch))
        terms = objective.loss_terms(outputs, batch, model.spec, count_correct=True)
        terms = {term_name: term for term_name, term in terms.items() if term.count}  # UniLM: 3 of 4 modes
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


DISTILL_LOSSES = [
    {"name": "logits", "temperature": 2.0}, {"name": "hard", "weight": 0.5}, {"name": "embedding"},
    {"name": "hidden", "metric": "cosine"}, {"name": "attention", "form": "scores", "layers": [[0, 1], [1, 2]]},
    {"name": "attention", "form": "probs", "layers": "last"}, {"name": "minilm", "teacher_layer": 1},
    {"name": "minilm_v2", "relation_heads": 8, "teacher_layer": 2},
]  # fmt: skip


def compare_distillation(kind: str) -> dict:
    """Each term's sum and the student's (and projections') gradients, TP=2 against TP=1."""
    teacher_cfg = ModelConfig(
        kind=kind, vocab_size=250, pad_vocab_to_multiple_of=64, hidden_size=32, num_layers=3, num_heads=4,
        max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    student_cfg = teacher_cfg.model_copy(update={"hidden_size": 16, "num_layers": 2, "ffn_hidden_size": 32})
    objective = get_objective("mlm" if kind == "encoder" else "causal_lm", {}, student_cfg)
    torch.manual_seed(0)
    teachers = [build_parallel_model(teacher_cfg), TransformerLM(teacher_cfg)]
    teachers[1].load_state_dict(full_state_dict(teachers[0]))
    students = [build_parallel_model(student_cfg), TransformerLM(student_cfg)]
    students[1].load_state_dict(full_state_dict(students[0]))
    cfg = DistillConfig(teacher="-", losses=DISTILL_LOSSES)
    runs = [Distillation.from_config(cfg, t, teacher_cfg, student_cfg, objective) for t in teachers]
    runs[1].trainable.load_state_dict(runs[0].trainable.state_dict())

    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(5, 250, (3, 12), generator=gen)
    labels = torch.where(torch.rand(3, 12, generator=gen) < 0.4, input_ids, IGNORE_INDEX)
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[2, 8:] = 0
    labels[2, 8:] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    sums = []
    for student, run in zip(students, runs, strict=True):
        capture = run.capture()
        terms = run(student(**objective.model_inputs(batch), capture=capture), batch, student.spec)
        sum(term.sum / term.count for term in terms.values()).backward()
        sums.append({name: term.sum.item() for name, term in terms.items()})
    grads = [full_state_dict(students[0], grads=True), {k: p.grad for k, p in students[1].named_parameters()}]
    projections = [{k: p.grad for k, p in run.trainable.named_parameters()} for run in runs]
    return {
        "terms": sums[1],
        # relative to the term (absolute below 1: a KL near zero is a difference of nearly equal logs)
        "terms_diff": max(
            abs(sums[0][name] - sums[1][name]) / max(abs(sums[1][name]), 1.0) for name in sums[1]
        ),
        "grads": max_diff(*grads),
        "projection_grads": max_diff(*projections)
        / max(g.abs().max().item() for g in projections[1].values()),
        "grad_scale": max(g.abs().max().item() for g in grads[1].values()),
    }


if __name__ == "__main__":
    topo = init_distributed(tensor_parallel=2)
    report = {"tp_size": topo.tp_size, **{name: compare(name) for name in MODELS}}
    report |= {name: compare_objective(name) for name in HEADS}
    report["distill"] = {kind: compare_distillation(kind) for kind in ("encoder", "decoder")}
    if topo.is_main:
        with open(sys.argv[1], "w") as handle:
            json.dump(report, handle)
