"""Pipeline parallelism and activation checkpointing: stages built as parts equal the whole model, checkpointed
layers recompute exactly, stage tuples carry what stages and heads read, the last stage's distillation terms
are the whole student's, and on real gloo process groups PP=2 and TP2 x PP2 x DP2 (8 processes) train like
one process for GPT, BERT-MLM and BERT-MLM+NSP (SpanBERT: PP=2); a pipelined run resumes exactly and its
model directory is whole."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from functools import partial

import pytest
import torch
from conftest import (
    REPO,
    launch,
    launch_command,
    read_metrics,
    tiny_recipe,
    unlink_shared_memory,
    write_recipe,
)
from test_pair_objectives import PAIR_MODEL

from plmscale.config import ConfigError, DistillConfig, ModelConfig, load_config
from plmscale.data import BatchSource, PackedStream
from plmscale.distill import Distillation
from plmscale.distill.cache import TEACHER_TOP_K
from plmscale.distill.loss import term_counts
from plmscale.manifest import load_manifest, tokenizer_path
from plmscale.model import TransformerLM
from plmscale.model.transformer import ModelPart
from plmscale.model_dir import load_state
from plmscale.objectives import IGNORE_INDEX, get_objective
from plmscale.parallel.checkpointing import checkpoint_layers
from plmscale.parallel.pipeline import PipelineStage, last_stage_loss, pipeline_batch, stage_parts

STEPS = 4
CFG = ModelConfig(kind="encoder", vocab_size=250, pad_vocab_to_multiple_of=64, hidden_size=32, num_layers=4,
                  num_heads=4, max_position_embeddings=32, pair_head=True)  # fmt: skip


def _batch(seq: int = 16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(5, CFG.vocab_size, (3, seq), generator=gen)
    labels = torch.where(torch.rand(3, seq, generator=gen) < 0.3, input_ids, IGNORE_INDEX)
    attention_mask = torch.ones(3, seq, dtype=torch.long)
    attention_mask[2, 11:] = 0
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def test_stages_built_as_parts_hold_and_compute_what_the_whole_model_does():
    torch.manual_seed(5)
    whole = TransformerLM(CFG).eval()
    parts = stage_parts(CFG, 3, [1, 2, 1])
    assert parts == [
        ModelPart(0, 1, True, False),
        ModelPart(1, 3, False, False),
        ModelPart(3, 4, False, True),
    ]
    torch.manual_seed(5)
    stages = [TransformerLM(CFG, part=part).eval() for part in parts]
    merged = {name: p for stage in stages for name, p in stage.named_parameters()}
    assert merged.keys() == dict(whole.named_parameters()).keys()
    for name, param in whole.named_parameters():
        assert torch.equal(merged[name], param), name  # the same init, whichever part is built
    batch = _batch()
    x = stages[0].embed(batch["input_ids"])
    for stage in stages:
        x = stage.encode(x, batch["attention_mask"])
    positions = (batch["labels"] != IGNORE_INDEX).flatten().nonzero().squeeze(1)
    assert torch.equal(stages[-1].output(x, positions), whole(batch["input_ids"], batch["attention_mask"],
                                                              target_positions=positions))  # fmt: skip


@pytest.mark.parametrize("layernorm", ["pre", "post"])  # post: BERT's, RoBERTa's (embedding LayerNorm too)
def test_stage_tuples_carry_what_the_stages_and_last_heads_read(shards, layernorm):
    """Through stages built as parts, UniLM's attention patterns reach every stage, SpanBERT's span
    boundaries and the pair flag the last one, whose loss terms are the whole model's: MLM + SBO on a span
    batch, MLM + pair on a pair batch, MLM alone on a pair model's token batch (its pair head does not run),
    MLM and its per-mode slices under UniLM's mixed masks."""
    tokenizer = str(tokenizer_path(load_manifest(shards, verify=False)))
    post = {"layernorm_position": "post", "embedding_layernorm": True} if layernorm == "post" else {}
    cfg = CFG.model_copy(update={"vocab_size": 2000, "span_boundary_head": True, **post})  # both heads
    valid = PackedStream.from_manifest(shards, "valid")
    span, unilm = get_objective("mlm_sbo", {"tokenizer": tokenizer}, cfg), get_objective("unilm", {}, cfg)
    pair = get_objective("mlm_nsp", {}, cfg)
    pair_batch = _batch(seq=24) | {"token_type_ids": torch.zeros(3, 24, dtype=torch.long)}
    pair_batch["pair_label"] = torch.tensor([0, 1, 1])
    token_batch = {k: v for k, v in pair_batch.items() if k != "pair_label"}
    unilm_batch = BatchSource(valid, unilm, 32, 8, 1, 0, 3, False).micro_batches(0, 1)[0]
    assert len(unilm_batch["mode"].unique()) > 1
    torch.manual_seed(5)
    whole = TransformerLM(cfg).eval()
    torch.manual_seed(5)
    stages = [PipelineStage(cfg, part=part).eval() for part in stage_parts(cfg, 2)]
    cases = [
        (span, BatchSource(valid, span, 32, 3, 1, 0, 3, False).micro_batches(0, 1)[0], {"mlm", "sbo"}),
        (pair, pair_batch, {"mlm", "pair"}),
        (pair, token_batch, {"mlm"}),
        (unilm, unilm_batch, {"mlm", *unilm.breakdown_terms}),
    ]
    for objective, batch, names in cases:
        expected = objective.loss_terms(whole(**objective.model_inputs(batch)), batch, whole.spec, True)
        inputs, labels = pipeline_batch(objective, batch)
        for stage in stages:
            inputs = stage(inputs)
        scored = partial(objective.loss_terms, spec=whole.spec, count_correct=True)
        got = last_stage_loss(scored)(inputs, labels)
        assert got.keys() == expected.keys() == names and expected["mlm"].count > 0
        for name, term in expected.items():
            assert (got[name].count, got[name].correct) == (term.count, term.correct), name
            torch.testing.assert_close(got[name].sum, term.sum, rtol=1e-6, atol=1e-5)


def test_last_stage_distillation_terms_are_the_whole_students(shards):
    """With pipeline stages the teacher runs whole on the last stage's ranks, on the inputs that reach it as
    labels (or its cached top-k logits do): the soft-logits and hard terms there, and their counts, are those
    of the unpipelined student for the same batch and weights, for MLM (logits at the targets), UniLM (the
    teacher reads the samples' attention patterns), GPT (logits everywhere) and an MLM teacher cache. Losses
    that read the student's layers are refused with pipeline stages (tests/test_distill.py)."""
    valid = PackedStream.from_manifest(shards, "valid")
    losses = [{"name": "logits", "temperature": 2.0}, {"name": "hard", "weight": 0.5}]
    encoder = CFG.model_copy(update={"vocab_size": 2000, "pair_head": False})
    decoder = encoder.model_copy(update={"kind": "decoder", "type_vocab_size": 0})

    def case(cfg: ModelConfig, name: str, batch=None, cached: bool = False):
        objective = get_objective(name, {}, cfg)
        batch = batch or BatchSource(valid, objective, 32, 4, 1, 0, 3, False).micro_batches(0, 1)[0]
        torch.manual_seed(7)  # a teacher of another depth and weights
        teacher = TransformerLM(cfg.model_copy(update={"num_layers": 2})).eval()
        if cached:  # as `plmscale distill-cache` writes it: the teacher's top-k at each target, in order
            with torch.no_grad():
                top = teacher(**objective.model_inputs(batch)).topk(16)
            batch = batch | {TEACHER_TOP_K[0]: top.indices.int(), TEACHER_TOP_K[1]: top.values}
        distill = DistillConfig(teacher="t", losses=losses)
        live = None if cached else teacher
        return objective, batch, Distillation.from_config(distill, live, teacher.cfg, cfg, objective)

    cases = {
        "mlm": case(encoder, "mlm", _batch(seq=24)),
        "unilm": case(encoder, "unilm"),
        "gpt": case(decoder, "causal_lm"),
        "mlm, cached teacher": case(encoder, "mlm", _batch(seq=24), cached=True),
    }
    for name, (objective, batch, distillation) in cases.items():
        cfg = objective.model_cfg
        torch.manual_seed(5)
        whole = TransformerLM(cfg).eval()
        torch.manual_seed(5)
        stages = [PipelineStage(cfg, part=part).eval() for part in stage_parts(cfg, 2)]
        logits = whole(**objective.model_inputs(batch))
        expected = distillation(logits, batch, whole.spec)
        inputs, labels = pipeline_batch(objective, batch)
        for stage in stages:
            inputs = stage(inputs)
        got = last_stage_loss(partial(distillation, spec=whole.spec))(inputs, labels)
        counts = term_counts(distillation.cfg, objective, batch)  # what every stage all-reduces
        assert got.keys() == expected.keys() == counts.keys() == {"logits", "hard"}, name
        assert expected["logits"].sum > 1e-3 and (logits.dim() == 3) == (name == "gpt"), name
        for term, value in expected.items():
            assert got[term].count == value.count == counts[term] > 0, (name, term)
            torch.testing.assert_close(got[term].sum, value.sum, rtol=1e-6, atol=1e-6, msg=f"{name} {term}")


@pytest.mark.parametrize("every", [1, 2, 3])
def test_activation_checkpointing_recomputes_exactly_with_dropout_on(every):
    """Losses and gradients bitwise equal to the run without checkpointing: dropout masks are replayed."""
    objective, batch = get_objective("mlm", {}, CFG), _batch()
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(11)
        model = TransformerLM(CFG).train()
        if checkpointed:
            assert checkpoint_layers(model, every) == len(range(0, CFG.num_layers, every))
        torch.manual_seed(12)
        loss_sum, _ = objective.loss(model(**objective.model_inputs(batch)), batch, model.spec)
        loss_sum.backward()
        results.append((loss_sum.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss, loss_ckpt)
    for name, grad in grads.items():  # (the pair head gets none: the MLM loss does not reach it)
        assert grad is None and grads_ckpt[name] is None or torch.equal(grad, grads_ckpt[name]), name
    assert grads["layers.0.attn.qkv.weight"].abs().max() > 0


def _config_error(tmp_path, **sections) -> str:
    recipe = tiny_recipe(tmp_path / "shards", tmp_path / "out", **sections)
    with pytest.raises(ConfigError) as err:
        load_config(write_recipe(tmp_path / "r.yaml", recipe)).deepspeed_config(4)
    return str(err.value)


def test_bad_pipeline_layouts_are_rejected_naming_the_key(tmp_path):
    zero1 = {"deepspeed_config": str(REPO / "ds_configs" / "zero1.json")}
    assert "parallel.pipeline_parallel=3 must divide model.num_layers=2" in _config_error(
        tmp_path, parallel={"pipeline_parallel": 3}, train=zero1
    )
    message = _config_error(
        tmp_path, parallel={"pipeline_parallel": 2, "pipeline_partition": [2, 1]}, train=zero1
    )
    assert "parallel.pipeline_partition=[2, 1]" in message
    assert "train.activation_checkpointing=3 exceeds model.num_layers=2" in _config_error(
        tmp_path, train={"activation_checkpointing": 3}
    )
    recipe = tiny_recipe(tmp_path, tmp_path / "out", parallel={"pipeline_parallel": 2}, train=zero1)
    config = load_config(write_recipe(tmp_path / "ok.yaml", recipe))
    assert config.warnings(4)[0].startswith("1 micro-batch(es) per step for 2 pipeline stages")
    assert config.warnings(2) == []


LAYOUTS = {  # processes, parallel section, extra train keys
    "one": (1, {}, {}),
    "pp2": (2, {"pipeline_parallel": 2}, {"activation_checkpointing": 1}),
    # a checkpoint after every step: test_reshard resumes this very run (shared_run) in other layouts
    "3d": (
        8,
        {"pipeline_parallel": 2, "tensor_parallel": 2},
        {"save_interval": 1, "keep_checkpoints": STEPS},
    ),
}
MODELS = {  # a decoder, an encoder with MLM and the pair head (plain BERT is the subset of it), SpanBERT
    "gpt": {"kind": "decoder"},
    "bert_nsp": {"model": PAIR_MODEL, "objective": {"name": "mlm_nsp"}},
    "spanbert": {
        "model": {"span_boundary_head": True, "type_vocab_size": 0},
        "objective": {"name": "mlm_sbo"},
    },
}
MODEL_LAYOUTS = {"spanbert": ("one", "pp2")}  # its heads on the last stage: what PP2 alone shows


def _recipe(shards, instance_sets, output, model: str, layout: str, **train):
    _, parallel, layout_train = LAYOUTS[layout]
    sections = dict(MODELS[model])
    if model == "bert_nsp":
        sections["data"] = {"instances": str(instance_sets["nsp"])}
    if model == "spanbert":
        tokenizer = str(tokenizer_path(load_manifest(shards, verify=False)))
        sections["objective"] = sections["objective"] | {"params": {"tokenizer": tokenizer}}
    return tiny_recipe(
        shards, output, kind=sections.pop("kind", "encoder"), parallel=parallel,
        train={"deepspeed_config": str(REPO / "ds_configs" / "zero1.json"), "micro_batch_size": 4,
               "global_batch_size": 16, "train_steps": STEPS, "save_interval": 100, "eval_interval": STEPS}
        | layout_train | train,
        **sections,
    )  # fmt: skip


def _layout_runs(shards, instance_sets, shared_run, root, model: str) -> dict:
    runs = {}
    for layout in MODEL_LAYOUTS.get(model, LAYOUTS):
        procs = LAYOUTS[layout][0]
        if layout == "3d":  # the run test_reshard's chains start from
            recipe_for = partial(_recipe, shards, instance_sets, model=model, layout=layout)
            runs[model, layout] = shared_run(f"{model}_tp2_pp2_dp2", recipe_for, procs)
            continue
        output = root / f"{model}_{layout}"
        recipe = _recipe(shards, instance_sets, output, model, layout)
        launch(write_recipe(root / f"{model}_{layout}.yaml", recipe), nprocs=procs, timeout=600)
        runs[model, layout] = output
    return runs


@pytest.mark.distributed
@pytest.mark.parametrize("model", MODELS)
def test_pipeline_layouts_train_like_one_process(shards, instance_sets, shared_run, tmp_path, model):
    """PP=2 (with every layer checkpointed) and TP2 x PP2 x DP2 (SpanBERT: PP=2) follow the one-process run:
    every loss term, the held-out loss and the gradient norm (tied embeddings counted once, clipping on) agree
    to fp32 rounding; the model directory gathered from every stage and TP rank holds the same weights."""
    layout_runs = _layout_runs(shards, instance_sets, shared_run, tmp_path, model)
    reference = read_metrics(layout_runs[model, "one"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    keys = [k for k in reference[1] if k.startswith(("loss", "targets", "pair_accuracy")) or k == "grad_norm"]
    assert {"spanbert": "loss/sbo", "bert_nsp": "loss/pair"}.get(model, "loss") in keys
    assert reference[STEPS]["loss"] < reference[1]["loss"]
    weights = load_state(layout_runs[model, "one"] / "model")
    for layout in [layout for (_, layout) in layout_runs if layout != "one"]:
        rows = read_metrics(layout_runs[model, layout])
        for key in keys:
            curve = [rows[step][key] for step in range(1, STEPS + 1)]
            assert curve == pytest.approx([reference[s][key] for s in range(1, STEPS + 1)], rel=1e-5), (
                layout,
                key,
            )
        gathered = load_state(layout_runs[model, layout] / "model")
        assert gathered.keys() == weights.keys()
        assert max((gathered[k] - weights[k]).abs().max().item() for k in weights) < 1e-5, layout
        held_out = read_metrics(layout_runs[model, layout], "eval")[STEPS]  # the same sequences in any layout
        assert held_out["loss"] == pytest.approx(
            read_metrics(layout_runs[model, "one"], "eval")[STEPS]["loss"], rel=1e-5
        )


def _kill_after_checkpoint(recipe, output, step: int, timeout: int = 900) -> None:
    """Starts a 2-process run and SIGKILLs its launcher's process group once checkpoint `step` is published."""
    command = launch_command(recipe, 2)
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    latest, deadline = output / "checkpoints" / "latest", time.monotonic() + timeout
    while not (latest.is_file() and latest.read_text().strip() == f"step_{step:08d}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the run ended or stalled before publishing its first checkpoint")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    unlink_shared_memory(command)
    assert not (output / "model").exists(), "the run finished before it could be killed"


@pytest.mark.distributed
def test_killed_pipelined_run_resumes_with_identical_losses(shards, instance_sets, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train = {"train_steps": 12, "save_interval": 6, "eval_interval": 100}
    dropout = {"hidden_dropout": 0.1, "attention_dropout": 0.1}

    def recipe(output, name):
        r = _recipe(shards, instance_sets, output, "gpt", "pp2", **train)
        r["model"].update(dropout)
        return write_recipe(tmp_path / f"{name}.yaml", r)

    launch(recipe(straight, "straight"), nprocs=2)
    _kill_after_checkpoint(recipe(killed, "killed"), killed, step=6)
    launch(recipe(killed, "killed"), nprocs=2)
    expected, resumed = read_metrics(straight), read_metrics(killed)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(7, 13):
        assert resumed[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-6, abs=1e-7), step
