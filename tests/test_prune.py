"""Structured pruning: Taylor importance against its definition, pruned weights that compute exactly what
the original computes with the pruned units removed, a normal model directory that exports, bad targets."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from plmscale.cli import main
from plmscale.config import ConfigError, ModelConfig, RunConfig
from plmscale.export.hf import export_hf, load_hf_model, logit_differences
from plmscale.model import TransformerLM
from plmscale.model_dir import load_local_model, load_meta, load_run_config, save_model_dir
from plmscale.preflight import check_launch
from plmscale.prune.importance import taylor_importance
from plmscale.prune.structure import Kept, prune_state, pruned_config
from tests.conftest import tiny_recipe, write_recipe

LAYOUTS = {
    "pre-LN encoder": {"kind": "encoder"},
    "BERT": {"kind": "encoder", "layernorm_position": "post", "embedding_layernorm": True},
    "decoder": {"kind": "decoder", "type_vocab_size": 0},
}


def tiny(layers: int = 3, **options) -> ModelConfig:
    fields = dict(kind="encoder", vocab_size=50, pad_vocab_to_multiple_of=8, hidden_size=16)
    fields |= dict(num_layers=layers, num_heads=4, ffn_hidden_size=12, max_position_embeddings=8)
    return ModelConfig(**fields | dict(hidden_dropout=0.0, attention_dropout=0.0, init_std=0.3) | options)


def random_model(cfg: ModelConfig, seed: int = 0) -> TransformerLM:
    """Perturbed biases and LayerNorms, so that a misplaced row or column shows."""
    torch.manual_seed(seed)
    model = TransformerLM(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def batches(cfg: ModelConfig, count: int = 2, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(5, cfg.vocab_size, (3, 8), generator=generator),
            "labels": torch.randint(5, cfg.vocab_size, (3, 8), generator=generator),
        }
        for _ in range(count)
    ]


def token_loss(model, batch):
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


def gated_derivatives(model: TransformerLM, batch: dict) -> tuple[torch.Tensor, ...]:
    """dL/dxi for a gate xi = 1 on each head's context, each neuron's activation and each layer's residual
    update (Michel et al.'s definition), by autograd on explicit gates."""
    cfg = model.cfg
    n = cfg.num_layers
    gates = [torch.ones(n, cfg.num_heads), torch.ones(n, cfg.ffn_size), torch.ones(n)]
    for gate in gates:
        gate.requires_grad_(True)
    handles = []
    for i in range(n):
        block = model.layers[str(i)]

        def heads(module, args, i=i):
            x = args[0]
            return (x.view(*x.shape[:-1], cfg.num_heads, -1) * gates[0][i, :, None]).flatten(-2)

        def layer(module, args, output, i=i):
            return args[0] + gates[2][i] * (output - args[0])

        handles += [
            block.attn.proj.register_forward_pre_hook(heads),
            block.mlp.fc_out.register_forward_pre_hook(lambda module, args, i=i: args[0] * gates[1][i]),
            block.register_forward_hook(layer),
        ]
    grads = torch.autograd.grad(token_loss(model, batch), gates)
    for handle in handles:
        handle.remove()
    return grads


@pytest.mark.parametrize("layout", LAYOUTS)
def test_taylor_importance_is_the_gate_derivative_summed_over_batches(layout):
    model = random_model(tiny(**LAYOUTS[layout]))
    data = batches(model.cfg, count=3)
    scores = taylor_importance(model, data, token_loss)
    expected = [
        sum(grads[k].abs() for grads in map(lambda b: gated_derivatives(model, b), data)) for k in range(3)
    ]
    assert scores.batches == 3
    for got, want in zip((scores.heads, scores.neurons, scores.layers), expected, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert scores.heads.min() > 0 and scores.neurons.min() > 0  # no unit is trivially idle here
    assert all(p.grad is None for p in model.parameters())  # scored, nothing left behind


def masked_original(model: TransformerLM, kept: Kept, batch: torch.Tensor) -> torch.Tensor:
    """The original model's logits with the pruned heads' contexts and neurons zeroed and the dropped
    layers made the identity."""
    cfg = model.cfg
    handles = []
    for i in range(cfg.num_layers):
        block = model.layers[str(i)]
        if i not in kept.layers:
            handles.append(block.register_forward_hook(lambda module, args, output: args[0]))
            continue
        j = kept.layers.index(i)
        head_mask = torch.zeros(cfg.num_heads, 1)
        head_mask[kept.heads[j]] = 1
        neuron_mask = torch.zeros(cfg.ffn_size)
        neuron_mask[kept.neurons[j]] = 1

        def heads(module, args, mask=head_mask):
            x = args[0]
            return (x.view(*x.shape[:-1], cfg.num_heads, -1) * mask).flatten(-2)

        handles += [
            block.attn.proj.register_forward_pre_hook(heads),
            block.mlp.fc_out.register_forward_pre_hook(lambda module, args, m=neuron_mask: args[0] * m),
        ]
    with torch.no_grad():
        logits = model(batch)
    for handle in handles:
        handle.remove()
    return logits


KEPT = Kept(layers=[0, 2], heads=[[1, 3], [0, 2]], neurons=[[0, 4, 5, 7, 11], [1, 2, 3, 6, 9]])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pruned_model_computes_the_original_without_the_pruned_units(layout):
    """In float64, where summing fewer terms in another order moves the logits by ~1e-15, not ~1e-6."""
    model = random_model(tiny(**LAYOUTS[layout])).double()
    cfg = pruned_config(model.cfg, KEPT)
    pruned = TransformerLM(cfg).double().eval()
    pruned.load_state_dict(prune_state(model.state_dict(), model.cfg, KEPT))
    ids = batches(model.cfg)[0]["input_ids"]
    with torch.no_grad():
        ours = pruned(ids)
    torch.testing.assert_close(ours, masked_original(model, KEPT, ids), rtol=0, atol=1e-10)


def test_pruned_config_and_parameter_count():
    before = tiny()  # h 16, 4 heads of 4, ffn 12, 3 layers
    after = pruned_config(before, KEPT)
    assert (after.num_layers, after.num_heads, after.attention_head_dim, after.ffn_hidden_size) == (
        2,
        2,
        4,
        5,
    )
    assert (after.head_dim, after.attention_width) == (4, 8)
    h = 16
    layer = 4 * h * h + 4 * h + 2 * h * 12 + 12 + h + 4 * h  # qkv, proj, fc_in, fc_out, 2 LayerNorms
    per_head = 3 * 4 * h + 3 * 4 + h * 4  # qkv rows and bias, proj columns
    per_neuron = 2 * h + 1
    count = lambda cfg: sum(p.numel() for p in TransformerLM(cfg).parameters())  # noqa: E731
    assert count(before) - count(after) == layer + 2 * (2 * per_head + 7 * per_neuron)
    assert after.non_embedding_params() == before.non_embedding_params() - layer - 2 * (
        2 * per_head + 7 * per_neuron
    )
    assert pruned_config(before, Kept([0, 1, 2], [[0, 1, 2, 3]] * 3, [list(range(12))] * 3)) == before


@pytest.fixture(scope="module")
def teacher(shards, tmp_path_factory):
    """A random model directory on the test shards' tokenizer."""
    root = tmp_path_factory.mktemp("prune")
    recipe = tiny_recipe(shards, root / "run")
    recipe["model"] |= {"hidden_size": 32, "ffn_hidden_size": 48, "num_layers": 3, "init_std": 0.2}
    recipe["data"]["seq_length"] = 32
    config = RunConfig.model_validate(recipe)
    model = random_model(config.model)
    return save_model_dir(
        root / "model", model.state_dict(), config, shards.parent / "tokenizer" / "tokenizer.model", {}
    )


def test_prune_command_writes_a_model_directory_that_exports(teacher, tmp_path, capsys):
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(teacher), "--output", str(out), "--heads", "0.5", "--ffn", "24"]
    assert main([*args, "--layers", "2", "--batches", "2", "--batch-size", "4"]) == 0
    assert "2 heads and 24 FFN neurons per layer" in capsys.readouterr().out
    model, cfg = load_local_model(out)  # a normal model directory
    assert (cfg.num_layers, cfg.num_heads, cfg.attention_head_dim, cfg.ffn_hidden_size) == (2, 2, 8, 24)
    assert load_run_config(out).data == load_run_config(teacher).data
    meta = load_meta(out)
    assert meta["parameters"]["after"] == sum(p.numel() for p in model.parameters())
    assert len(meta["kept_layers"]) == 2 and all(len(h) == 2 for h in meta["kept_heads"])
    scores = torch.tensor(meta["importance"]["layers"])
    assert sorted(meta["kept_layers"]) == sorted(scores.argsort(descending=True)[:2].tolist())
    assert (out / "tokenizer.model").read_bytes() == (teacher / "tokenizer.model").read_bytes()
    # transformers 5 has no pruned heads: the export adds the pruned ones back as zeros, exactly
    export = export_hf(out, tmp_path / "hf")
    hf, _ = load_hf_model(export)
    assert hf.config.num_attention_heads == 4 and hf.config.intermediate_size == 24
    assert logit_differences(model, hf)["token"] < 1e-5
    assert json.loads((export / "config.json").read_text())["num_hidden_layers"] == 2


def test_units_are_scored_on_the_training_split_unless_told(teacher, tmp_path):
    """The default scores on the training split, not on the valid split that `plmscale eval` reports."""

    def importance(*split: str) -> dict:
        out = tmp_path / "-".join(("pruned", *split))
        targets = ["--heads", "2", "--batches", "1", "--batch-size", "4", *split]
        assert main(["prune", "--model", str(teacher), "--output", str(out), *targets]) == 0
        return load_meta(out)["importance"]

    default, train, valid = importance(), importance("--split", "train"), importance("--split", "valid")
    assert (default["split"], valid["split"]) == ("train", "valid")
    assert default == train
    assert default["heads"] != valid["heads"]


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["--heads", "5"], "--heads 5: the model has 4 heads per layer"),
        (["--ffn", "49"], "--ffn 49: the model has 48 FFN neurons per layer"),
        (["--drop-layers", "0,1,2"], "--drop-layers drops all 3 layers"),
        (["--drop-layers", "3"], "--drop-layers [3]: the model's layers are 0..2"),
        (["--layers", "4"], "--layers 4: the model has 3 layers"),
        ([], "nothing to prune"),
    ],
)
def test_bad_targets_name_the_option(teacher, tmp_path, capsys, targets, message):
    assert main(["prune", "--model", str(teacher), "--output", str(tmp_path / "out"), *targets]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("targets", "option"), [(["--layers", "0"], "--layers"), (["--heads", "1.5"], "--heads")]
)
def test_targets_argparse_rejects(teacher, tmp_path, capsys, targets, option):
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--model", str(teacher), "--output", str(tmp_path / "out"), *targets])
    assert exit_.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_recovery_distillation_starts_from_the_pruned_model(teacher, tmp_path):
    """The pruned model's own config, with its unpruned self as teacher and itself as `train.init_from`,
    passes every pre-launch check; picking teacher layers to start from as well is refused."""
    out = tmp_path / "pruned"
    targets = ["--heads", "2", "--ffn", "24", "--drop-layers", "1", "--batches", "1", "--batch-size", "4"]
    assert main(["prune", "--model", str(teacher), "--output", str(out), *targets]) == 0
    recipe = load_run_config(out).model_dump(mode="json", exclude_none=True)
    recipe["distill"] = {"teacher": str(teacher)}
    recipe["train"] |= {"init_from": str(out), "output_dir": str(tmp_path / "recovered")}
    path = write_recipe(tmp_path / "recover.yaml", recipe)
    cfg = check_launch(path, command="distill", world_size=1)
    assert (cfg.model.num_layers, cfg.model.num_heads, cfg.model.attention_head_dim) == (2, 2, 8)
    with pytest.raises(ConfigError, match=r"distill\.student_layers .* train\.init_from"):
        check_launch(path, ["distill.student_layers=[0,2]"], command="distill", world_size=1)
