"""ALBERT and RoBERTa on the shared trunk: n-gram masking (offline and on the fly), the factorized embedding,
cross-layer sharing, their Hugging Face exports with equal logits, and the combinations refused."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from conftest import tiny_recipe, write_recipe
from pydantic import ValidationError
from safetensors.torch import load_file

from data_prep.instances.build import build_instances
from plmscale.config import ConfigError, ModelConfig, RunConfig, load_config
from plmscale.data import InstanceSet
from plmscale.data.masking import PRESETS, Masker, word_start_table
from plmscale.export.hf import export_hf, load_hf_model, logit_differences
from plmscale.export.hf_import import import_hf
from plmscale.export.hf_mapping import hf_config
from plmscale.model import TransformerLM
from plmscale.model_dir import save_model_dir
from plmscale.objectives import IGNORE_INDEX, get_objective
from plmscale.plan.estimate import parameter_count
from plmscale.tokenizer import CLS_ID, MASK_ID, SEP_ID, Tokenizer

VOCAB = 1000
NGRAM_SHARES = np.array([1, 1 / 2, 1 / 3]) / (1 + 1 / 2 + 1 / 3)  # p(n) ~ 1/n, n <= 3: 6/11, 3/11, 2/11
BERT_LAYOUT = {"kind": "encoder", "layernorm_position": "post", "embedding_layernorm": True}


def tiny(**fields) -> ModelConfig:
    base = {
        **BERT_LAYOUT, "vocab_size": 300, "hidden_size": 32, "num_layers": 4, "num_heads": 4,
        "ffn_hidden_size": 48, "max_position_embeddings": 64, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "init_std": 0.2,  # peaked attention, so a query/key mix-up changes the logits
    }  # fmt: skip
    return ModelConfig(**(base | fields))


def albert(**fields) -> ModelConfig:
    return tiny(
        **({"embedding_size": 16, "layer_groups": 2, "pair_head": True, "activation": "gelu_tanh"} | fields)
    )


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def words_per_unit(spans: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.array([starts[s:e].sum() for s, e in spans], dtype=np.int64)


def test_ngram_masking_follows_albert():
    """Units of n whole words, n <= 3 with p(n) ~ 1/n, 15 % of the positions, one 80/10/10 draw per unit."""
    masker, rng = Masker(PRESETS["ngram"], VOCAB), np.random.default_rng(11)
    lengths, chosen, total = np.zeros(4, dtype=np.int64), 0, 0
    for _ in range(30):
        n = 4096
        tokens = np.concatenate([[CLS_ID], rng.integers(5, VOCAB, n - 2), [SEP_ID]])
        starts = rng.random(n) < 0.7
        starts[[0, 1, -1]] = True
        masked = masker.mask(tokens, rng, word_starts=starts)
        spans = masked.spans
        assert (masked.labels == tokens[masked.positions]).all()
        assert starts[spans[:, 0]].all()  # a unit begins a word ...
        cut = ~starts[spans[:, 1]]
        assert cut.sum() <= 1  # ... and ends one, but for the unit that met the budget
        for start, end in spans:
            ids = masked.input_ids[start:end]
            assert (ids == MASK_ID).all() or (ids != MASK_ID).all()
        lengths += np.bincount(words_per_unit(spans[~cut], starts), minlength=4)
        chosen, total = chosen + len(masked.positions), total + n
    assert chosen / total == pytest.approx(0.15, abs=0.001)
    assert lengths[0] == 0 and len(lengths) == 4  # 1 to 3 words
    assert lengths[1:] / lengths.sum() == pytest.approx(NGRAM_SHARES, abs=0.015)


def test_ngram_preset_serves_instances_and_the_objective(shards, tmp_path):
    """`prep instances --param masking=ngram` and the `mlm` objective's `unit: ngram` are the same masker,
    n-grams of SentencePiece words."""
    tokenizer = shards.parent / "tokenizer" / "tokenizer.model"
    word_start = word_start_table(Tokenizer(tokenizer))
    build_instances(
        shards, "sop", tmp_path, params={"max_seq_length": 64, "masking": "ngram"}, progress=False
    )
    instances, units = InstanceSet(tmp_path), []
    for i in range(len(instances)):
        item = instances[i]
        tokens = item["tokens"].astype(np.int64)
        tokens[item["mask_positions"]] = item["mask_labels"]
        starts = word_start[tokens]
        starts[1:] |= tokens[:-1] < 5  # a word begins after a special: a segment may start inside one
        spans = item["spans"].reshape(-1, 2).astype(np.int64)
        assert starts[spans[:, 0]].all()
        units.append(words_per_unit(spans, starts))
    units = np.concatenate(units)
    assert units.min() == 1 and units.max() == 3
    assert np.mean(units > 1) > 0.3  # short sequences cut more units at the budget than the 45 % above

    cfg = tiny(vocab_size=Tokenizer(tokenizer).vocab_size)
    objective = get_objective("mlm_sop", {"unit": "ngram", "tokenizer": str(tokenizer)}, albert())
    assert objective.masker.config == PRESETS["ngram"]
    stream = np.random.default_rng(0).integers(5, cfg.vocab_size, 62)
    example = get_objective("mlm", {"unit": "ngram", "tokenizer": str(tokenizer)}, cfg).make_example(
        stream, np.random.default_rng(1)
    )
    targets = np.flatnonzero(example["labels"] != IGNORE_INDEX)
    assert len(targets) == round(64 * 0.15)
    assert (example["labels"][targets] == np.concatenate([[CLS_ID], stream, [SEP_ID]])[targets]).all()


def test_factorized_embedding_shapes_and_parameter_count():
    cfg = albert(layer_groups=None)
    model = TransformerLM(cfg)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    v = cfg.padded_vocab_size
    assert shapes["word_embeddings.weight"] == (v, 16) and shapes["position_embeddings.weight"] == (64, 16)
    assert shapes["token_type_embeddings.weight"] == (2, 16) and shapes["embedding_ln.weight"] == (16,)
    assert shapes["embedding_projection.weight"] == (32, 16)  # E -> H
    assert shapes["head.dense.weight"] == (16, 32) and shapes["head.ln.weight"] == (16,)  # H -> E
    assert parameter_count(cfg) == count(model)
    logits, pair = model(torch.randint(5, 300, (2, 8)), classify_pair=True)
    assert logits.shape == (2, 8, v) and pair.shape == (2, 2)


def test_shared_layers_are_one_module_run_in_turn():
    """4 layers in 2 groups: 2 blocks of parameters; the network equals an unshared one whose layers 0, 1
    hold group 0's weights and 2, 3 group 1's, and a shared weight's gradient is the sum of theirs."""
    cfg, unshared_cfg = albert(), albert(layer_groups=None)
    shared, unshared = TransformerLM(cfg), TransformerLM(unshared_cfg)
    assert sorted(shared.layers) == ["0", "1"]
    block = count(shared.layers["0"])
    assert count(unshared) - count(shared) == 2 * block
    assert parameter_count(cfg) == count(shared)
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("layers.")}
    for layer in range(4):
        group = shared.layers[str(cfg.layer_group(layer))]
        state |= {f"layers.{layer}.{k}": v.clone() for k, v in group.state_dict().items()}
    unshared.load_state_dict(state)

    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 300, (2, 12), generator=gen)
    outputs = {}
    for name, model in (("shared", shared), ("unshared", unshared)):
        logits, pair = model(input_ids, classify_pair=True)
        (logits.logsumexp(-1).mean() + pair.logsumexp(-1).mean()).backward()
        outputs[name] = logits.detach()
    assert torch.equal(outputs["shared"], outputs["unshared"])
    for group, layers in ((0, (0, 1)), (1, (2, 3))):
        for name, param in shared.layers[str(group)].named_parameters():
            summed = sum(dict(unshared.layers[str(i)].named_parameters())[name].grad for i in layers)
            torch.testing.assert_close(param.grad, summed, rtol=1e-5, atol=1e-7)
            assert param.grad.abs().max() > 0


def export(tmp_path, cfg: ModelConfig, family: str | None = None):
    """Save a randomly initialized model directory, export it (which checks logits itself), reload it."""
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    run = RunConfig.model_validate(
        {
            "model": cfg,
            "data": {"shards": "unused", "seq_length": 32},
            "objective": {"name": "mlm"},
            "optimizer": {"lr": 1e-3, "warmup_steps": 1},
            "train": {"deepspeed_config": "ds_configs/zero1.json", "micro_batch_size": 2,
                      "global_batch_size": 2, "train_steps": 1, "output_dir": "unused"},
        }
    )  # fmt: skip
    save_model_dir(tmp_path / "model", model.state_dict(), run, None, {"step": 0, "tokens": 0})
    export_hf(tmp_path / "model", tmp_path / "hf", family)
    hf, info = load_hf_model(tmp_path / "hf")
    assert not any(info.values())
    return model, hf


def test_albert_exports_as_albert_for_pretraining_and_imports_back(tmp_path):
    model, hf = export(tmp_path, albert())
    assert type(hf).__name__ == "AlbertForPreTraining"
    assert (hf.config.embedding_size, hf.config.num_hidden_groups, hf.config.num_hidden_layers) == (16, 2, 4)
    assert count(hf) == count(model)  # the groups stay shared in transformers too
    differences = logit_differences(model, hf)
    assert differences["token"] < 1e-5 and differences["pair"] < 1e-5
    meta = import_hf(tmp_path / "hf", tmp_path / "imported")  # and back, every tensor bit for bit
    assert meta["imported"]["architecture"] == "AlbertForPreTraining" and not meta["imported"]["initialized"]
    back = load_file(str(tmp_path / "imported" / "model.safetensors"))
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_roberta_exports_as_roberta_and_imports_back(tmp_path):
    cfg = tiny(type_vocab_size=1)
    model, hf = export(tmp_path, cfg, "Roberta")
    assert type(hf).__name__ == "RobertaForMaskedLM"
    # positions start after the padding id ([PAD] = 0): one row in front of plmscale's 64
    assert hf.config.max_position_embeddings == 65 and hf.config.pad_token_id == 0
    assert logit_differences(model, hf)["token"] < 1e-5
    meta = import_hf(tmp_path / "hf", tmp_path / "imported")
    assert meta["imported"]["architecture"] == "RobertaForMaskedLM"
    back = load_file(str(tmp_path / "imported" / "model.safetensors"))
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_bad_combinations_name_the_key(shards, tmp_path):
    for fields, key in (
        ({"embedding_size": 64}, "model.embedding_size=64 exceeds model.hidden_size=32"),
        ({"layer_groups": 3}, "model.layer_groups=3 must divide model.num_layers=4"),
        ({"kind": "decoder", "embedding_size": 16}, "model.embedding_size (factorized embedding) needs"),
    ):
        with pytest.raises(ValidationError, match=key.replace("(", r"\(").replace(")", r"\)")):
            tiny(**fields)
    recipe = tiny_recipe(shards, tmp_path / "out", parallel={"pipeline_parallel": 2},
                         train={"deepspeed_config": "ds_configs/zero1.json"})  # fmt: skip
    recipe["model"] |= {"num_layers": 4, "layer_groups": 2}
    with pytest.raises(ConfigError, match="parallel.pipeline_parallel=2 with model.layer_groups=2"):
        load_config(write_recipe(tmp_path / "pp.yaml", recipe))
    with pytest.raises(ValueError, match="model.embedding_size / model.layer_groups export as ALBERT"):
        hf_config(tiny(layer_groups=2))  # sharing without ALBERT's embedding projection
    with pytest.raises(ValueError, match="RoBERTa has no pair head"):
        hf_config(tiny(pair_head=True), "Roberta")
    with pytest.raises(ValueError, match="exports as Albert, not Roberta"):
        hf_config(albert(pair_head=False), "Roberta")
