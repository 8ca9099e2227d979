"""`plmscale import --format hf`: public-checkpoint layouts (BERT, Megatron-BERT, ALBERT, GPT-2) computed exactly,
HF -> plmscale -> HF bitwise, bad checkpoints refused with the key, and training from the imported weights
starting at transformers' loss at TP=1 and TP=2."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TEST_VOCAB, launch, read_metrics, tiny_recipe, write_recipe
from safetensors.torch import load_file, save_file
from transformers import (
    AlbertConfig,
    AlbertForMaskedLM,
    AlbertForPreTraining,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    GPT2Config,
    GPT2LMHeadModel,
    MegatronBertConfig,
    MegatronBertForMaskedLM,
    MegatronBertForPreTraining,
)

from plmscale import cli
from plmscale.config import ConfigError, ModelConfig, RunConfig, load_config
from plmscale.data import BatchSource, PackedStream
from plmscale.export.hf import export_hf, load_hf_model
from plmscale.export.hf_import import import_hf
from plmscale.export.hf_mapping import hf_config
from plmscale.model_dir import load_local_model, load_meta
from plmscale.objectives import IGNORE_INDEX, get_objective

BERT_SIZES = {
    "vocab_size": TEST_VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 48, "max_position_embeddings": 64, "initializer_range": 0.2,
}  # fmt: skip
GPT2_SIZES = {
    "vocab_size": TEST_VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
    "initializer_range": 0.2, "bos_token_id": 3, "eos_token_id": 3,
}  # fmt: skip
ALBERT_SIZES = BERT_SIZES | {"embedding_size": 16}  # activation gelu_new, one group: albert-base-v2's sharing
MODELS = {
    "bert": lambda: BertForMaskedLM(BertConfig(**BERT_SIZES)),
    "bert_pretraining": lambda: BertForPreTraining(BertConfig(**BERT_SIZES)),
    "megatron_bert": lambda: MegatronBertForMaskedLM(MegatronBertConfig(**BERT_SIZES)),
    "megatron_bert_pretraining": lambda: MegatronBertForPreTraining(MegatronBertConfig(**BERT_SIZES)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(**GPT2_SIZES)),  # activation gelu_new
    "albert": lambda: AlbertForMaskedLM(AlbertConfig(**ALBERT_SIZES)),
    "albert_pretraining": lambda: AlbertForPreTraining(
        AlbertConfig(**ALBERT_SIZES | {"num_hidden_layers": 4, "num_hidden_groups": 2})
    ),
}


def save_random_hf(name: str, directory, **config_changes):
    """A random tiny model with every tensor perturbed (LayerNorms and biases too), so that no swapped or
    misplaced weight can hide behind an initial value of 0 or 1."""
    torch.manual_seed(0)
    model = MODELS[name]()
    for key, value in config_changes.items():
        setattr(model.config, key, value)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=list(MODELS))
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = save_random_hf(request.param, root / "hf")
    import_hf(hf_dir, root / "model")
    return request.param, hf_dir, root / "model"


def test_imported_logits_equal_transformers(imported):
    name, hf_dir, model_dir = imported
    model, cfg = load_local_model(model_dir)
    hf, _ = load_hf_model(hf_dir)
    assert (cfg.layernorm_position, cfg.embedding_layernorm) == (
        ("post", True) if name.startswith(("bert", "albert")) else ("pre", False)
    )
    assert cfg.pair_head == name.endswith("pretraining")
    if name.startswith("albert"):  # layer i runs group i * G // L in both
        assert (cfg.embedding_size, cfg.layer_groups) == (16, hf.config.num_hidden_groups)
    input_ids = torch.randint(5, TEST_VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 15:] = 0
    attention_mask[2, 4:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if cfg.kind == "encoder":
        inputs["token_type_ids"] = (torch.arange(24) >= 10).long().expand(3, 24)
    with torch.inference_mode():
        ours = model(**inputs, classify_pair=cfg.pair_head)
        out = hf(**inputs)
    if cfg.pair_head:
        pair = out.sop_logits if name.startswith("albert") else out.seq_relationship_logits
        torch.testing.assert_close(ours[1], pair, rtol=0, atol=1e-5)
        ours = ours[0]
    theirs = out.prediction_logits if "prediction_logits" in out else out.logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    print(f"{name}: max |logit difference| {(ours - theirs).abs().max().item():.2e}")
    assert load_meta(model_dir)["imported"]["architecture"] == type(hf).__name__


def test_round_trip_is_bitwise(imported, tmp_path):
    name, hf_dir, model_dir = imported
    back = export_hf(model_dir, tmp_path / "back")
    original, returned = (
        load_file(str(hf_dir / "model.safetensors")),
        load_file(str(back / "model.safetensors")),
    )
    assert sorted(original) == sorted(returned)
    for key, tensor in original.items():
        assert returned[key].dtype == tensor.dtype and torch.equal(returned[key], tensor), key
    (hf, _), (hf_back, _) = load_hf_model(hf_dir), load_hf_model(back)
    assert type(hf_back) is type(hf)  # the same class, so the same modules: the config is what may differ
    input_ids = torch.randint(5, TEST_VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        # GPT-2's gelu_new returns as gelu_pytorch_tanh, the same function rounded differently
        torch.testing.assert_close(hf_back(input_ids)[0], hf(input_ids)[0], rtol=0, atol=1e-5)


def test_tokenizer_sets_the_vocabulary_and_ships(shards, tmp_path):
    tokenizer = shards.parent / "tokenizer" / "tokenizer.model"
    hf_dir = save_random_hf("megatron_bert", tmp_path / "hf")
    import_hf(hf_dir, tmp_path / "model", tokenizer)
    cfg = load_local_model(tmp_path / "model")[1]
    assert (cfg.vocab_size, cfg.padded_vocab_size) == (TEST_VOCAB, TEST_VOCAB)
    assert (tmp_path / "model" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    # A checkpoint padded past the tokenizer (2048 rows for 2000 pieces) keeps its rows.
    wide = MegatronBertForMaskedLM(MegatronBertConfig(**BERT_SIZES | {"vocab_size": 2048}))
    wide.save_pretrained(tmp_path / "wide")
    import_hf(tmp_path / "wide", tmp_path / "wide_model", tokenizer)
    cfg = load_local_model(tmp_path / "wide_model")[1]
    assert (cfg.vocab_size, cfg.pad_vocab_to_multiple_of, cfg.padded_vocab_size) == (TEST_VOCAB, 128, 2048)


def test_model_directory_config_is_a_valid_recipe(imported):
    _, _, model_dir = imported
    config = load_config(model_dir / "config.yaml")
    assert config.model == load_local_model(model_dir)[1]


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("bert", {"hidden_act": "relu"}, "hidden_act='relu'"),
        ("gpt2", {"tie_word_embeddings": False}, "tie_word_embeddings=False"),
        ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ("albert", {"inner_group_num": 2}, "inner_group_num=2"),
        ("albert_pretraining", {"num_hidden_groups": 3}, "num_hidden_groups=3"),  # of 4 layers
    ],
)
def test_unrepresentable_configs_are_refused(name, changes, message, tmp_path, capsys):
    hf_dir = save_random_hf(name, tmp_path / "hf", **changes)
    args = ["import", "--format", "hf", "--input", str(hf_dir), "--output", str(tmp_path / "model")]
    capsys.readouterr()  # save_pretrained's progress bar
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"plmscale: error: {hf_dir / 'config.json'}: {message}") and err.count("\n") == 1
    assert not (tmp_path / "model").exists()


def test_missing_weights_are_refused(tmp_path):
    hf_dir = save_random_hf("bert", tmp_path / "hf")
    weights = load_file(str(hf_dir / "model.safetensors"))
    del weights["bert.encoder.layer.1.output.dense.weight"]
    save_file(weights, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"missing.*bert\.encoder\.layer\.1\.output\.dense\.weight"):
        import_hf(hf_dir, tmp_path / "model")


def test_albert_without_its_sop_classifier_gets_one_initialized(tmp_path, capsys):
    """The hub's ALBERTs ship their pooler but no SOP classifier: the pair head imports with the classifier
    transformers initializes (the same on every import), said so; every tensor of the checkpoint exports back."""
    hf_dir = save_random_hf("albert_pretraining", tmp_path / "hf")
    weights = load_file(str(hf_dir / "model.safetensors"))
    classifier = ["sop_classifier.classifier.bias", "sop_classifier.classifier.weight"]
    save_file({k: v for k, v in weights.items() if k not in classifier}, str(hf_dir / "model.safetensors"))
    for model in ("model", "again"):
        args = ["import", "--format", "hf", "--input", str(hf_dir), "--output", str(tmp_path / model)]
        assert cli.main(args) == 0
    assert capsys.readouterr().out.endswith(f"initialized as transformers does: {', '.join(classifier)}\n")
    assert load_meta(tmp_path / "model")["imported"]["initialized"] == classifier
    imported, again = (load_file(str(tmp_path / m / "model.safetensors")) for m in ("model", "again"))
    assert load_local_model(tmp_path / "model")[1].pair_head
    assert all(torch.equal(imported[k], again[k]) for k in imported)
    back = load_file(str(export_hf(tmp_path / "model", tmp_path / "back") / "model.safetensors"))
    assert sorted(back) == sorted(weights)
    assert all(torch.equal(back[k], v) for k, v in weights.items() if k not in classifier)


def test_new_model_options_keep_old_configs_identical():
    """Configs and checkpoints written before the layout options existed dump and compare the same."""
    old = {
        "kind": "encoder", "vocab_size": 2000, "pad_vocab_to_multiple_of": 128, "hidden_size": 64, "num_layers": 2,
        "num_heads": 4, "ffn_hidden_size": None, "max_position_embeddings": 64, "type_vocab_size": 2,
        "layernorm_eps": 1e-5, "hidden_dropout": 0.1, "attention_dropout": 0.1, "init_std": 0.02,
    }  # fmt: skip
    assert ModelConfig.model_validate(old).model_dump(mode="json") == old
    assert (
        "init_from"
        not in RunConfig.model_validate(tiny_recipe(Path("shards"), Path("run"))).model_dump()["train"]
    )


def test_export_refuses_a_layout_without_a_transformers_class():
    cfg = ModelConfig(
        kind="decoder", vocab_size=100, hidden_size=32, num_layers=1, num_heads=4,
        max_position_embeddings=16, layernorm_position="post",
    )  # fmt: skip
    with pytest.raises(ValueError, match="layernorm_position=post .* has no transformers architecture"):
        hf_config(cfg)


def test_init_from_must_match_the_model(imported, shards, tmp_path):
    name, _, model_dir = imported
    recipe = yaml.safe_load((model_dir / "config.yaml").read_text())
    recipe["train"]["init_from"] = str(model_dir)
    layers = recipe["model"]["num_layers"]
    recipe["model"]["num_layers"] = 2 * layers  # still a multiple of ALBERT's layer groups
    with pytest.raises(
        ConfigError, match=rf"model\.num_layers={2 * layers} but train\.init_from=.* has {layers}"
    ):
        load_config(write_recipe(tmp_path / "r.yaml", recipe))


def first_batch_loss(hf_dir, shards, recipe: dict) -> float:
    """transformers' loss on the batch of step 0 (one process per data-parallel group of 1)."""
    cfg = RunConfig.model_validate(recipe)
    objective = get_objective(cfg.objective.name, cfg.objective.params, cfg.model)
    stream = PackedStream.from_manifest(str(shards), "train", verify=False)
    t = cfg.train
    order = BatchSource(stream, objective, cfg.data.seq_length, t.micro_batch_size, 1, 0, t.seed, True)
    (batch,) = order.micro_batches(0, 1)
    hf, _ = load_hf_model(hf_dir)
    with torch.inference_mode():
        logits = hf(input_ids=batch["input_ids"]).logits
    labels = batch["labels"]  # causal_lm's are already shifted: position i predicts labels[i]
    targets = labels != IGNORE_INDEX
    return F.cross_entropy(logits[targets], labels[targets]).item()


@pytest.mark.distributed
@pytest.mark.parametrize(("name", "tp"), [("bert", 1), ("bert", 2), ("gpt2", 2)])
def test_training_from_imported_weights_starts_at_transformers_loss(name, tp, shards, tmp_path):
    hf_dir = save_random_hf(name, tmp_path / "hf")
    model_dir = tmp_path / "model"
    import_hf(hf_dir, model_dir, shards.parent / "tokenizer" / "tokenizer.model")
    model = yaml.safe_load((model_dir / "config.yaml").read_text())["model"]
    model |= {"hidden_dropout": 0.0, "attention_dropout": 0.0}
    recipe = tiny_recipe(
        shards, tmp_path / "run", model["kind"],
        data={"seq_length": 32}, parallel={"tensor_parallel": tp},
        train={"micro_batch_size": 4, "global_batch_size": 4, "train_steps": 1, "init_from": str(model_dir),
               "deepspeed_config": "ds_configs/zero1.json"},
    )  # fmt: skip
    recipe["model"] = model
    launch(write_recipe(tmp_path / "r.yaml", recipe), nprocs=tp)
    loss = read_metrics(tmp_path / "run")[1]["loss"]
    expected = first_batch_loss(hf_dir, shards, recipe)
    print(f"{name} TP={tp}: first-step loss {loss:.8f}, transformers {expected:.8f}")
    assert loss == pytest.approx(expected, rel=1e-5)
    assert json.loads((tmp_path / "run" / "model" / "meta.json").read_text())["step"] == 1
