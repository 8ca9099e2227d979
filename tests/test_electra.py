"""ELECTRA: the generator's samples replace the masked tokens only, RTD labels follow the paper, no gradient
flows through the samples, the loss falls on the embedded corpus, the two exports compute plmscale's
logits, and bad combinations are refused naming the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_recipe, train_single_process, write_recipe
from test_export_hf import run_config

from plmscale.config import ConfigError, ModelConfig, RunConfig, load_config
from plmscale.data import BatchSource, PackedStream
from plmscale.eval.evaluate import evaluate
from plmscale.export.hf import export_hf, load_hf_model, logit_differences
from plmscale.model import Electra
from plmscale.model.electra import GeneratorMaskedLM
from plmscale.model_dir import load_local_model, save_model_dir
from plmscale.objectives import IGNORE_INDEX, get_objective
from plmscale.objectives.electra import replaced_labels
from plmscale.tokenizer import MASK_ID

CFG = ModelConfig(
    kind="encoder", vocab_size=2000, pad_vocab_to_multiple_of=64, hidden_size=64, num_layers=2, num_heads=4,
    max_position_embeddings=64, layernorm_position="post", embedding_layernorm=True,
    generator_hidden_fraction=0.25, hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip


def _batches(shards, shuffle=True):
    objective = get_objective("electra", {}, CFG)
    stream = PackedStream.from_manifest(shards, "train")
    return objective, BatchSource(stream, objective, 64, 8, 1, 0, 5, shuffle)


def test_generator_width_and_shared_embeddings():
    model = Electra(CFG)
    gen = CFG.generator_config()
    assert (gen.hidden_size, gen.num_heads, gen.ffn_size, gen.num_layers) == (16, 1, 64, 2)
    names = {name for name, _ in model.named_parameters()}
    assert not any("embeddings" in name for name in names if name.startswith("generator."))
    assert model.generator.project.weight.shape == (16, 64)
    assert model.generator.head.dense.weight.shape == (64, 16)


def test_samples_replace_the_masked_tokens_only(shards):
    objective, source = _batches(shards)
    batch = source.micro_batches(0, 1)[0]
    inputs = objective.model_inputs(batch)
    torch.manual_seed(0)
    model = Electra(CFG).eval()
    with torch.no_grad():
        generator_logits, rtd_logits, corrupted = model(**inputs)
        again = model(**inputs)[2]
        other = model(**(inputs | {"sample_seed": inputs["sample_seed"] + 1}))[2]
    masked = batch["labels"] != IGNORE_INDEX
    assert generator_logits.shape == (int(masked.sum()), CFG.padded_vocab_size) and rtd_logits.shape == (
        8,
        64,
    )
    assert torch.equal(corrupted[~masked], batch["input_ids"][~masked])
    assert (corrupted[masked] != MASK_ID).float().mean() > 0.9  # an untrained generator samples widely
    assert (corrupted < CFG.vocab_size).all()  # never a padding row of the embedding
    assert torch.equal(corrupted, again) and not torch.equal(corrupted, other)  # seeded by the batch


def test_sampling_follows_the_generator_softmax():
    model = Electra(CFG)
    logits = torch.zeros(4000, CFG.padded_vocab_size)
    logits[:, 7], logits[:, 9] = 3.0, 3.0 + np.log(3.0)  # p(9) = 3 p(7), the rest nearly never
    logits[:, CFG.vocab_size :] = 100.0  # padding rows: never drawn
    samples = model.sample(logits, seed=1)
    share = (samples == 9).sum().item() / ((samples == 7).sum().item() + (samples == 9).sum().item())
    assert share == pytest.approx(0.75, abs=0.03)
    assert torch.equal(samples, model.sample(logits, seed=1))


def test_rtd_labels_count_a_sample_equal_to_the_original_as_original():
    input_ids = torch.tensor([[2, 10, MASK_ID, 12, 13, 3, 0]])
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 2], labels[0, 3] = 11, 12  # position 3 was chosen but kept as it was (ELECTRA's 15 %)
    corrupted = torch.tensor([[2, 10, 11, 40, 13, 3, 0]])  # 2: sampled the original; 3: replaced
    labels_rtd = replaced_labels({"input_ids": input_ids, "labels": labels}, corrupted)
    assert labels_rtd.tolist() == [[0, 0, 0, 1, 0, 0, 0]]


def test_rtd_loss_covers_real_positions_and_no_gradient_reaches_the_generator_through_samples(shards):
    objective, source = _batches(shards)
    batch = source.micro_batches(0, 1)[0]
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][0, 40:] = 0
    torch.manual_seed(0)
    model = Electra(CFG)
    terms = objective.loss_terms(model(**objective.model_inputs(batch)), batch, model.spec, True)
    assert terms["rtd"].count == 8 * 64 - 24 == objective.target_counts(batch)["rtd"]
    assert terms["mlm"].count == int((batch["labels"] != IGNORE_INDEX).sum())
    terms["rtd"].sum.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is None for name, g in grads.items() if name.startswith("generator."))
    assert grads["discriminator.word_embeddings.weight"].abs().sum() > 0


def test_loss_falls_on_the_embedded_corpus(shards):
    objective, source = _batches(shards)
    torch.manual_seed(0)
    model = Electra(CFG)
    history = train_single_process(model, objective, source, steps=12)
    losses = [[terms[name][0] for name in ("mlm", "rtd")] for terms in history]
    first, last = np.mean(losses[:3], axis=0), np.mean(losses[-3:], axis=0)
    assert (last < first).all() and last[0] < first[0] - 0.5, losses


@pytest.fixture(scope="module")
def electra_dir(tmp_path_factory):
    from test_export_hf import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("electra")
    tokenizer = train_tiny_tokenizer(root)
    base = run_config("encoder", 400).model_dump(mode="json", exclude_none=True)
    base["model"] |= {
        "layernorm_position": "post",
        "embedding_layernorm": True,
        "generator_hidden_fraction": 0.5,
    }
    base["objective"] = {"name": "electra"}
    config = RunConfig.model_validate(base)
    torch.manual_seed(0)
    model = Electra(config.model)
    with torch.no_grad():  # biases and LayerNorms perturbed too, so no swapped weight hides
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                param.add_(0.1 * torch.randn_like(param))
    return root, save_model_dir(root / "model", model.state_dict(), config, tokenizer, {"step": 0})


def test_export_discriminator_and_generator_with_equal_logits(electra_dir):
    root, model_dir = electra_dir
    out = export_hf(model_dir, root / "hf")  # verifies both exports itself, or raises
    model, _ = load_local_model(model_dir)
    disc, _ = load_hf_model(out / "discriminator")
    gen, _ = load_hf_model(out / "generator")
    assert type(disc).__name__ == "ElectraForPreTraining" and type(gen).__name__ == "ElectraForMaskedLM"
    assert gen.config.hidden_size == 16 and gen.config.embedding_size == 32
    assert logit_differences(model.discriminator, disc)["token"] < 1e-5
    assert logit_differences(GeneratorMaskedLM(model), gen)["token"] < 1e-5


def test_held_out_generator_mlm_and_rtd_accuracy(electra_dir):
    root, model_dir = electra_dir
    # evaluate needs shards of the model's tokenizer: write the tiny tokenizer's held-out split
    from test_eval import write_shards

    write_shards(root / "shards", str(model_dir / "tokenizer.model"))
    result = evaluate(model_dir, root / "shards", batches=2, batch_size=2, seq_length=32)
    assert result["objective"] == "electra" and result["targets"] > 0
    assert 0 <= result["accuracy"] <= 1 and 0 < result["rtd_accuracy"] <= 1
    assert result["loss"] > result["loss/rtd"] > 0  # generator MLM + 50 x RTD, each a mean over its targets
    assert result["tokens"] == 2 * 2 * 32


def test_bad_combinations_are_refused_naming_the_key(shards, tmp_path):
    def rejected(model: dict, objective: str = "electra", **sections) -> str:
        recipe = tiny_recipe(shards, tmp_path / "out", model=model, objective={"name": objective}, **sections)
        with pytest.raises(ConfigError) as err:
            load_config(write_recipe(tmp_path / "r.yaml", recipe))
        return str(err.value)

    post = {"layernorm_position": "post", "embedding_layernorm": True}
    electra = post | {"generator_hidden_fraction": 0.25}
    assert "set model.generator_hidden_fraction" in rejected(post)
    assert "model.layernorm_position: post" in rejected({"generator_hidden_fraction": 0.25})
    assert "use objective electra" in rejected(electra, "mlm")
    zero1 = {"deepspeed_config": str(REPO / "ds_configs" / "zero1.json")}
    assert "parallel.pipeline_parallel=2 with model.generator_hidden_fraction" in rejected(
        electra, parallel={"pipeline_parallel": 2}, train=zero1
    )
    assert "must divide the generator's heads 1" in rejected(electra, parallel={"tensor_parallel": 2})
    assert "data.instances" in rejected(electra, data={"instances": str(tmp_path)})
    assert "model.generator_hidden_fraction" in rejected(electra, distill={"teacher": str(tmp_path)})
