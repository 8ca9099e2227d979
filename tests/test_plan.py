"""`plmscale plan`: its parameter, FLOP, activation and model-state arithmetic against the model, the papers
and DeepSpeed's real tensors; the GPT-3 and BERT recipes hold the layout it picks and validate at its size."""

import json
import re
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import REPO, free_port

from plmscale.cli import build_parser, main
from plmscale.config import ModelConfig, load_config, zero_stage
from plmscale.model import TransformerLM
from plmscale.parallel.checkpointing import checkpoint_layers
from plmscale.parallel.pipeline import stage_parts
from plmscale.plan import Cluster, Planner
from plmscale.plan.estimate import (
    activation_bytes,
    checkpointed_layers,
    hardware_flops_per_token,
    model_flops_per_token,
    model_state_bytes,
    parameter_count,
    stage_numels,
)

RECIPES = REPO / "launch" / "recipes"
PLANNED = sorted(RECIPES.glob("gpt3_*.yaml")) + [RECIPES / "bert_base.yaml", RECIPES / "bert_large.yaml"]
# Brown et al. (2020), table 2.1: layers, d_model, heads, d_head, batch (sequences of 2048), learning rate.
# XL's 24 heads and 13B's d_model 5140 do not multiply out; the recipes keep d_head (see their headers).
GPT3_TABLE = {
    "125m": (12, 768, 12, 64, 256, 6.0e-4),
    "350m": (24, 1024, 16, 64, 256, 3.0e-4),
    "760m": (24, 1536, 16, 96, 256, 2.5e-4),
    "1.3b": (24, 2048, 16, 128, 512, 2.0e-4),
    "2.7b": (32, 2560, 32, 80, 512, 1.6e-4),
    "6.7b": (32, 4096, 32, 128, 1024, 1.2e-4),
    "13b": (40, 5120, 40, 128, 1024, 1.0e-4),
    "175b": (96, 12288, 96, 128, 1536, 0.6e-4),
}


def _model(kind="decoder", **fields) -> ModelConfig:
    base = {"kind": kind, "vocab_size": 300, "pad_vocab_to_multiple_of": 64, "hidden_size": 32,
            "num_layers": 6, "num_heads": 4, "max_position_embeddings": 16}  # fmt: skip
    return ModelConfig(**base | fields)


@pytest.mark.parametrize("fields", [{}, {"kind": "encoder"}, {"kind": "encoder", "pair_head": True}])
def test_parameter_tensors_match_the_model_and_its_pipeline_stages(fields):
    cfg = _model(**fields)
    torch.manual_seed(0)  # parts are seeded from the run's seed
    whole = TransformerLM(cfg)
    assert parameter_count(cfg) == sum(p.numel() for p in whole.parameters())
    for part in stage_parts(cfg, 3):
        stage = TransformerLM(cfg, part=part)
        layers = part.stop_layer - part.first_layer
        assert sorted(stage_numels(cfg, 1, layers, part.embeddings, part.head)) == sorted(
            p.numel() for p in stage.parameters()
        )


def test_gpt3_175b_parameters_and_flops():
    cfg = load_config(RECIPES / "gpt3_175b.yaml")
    m = cfg.model
    assert parameter_count(m) == pytest.approx(174.6e9, rel=1e-3)  # Narayanan et al. (2021), table 2
    n = m.non_embedding_params() + 12288 * 50304
    assert model_flops_per_token(cfg) == 6 * n + 12 * 96 * 12288 * 2048
    every_layer = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"activation_checkpointing": 1})}
    )
    assert hardware_flops_per_token(every_layer) == model_flops_per_token(
        cfg
    ) + 2 * m.non_embedding_params() + 4 * (96 * 12288 * 2048)
    # every other layer recomputed: half the extra forward
    every_other = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"activation_checkpointing": 2})}
    )
    extra = hardware_flops_per_token(every_layer) - model_flops_per_token(cfg)
    assert hardware_flops_per_token(every_other) - model_flops_per_token(cfg) == pytest.approx(extra / 2)


@pytest.mark.parametrize("every", [1, 2, 3, 4, 6])
def test_checkpointed_layer_count_is_what_training_recomputes(every):
    torch.manual_seed(0)
    model = TransformerLM(_model())
    assert checkpoint_layers(model, every) == checkpointed_layers(0, 6, every)


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_activations_per_layer_are_korthikantis_without_the_attention_scores(tp):
    """34 s b h in 16-bit without tensor parallelism, 10 + 24 / t with it (2022, eq. 2); flash attention
    stores one fp32 log-sum-exp per row and head instead of the 5 a s^2 b of the scores."""
    s, b, h, a = 2048, 2, 1024, 16
    m = _model(hidden_size=h, num_heads=a, hidden_dropout=0.1)
    act = activation_bytes(m, s, b, tp, bf16=True)
    assert act.full_layer - 4 * b * a * s / tp == s * b * h * (10 + 24 / tp)
    assert act.checkpointed_layer == 2 * s * b * h
    fp32 = activation_bytes(m, s, b, tp, bf16=False)
    assert fp32.full_layer - 4 * b * a * s / tp == s * b * h * (2 * (8 + 24 / tp) + 2)  # masks stay 1 byte


def test_model_state_table():
    numels = [1000, 10, 3000]
    n = sum(numels)
    assert model_state_bytes(numels, 0, 4, bf16=False).total == 16 * n
    assert model_state_bytes(numels, 0, 4, bf16=True).total == 16 * n
    assert model_state_bytes(numels, 0, 4, bf16=True, pipelined=True).total == 4 * n + 12 * n / 4
    assert model_state_bytes(numels, 1, 4, bf16=True).total == 4 * n + 12 * n / 4
    assert model_state_bytes(numels, 2, 4, bf16=True).total == 2 * n + 14 * n / 4
    stage3 = model_state_bytes(numels, 3, 4, bf16=True, persistence_threshold=1000)
    assert stage3.weights == 2 * (n / 4 + 1010) and stage3.total == 2 * 1010 + 16 * n / 4
    assert model_state_bytes(numels, 3, 1, bf16=True, persistence_threshold=1000).total == 16 * n


@pytest.mark.distributed
def test_model_states_match_the_tensors_deepspeed_holds(tmp_path):
    out = tmp_path / "states.json"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
         str(free_port()), str(REPO / "tests" / "dist" / "model_state_bytes.py"), str(out)],
        check=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    report = json.loads(out.read_text())
    seen = {(row["dp"], row["zero"], row["precision"]) for row in report["states"]}
    assert {(dp, zero, "fp32") for dp in (1, 2, 4) for zero in range(4)} <= seen
    assert {(2, 1, "bf16"), (2, 2, "bf16")} <= seen
    for row in report["states"]:
        for rank, held in enumerate(row["held"]):
            assert held == pytest.approx(row["estimate"], rel=0.05), (row, rank)
        if row["zero"] < 3:  # freed before the next is counted (a ZeRO-3 engine outlives destroy(): a
            assert max(row["left"]) < 0.01 * row["estimate"], row  # constant offset the baseline removes)
    assert all(row["local"] == row["estimate"] for row in report["tensor_parallel"])


def _header(path, key: str) -> str:
    found = re.search(rf"^#\s+{key}(.*)$", path.read_text(), re.M)
    assert found, f"{path.name} has no '# {key}' line"
    return found[1].strip()


@pytest.mark.parametrize("path", PLANNED, ids=lambda p: p.name)
def test_recipe_validates_at_its_planned_world_size(path):
    world = int(_header(path, "world_size:"))
    cfg = load_config(path)
    ds = cfg.deepspeed_config(world)
    dp = world // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
    assert (
        ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * dp
        == ds["train_batch_size"]
    )
    assert not cfg.warnings(world)


@pytest.mark.parametrize("path", PLANNED, ids=lambda p: p.name)
def test_recipe_holds_the_layout_plan_picks(path):
    args = build_parser().parse_args(["plan", *shlex.split(_header(path, "plmscale plan"))])
    cfg = load_config(path)
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory, args.intra_bw, args.inter_bw,
                      cfg.train.peak_flops, args.mfu, args.headroom)  # fmt: skip
    best = Planner(cfg, cluster).search()[0][0].layout
    assert cluster.gpus == int(_header(path, "world_size:"))
    held = (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.train.micro_batch_size,
            cfg.train.activation_checkpointing, zero_stage(cfg.train.deepspeed_config))  # fmt: skip
    assert held == (best.tp, best.pp, best.micro, best.checkpointing, best.zero)


@pytest.mark.parametrize("size", GPT3_TABLE)
def test_gpt3_recipe_follows_table_2_1(size):
    layers, width, heads, head_dim, batch, lr = GPT3_TABLE[size]
    cfg = load_config(RECIPES / f"gpt3_{size}.yaml")
    m, o, t = cfg.model, cfg.optimizer, cfg.train
    assert (m.num_layers, m.hidden_size, m.num_heads, m.head_dim) == (layers, width, heads, head_dim)
    assert (m.vocab_size, cfg.data.seq_length, t.global_batch_size, o.lr) == (50257, 2048, batch, lr)
    assert (o.betas, o.weight_decay, o.min_lr_ratio, o.decay, o.grad_clip) == (
        (0.9, 0.95),
        0.1,
        0.1,
        "cosine",
        1.0,
    )
    tokens = batch * 2048
    assert o.warmup_steps == round(375e6 / tokens) and t.train_steps == round(300e9 / tokens)
    assert t.precision == "bf16"


def test_bert_large_shape():
    m = load_config(RECIPES / "bert_large.yaml").model
    assert (m.kind, m.num_layers, m.hidden_size, m.num_heads, m.max_position_embeddings) == (
        "encoder",
        24,
        1024,
        16,
        512,
    )


def test_plan_prints_the_best_layout_as_overrides(capsys):
    assert main(["plan", "--gpt3", "175B", "--nodes", "16", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "174.6" in out and "layouts that fit" in out
    best = re.search(r"^best layout:\n  (.*)$", out, re.M)[1]
    assert re.fullmatch(
        r"parallel.tensor_parallel=\d+ parallel.pipeline_parallel=\d+ train.micro_batch_size=\d+ "
        r"train.activation_checkpointing=\d+ train.deepspeed_config=ds_configs/zero[0-3].json",
        best,
    )
    assert "HOSTFILE=hosts NODE_RANK=<0..15>" in out
    overrides = best.split()
    cfg = load_config(RECIPES / "gpt3_175b.yaml", overrides)
    cfg.deepspeed_config(128)  # the printed layout is a valid one for 16 x 8 GPUs


def test_plan_rejects_what_cannot_fit_and_bad_flags(capsys):
    assert main(["plan", "--gpt3", "175b", "--nodes", "1", "--gpu-memory", "16"]) == 2
    assert "none of the" in capsys.readouterr().err
    assert main(["plan", "--gpt3", "125m", "--nodes", "0"]) == 2
    assert "--nodes must be at least 1" in capsys.readouterr().err
    assert main(["plan", "--recipe", "no/such.yaml"]) == 2
    assert "no/such.yaml" in capsys.readouterr().err
