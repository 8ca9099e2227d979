"""BERT's MLM + NSP and ALBERT's MLM + SOP: the pair head's loss, per-term normalization, config validation,
training from NSP instances on 2 processes (TP=1 x DP=2 under ZeRO-2 and TP=2 under ZeRO-3 with gradient
accumulation, which must agree) and the export of the pair head as MegatronBertForPreTraining."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, launch, read_metrics, tiny_recipe, write_recipe
from transformers import AutoConfig

from plmscale.config import ConfigError, ModelConfig, load_config
from plmscale.eval.evaluate import evaluate
from plmscale.export.hf import export_hf
from plmscale.model import TransformerLM
from plmscale.objectives import IGNORE_INDEX, available, get_objective, term_metrics
from plmscale.preflight import check_launch

ENCODER = ModelConfig(kind="encoder", vocab_size=300, hidden_size=32, num_layers=2, num_heads=4,
                      max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
                      pair_head=True)  # fmt: skip
PAIR_MODEL = {"pair_head": True}
WARMUP = 10
PAIR_TRAIN = {"train_steps": 120, "micro_batch_size": 16, "global_batch_size": 32, "log_interval": 1,
              "eval_interval": 60, "save_interval": 1000}  # fmt: skip


def pair_batch(size: int = 6, seq: int = 24) -> dict[str, torch.Tensor]:
    """[CLS] A [SEP] B [SEP] rows with a padded tail, 30 % of the real tokens as MLM targets."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, ENCODER.vocab_size, (size, seq), generator=gen)
    lengths = torch.randint(seq // 2, seq + 1, (size,), generator=gen)
    positions = torch.arange(seq)
    attention_mask = (positions < lengths[:, None]).long()
    token_type_ids = ((positions >= lengths[:, None] // 2) & attention_mask.bool()).long()
    labels = torch.where(
        (torch.rand(size, seq, generator=gen) < 0.3) & attention_mask.bool(), input_ids, -100
    )
    pair_label = torch.randint(0, 2, (size,), generator=gen)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
            "labels": labels, "pair_label": pair_label}  # fmt: skip


def test_pair_objectives_are_registered():
    assert {"mlm_nsp", "mlm_sop"} <= set(available())
    assert get_objective("mlm_sop", {}, ENCODER).pair_task == "sop"


def test_pair_loss_is_cross_entropy_of_the_pooled_cls_and_trains_the_trunk():
    torch.manual_seed(0)
    model, objective, batch = TransformerLM(ENCODER), get_objective("mlm_nsp", {}, ENCODER), pair_batch()
    terms = objective.loss_terms(model(**objective.model_inputs(batch)), batch, model.spec)

    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    head = model.pair_head
    pooled = torch.tanh(hidden[:, 0] @ head.pooler.weight.T + head.pooler.bias)
    logits = pooled @ head.classifier.weight.T + head.classifier.bias
    reference = F.cross_entropy(logits, batch["pair_label"], reduction="sum")
    assert terms["pair"].sum.item() == pytest.approx(reference.item(), rel=1e-6)
    assert terms["pair"].count == 6
    assert terms["pair"].correct == int((logits.argmax(-1) == batch["pair_label"]).sum())
    assert reference.item() / 6 == pytest.approx(np.log(2), abs=0.05)  # an untrained head guesses
    # the MLM term is exactly the mlm objective's loss on the same batch
    mlm = get_objective("mlm", {}, ENCODER)
    mlm_sum, mlm_count = mlm.loss(model(**mlm.model_inputs(batch)), batch, model.spec)
    assert terms["mlm"].sum.item() == pytest.approx(mlm_sum.item(), rel=1e-6)
    assert terms["mlm"].count == mlm_count == int((batch["labels"] != IGNORE_INDEX).sum())
    assert objective.target_counts(batch) == {"mlm": mlm_count, "pair": 6}

    terms["pair"].sum.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in ("pair_head.classifier.weight", "pair_head.pooler.weight", "layers.0.attn.qkv.weight",
                 "token_type_embeddings.weight", "word_embeddings.weight"):  # fmt: skip
        assert grads[name] is not None and grads[name].abs().max() > 0, name
    assert grads["head.dense.weight"] is None  # the pair loss alone never reaches the MLM head


def test_segments_change_the_pair_logits():
    torch.manual_seed(0)
    model, batch = TransformerLM(ENCODER), pair_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    _, with_segments = model(**inputs, token_type_ids=batch["token_type_ids"], classify_pair=True)
    _, without = model(**inputs, classify_pair=True)
    assert (with_segments - without).abs().max() > 1e-4


def test_without_pair_labels_the_pair_objective_is_mlm():
    """A token stream (held-out split, `plmscale eval`) has no pairs: the objective scores MLM alone."""
    torch.manual_seed(0)
    model, objective = TransformerLM(ENCODER), get_objective("mlm_nsp", {}, ENCODER)
    batch = {k: v for k, v in pair_batch().items() if k != "pair_label"}
    inputs = objective.model_inputs(batch)
    assert "classify_pair" not in inputs
    terms = objective.loss_terms(model(**inputs), batch, model.spec, count_correct=True)
    assert list(terms) == list(objective.target_counts(batch)) == ["mlm"]
    assert terms["mlm"].correct is not None
    with pytest.raises(ValueError, match="pair_head"):
        TransformerLM(ENCODER.model_copy(update={"pair_head": False}))(batch["input_ids"], classify_pair=True)


def test_terms_are_normalized_each_by_its_own_global_count():
    """Not an average of averages: MLM mean over masked tokens + pair mean over sequences."""
    metrics = term_metrics({"mlm": 60.0, "pair": 11.0}, {"mlm": 20.0, "pair": 16.0}, {"pair": 12.0})
    assert metrics["loss"] == pytest.approx(3.0 + 11 / 16)
    assert metrics["loss/mlm"] == 3.0 and metrics["loss/pair"] == 11 / 16
    assert metrics["targets"] == 20.0 and metrics["targets/pair"] == 16.0
    assert metrics["pair_accuracy"] == 0.75
    single = term_metrics({"mlm": 60.0}, {"mlm": 20.0}, {"mlm": 5.0})
    assert single == {"loss": 3.0, "targets": 20.0, "accuracy": 0.25}  # one term: the metrics of before


def test_preflight_checks_the_instances_carry_the_pair_labels(shards, instance_sets, tmp_path):
    def load(objective: str, instances: Path, model=PAIR_MODEL, **sections):
        recipe = tiny_recipe(shards, tmp_path / "run", model=model, objective={"name": objective},
                             data={"instances": str(instances)}, **sections)  # fmt: skip
        return check_launch(write_recipe(tmp_path / "recipe.yaml", recipe), world_size=2)

    config = load("mlm_nsp", instance_sets["nsp"])
    assert config.model.pair_head and load("mlm_sop", instance_sets["sop"]).objective.name == "mlm_sop"
    with pytest.raises(ConfigError, match="holds 'mlm' instances, with no pair_label; objective 'mlm_nsp'"):
        load("mlm_nsp", instance_sets["mlm"])
    with pytest.raises(
        ConfigError, match="'sop' instances, with a pair_label of another task; .* on 'nsp' ones"
    ):
        load("mlm_nsp", instance_sets["sop"])
    with pytest.raises(ConfigError, match="data.instances=.*not_built_yet: no such directory"):
        load("mlm_sop", tmp_path / "not_built_yet")
    with pytest.raises(ConfigError, match="set model.pair_head: true"):
        load("mlm_nsp", instance_sets["nsp"], model={})
    with pytest.raises(ConfigError, match="distill: .* use objective mlm"):
        load("mlm_nsp", instance_sets["nsp"], distill={"teacher": str(tmp_path)})
    with pytest.raises(ConfigError, match="data.instances serves the mlm, mlm_nsp, .*mlm_sop.* objectives"):
        load("causal_lm", instance_sets["nsp"], model={"kind": "decoder"})
    assert load("mlm", instance_sets["nsp"], model={}).objective.name == "mlm"  # MLM ignores pair labels
    with pytest.raises(
        ConfigError, match=r"'denoising' instances without the field\(s\) \['mask_labels', 'mask_"
    ):
        load("mlm", instance_sets["denoising"], model={})


def test_configs_without_pair_head_dump_as_before(shards, tmp_path):
    """A checkpoint's saved config must equal the current one to resume: no new key when it is off."""
    recipe = tiny_recipe(shards, tmp_path)
    assert "pair_head" not in load_config(write_recipe(tmp_path / "a.yaml", recipe)).model.model_dump()
    recipe["model"]["pair_head"] = True
    assert load_config(write_recipe(tmp_path / "b.yaml", recipe)).model.model_dump()["pair_head"] is True


@pytest.fixture(scope="module")
def nsp_runs(shards, instance_sets, tmp_path_factory) -> dict[str, Path]:
    """mlm_nsp for 120 steps on TP=1 x DP=2 under ZeRO-2 (one micro-batch of 16 per rank), and its first 10
    steps (the warm-up: the same learning rates) on TP=2 x DP=1 under ZeRO-3 (four micro-batches of 8)."""
    root, runs = tmp_path_factory.mktemp("nsp_runs"), {}
    layouts = {
        "dp2": ({"tensor_parallel": 1}, {"deepspeed_config": str(REPO / "ds_configs" / "zero2.json")}),
        "tp2": ({"tensor_parallel": 2}, {"deepspeed_config": str(REPO / "ds_configs" / "zero3.json"),
                                         "micro_batch_size": 8, "train_steps": WARMUP}),
    }  # fmt: skip
    for name, (parallel, train) in layouts.items():
        recipe = tiny_recipe(
            shards, root / name, model=PAIR_MODEL, objective={"name": "mlm_nsp"}, parallel=parallel,
            data={"instances": str(instance_sets["nsp"])}, optimizer={"lr": 2e-3, "warmup_steps": WARMUP},
            train=PAIR_TRAIN | train,
        )  # fmt: skip
        launch(write_recipe(root / f"{name}.yaml", recipe))
        runs[name] = root / name
    return runs


@pytest.mark.distributed
def test_training_from_nsp_instances_lowers_mlm_and_pair_losses(nsp_runs):
    rows = read_metrics(nsp_runs["dp2"])
    assert sorted(rows) == list(range(1, 121))
    mlm, pair = (np.array([rows[s][f"loss/{t}"] for s in sorted(rows)]) for t in ("mlm", "pair"))
    accuracy = np.array([rows[s]["pair_accuracy"] for s in sorted(rows)])
    assert rows[1]["loss"] == pytest.approx(mlm[0] + pair[0])
    assert rows[1]["targets/pair"] == 32
    assert pair[:10].mean() == pytest.approx(np.log(2), abs=0.03)
    assert mlm[-10:].mean() < mlm[:10].mean() - 0.8, mlm
    assert pair[-10:].mean() < pair[:10].mean() - 0.1, pair
    assert accuracy[-10:].mean() > 0.7, accuracy
    held_out = read_metrics(nsp_runs["dp2"], "eval")[120]
    assert set(held_out) == {"kind", "step", "loss", "accuracy", "targets"}  # a token stream: MLM only


@pytest.mark.distributed
def test_tp2_zero3_with_accumulation_follows_tp1_dp2(nsp_runs):
    """The pair head is replicated on the TP ranks (the [CLS] state it reads is replicated, so its logits and
    weight gradients are the same on each) and each loss term is normalized by its global count, so the
    layout (TP, DP, micro-batches, ZeRO stage) changes neither the losses nor the gradient norm."""
    dp2, tp2 = read_metrics(nsp_runs["dp2"]), read_metrics(nsp_runs["tp2"])
    assert sorted(tp2) == list(range(1, WARMUP + 1))
    for key in ("loss/mlm", "loss/pair", "loss", "grad_norm"):
        curves = [[rows[step][key] for step in range(1, WARMUP + 1)] for rows in (dp2, tp2)]
        assert curves[1] == pytest.approx(curves[0], rel=1e-4), key
        assert len(set(curves[0])) == WARMUP, key  # the weights moved every step


@pytest.mark.distributed
def test_pair_head_exports_as_megatron_bert_for_pretraining_and_evaluates(shards, nsp_runs, tmp_path):
    for name, run in nsp_runs.items():  # tp2: weights gathered from TP and ZeRO-3 shards
        model_dir = run / "model"
        assert yaml.safe_load((model_dir / "config.yaml").read_text())["model"]["pair_head"] is True
        export_hf(model_dir, tmp_path / name)  # raises unless transformers gives our MLM and pair logits
        assert AutoConfig.from_pretrained(tmp_path / name).architectures == ["MegatronBertForPreTraining"]
    result = evaluate(nsp_runs["dp2"] / "model", shards, batches=2, batch_size=4)
    assert result["objective"] == "mlm_nsp" and 0 < result["loss"] < 7.0  # held-out MLM, as `plmscale eval`
