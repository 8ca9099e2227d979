"""`plmscale generate` and `plmscale fill-mask`: the sampling rules on exact distributions, and tiny models
trained here to memorize four sentences, so every answer (its words, its spaces, where it stops) is known.
The same models' exports give the same answers, in plmscale and in transformers' pipelines."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys
from importlib.metadata import version

import pytest
import torch
import torch.nn.functional as F
from test_export_hf import make_model_dir, train_tiny_tokenizer
from transformers import pipeline

from plmscale.cli import main
from plmscale.config import REPO_ROOT, RunConfig
from plmscale.errors import UserError
from plmscale.export.hf import export_hf
from plmscale.inference.fill_mask import NEVER_PREDICTED, fill_mask
from plmscale.inference.generate import Sampling, generate, next_tokens, sampling_probabilities
from plmscale.inference.model import load_language_model
from plmscale.model import TransformerLM
from plmscale.model_dir import save_model_dir
from plmscale.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, Tokenizer

SENTENCES = [
    "Return the absolute value of the argument.",
    "Create a new list of the items in the dictionary.",
    "Raise an error if the file is not found.",
    "Open the file and return a stream.",
]
PROMPTS = ["Return the absolute", "Open the file", "Raise an", "Create a new list of the"]
FILLS = {  # text -> the memorized answers, in mask order, and the sentence they complete
    "Return the absolute value [MASK] the argument.": (["of"], SENTENCES[0]),
    "Open the [MASK] and return a stream.": (["file"], SENTENCES[3]),
    "Raise an error [MASK] the file [MASK] not found.": (["if", "is"], SENTENCES[2]),
}


def tiny_config(kind: str, vocab_size: int) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {
                "kind": kind, "vocab_size": vocab_size, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                "max_position_embeddings": 40, "hidden_dropout": 0.0, "attention_dropout": 0.0,
            },
            "data": {"shards": "unused", "seq_length": 40},
            "objective": {"name": "mlm" if kind == "encoder" else "causal_lm"},
            "optimizer": {"lr": 2e-3, "warmup_steps": 0},
            "train": {
                "deepspeed_config": str(REPO_ROOT / "ds_configs" / "zero0.json"), "micro_batch_size": 4,
                "global_batch_size": 4, "train_steps": 400, "output_dir": "unused",
            },
        }
    )  # fmt: skip


def memorize(kind: str, tokenizer: Tokenizer) -> tuple[TransformerLM, RunConfig]:
    """Full-batch Adam on the four sentences laid out as in training: [SEP] text [SEP] for the decoder (a
    document after the stream's separator), [CLS] text [SEP] with a fifth of the tokens masked for the
    encoder."""
    config = tiny_config(kind, tokenizer.vocab_size)
    torch.manual_seed(0)
    model = TransformerLM(config.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optimizer.lr)
    first = SEP_ID if kind == "decoder" else CLS_ID
    rows = [[first, *ids, SEP_ID] for ids in tokenizer.encode(SENTENCES)]
    width = max(map(len, rows))
    batch = torch.tensor([row + [PAD_ID] * (width - len(row)) for row in rows])
    generator = torch.Generator().manual_seed(0)
    for _ in range(config.train.train_steps):
        if kind == "decoder":
            logits, labels = model(batch[:, :-1]), batch[:, 1:]
        else:
            text = (batch != PAD_ID) & (batch != CLS_ID) & (batch != SEP_ID)
            masked = text & (torch.rand(batch.shape, generator=generator) < 0.2)
            logits = model(batch.masked_fill(masked, MASK_ID), attention_mask=(batch != PAD_ID).long())
            labels = batch.masked_fill(~masked, PAD_ID)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=PAD_ID)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, config


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def trained(tokenizer_path, tmp_path_factory) -> dict:
    """{kind: (model directory, its Hugging Face export)} of the memorizing models."""
    root, dirs = tmp_path_factory.mktemp("trained"), {}
    for kind in ("decoder", "encoder"):
        model, config = memorize(kind, Tokenizer(tokenizer_path))
        model_dir = save_model_dir(root / kind, model.state_dict(), config, tokenizer_path, {"step": 400})
        dirs[kind] = (model_dir, export_hf(model_dir, root / f"{kind}_hf"))
    return dirs


@pytest.fixture(scope="module")
def random_decoder(tokenizer_path, tmp_path_factory):
    """An untrained decoder: spread-out distributions, where the sampling rules make a difference."""
    root = tmp_path_factory.mktemp("random")
    model_dir = make_model_dir(root / "model", "decoder", tokenizer_path)
    return model_dir, export_hf(model_dir, root / "hf")


def random_logits(batch: int = 3, vocab: int = 400) -> torch.Tensor:
    return 2.0 * torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0))


def test_temperature_divides_the_logits():
    logits = random_logits()
    entropies = []
    for temperature in (0.5, 1.0, 2.0):
        probs = sampling_probabilities(logits, Sampling("sample", temperature=temperature))
        torch.testing.assert_close(probs, (logits / temperature).softmax(-1))
        entropies.append(-(probs * probs.log()).sum(-1))
    assert (entropies[0] < entropies[1]).all() and (entropies[1] < entropies[2]).all()


@pytest.mark.parametrize("top_k", [1, 5, 50])
def test_top_k_keeps_exactly_the_k_most_probable(top_k):
    logits = random_logits()
    probs = sampling_probabilities(logits, Sampling("sample", top_k=top_k))
    kept = probs > 0
    assert (kept.sum(-1) == top_k).all()
    assert kept.gather(-1, logits.topk(top_k).indices).all()
    torch.testing.assert_close(probs[kept], logits.masked_fill(~kept, float("-inf")).softmax(-1)[kept])


@pytest.mark.parametrize("top_p", [1e-9, 0.3, 0.9, 0.999, 1.0])
def test_top_p_keeps_the_smallest_set_that_reaches_p(top_p):
    logits = random_logits()
    full = logits.softmax(-1)
    probs = sampling_probabilities(logits, Sampling("sample", top_p=top_p))
    for row_full, row in zip(full, probs, strict=True):
        kept = row > 0
        mass = row_full[kept].sum().item()
        assert mass >= min(top_p, 1.0 - 1e-6)
        assert mass - row_full[kept].min().item() < top_p  # one token fewer would not reach p
        assert row_full[kept].min() >= torch.cat([row_full[~kept], torch.zeros(1)]).max()  # the most probable
        torch.testing.assert_close(row[kept], row_full[kept] / mass)
    if top_p == 1e-9:
        assert ((probs > 0).sum(-1) == 1).all() and (probs.argmax(-1) == logits.argmax(-1)).all()
    if top_p == 1.0:
        torch.testing.assert_close(probs, full)


def test_draws_follow_the_cut_distribution_and_never_leave_it():
    logits = random_logits(batch=1, vocab=50)
    sampling = Sampling("sample", temperature=1.5, top_k=10, top_p=0.8)
    probs = sampling_probabilities(logits, sampling)[0]
    draws = next_tokens(logits.expand(20000, -1), sampling, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=50).float() / len(draws)
    assert (counts[probs == 0] == 0).all()
    assert (counts - probs).abs().max() < 0.015


def test_sampling_settings_are_checked():
    for bad in (
        dict(strategy="greedy", top_k=5),
        dict(strategy="greedy", temperature=0.7),
        dict(strategy="sample", temperature=0.0),
        dict(strategy="sample", top_p=0.0),
        dict(strategy="sample", top_p=1.5),
        dict(strategy="sample", top_k=-1),
        dict(strategy="beam"),
    ):
        with pytest.raises(UserError):
            Sampling(**bad)


@pytest.mark.parametrize("source", ["model_dir", "export"])
def test_greedy_continues_the_memorized_sentences(trained, source):
    lm = load_language_model(trained["decoder"][source == "export"])
    for prompt, sentence in zip(
        PROMPTS, [SENTENCES[0], SENTENCES[3], SENTENCES[2], SENTENCES[1]], strict=True
    ):
        (out,) = generate(lm, prompt, max_new_tokens=30)
        assert out.text == sentence and out.ended  # spaced as written, and the [SEP] closed it
        assert out.continuation == sentence[len(prompt) :]
    assert generate(lm, "", max_new_tokens=30)[0].text in SENTENCES  # from the start of a document
    (cut,) = generate(lm, "Return the absolute", max_new_tokens=3)
    assert len(cut.token_ids) == 3 and not cut.ended and SENTENCES[0].startswith(cut.text)


def test_sampling_with_top_k_1_or_a_tiny_top_p_is_greedy(random_decoder):
    lm = load_language_model(random_decoder[0])
    (greedy,) = generate(lm, "Return the", max_new_tokens=12)
    for seed in range(4):
        for sampling in (Sampling("sample", top_k=1), Sampling("sample", top_p=1e-9, temperature=3.0)):
            (out,) = generate(lm, "Return the", 12, sampling, seed=seed)
            assert out.token_ids == greedy.token_ids
    sampled = [
        generate(lm, "Return the", 12, Sampling("sample"), seed=seed)[0].token_ids for seed in range(4)
    ]
    assert sampled[0] == generate(lm, "Return the", 12, Sampling("sample"), seed=0)[0].token_ids
    assert len({tuple(ids) for ids in sampled}) == 4
    batch = generate(lm, "Return the", 12, Sampling("sample"), seed=0, num_return_sequences=3)
    assert len({tuple(out.token_ids) for out in batch}) == 3


def test_generation_slides_its_window_past_max_positions(random_decoder, tokenizer_path):
    lm = load_language_model(random_decoder[0])
    prompt = " ".join(SENTENCES * 3)
    assert len(Tokenizer(tokenizer_path).encode([prompt])[0]) > lm.max_positions
    (out,) = generate(lm, prompt, max_new_tokens=8, sampling=Sampling("sample", top_k=20), seed=1)
    assert 0 < len(out.token_ids) <= 8 and out.text.startswith(prompt)


def test_the_export_generates_what_the_model_directory_generates(random_decoder):
    ours, theirs = (load_language_model(path) for path in random_decoder)
    for sampling in (Sampling(), Sampling("sample", temperature=1.3, top_k=50, top_p=0.95)):
        a = generate(ours, "Open the file", 16, sampling, seed=3, num_return_sequences=2)
        b = generate(theirs, "Open the file", 16, sampling, seed=3, num_return_sequences=2)
        assert [out.token_ids for out in a] == [out.token_ids for out in b]


@pytest.mark.parametrize("source", ["model_dir", "export"])
def test_fill_mask_fills_the_memorized_words(trained, source):
    lm = load_language_model(trained["encoder"][source == "export"])
    for text, (answers, sentence) in FILLS.items():
        result = fill_mask(lm, text, top_k=4)
        assert [masks[0].token for masks in result.candidates] == answers
        assert result.text == sentence
        for masks in result.candidates:
            probabilities = [c.probability for c in masks]
            assert len(masks) == 4 and probabilities == sorted(probabilities, reverse=True)
            assert probabilities[0] > 0.5 and sum(probabilities) <= 1.0 + 1e-6
            assert not {c.token_id for c in masks} & set(NEVER_PREDICTED)


def test_exports_in_transformers_pipelines_are_spaced(trained):
    generator = pipeline("text-generation", model=str(trained["decoder"][1]))
    out = generator("Return the absolute", do_sample=False, max_new_tokens=30)
    assert out[0]["generated_text"] == SENTENCES[0]
    filler = pipeline("fill-mask", model=str(trained["encoder"][1]), top_k=2)
    text = "Return the absolute value [MASK] the argument."
    best = filler(text)[0]
    assert (best["token_str"], best["sequence"]) == ("of", SENTENCES[0])
    ours = fill_mask(load_language_model(trained["encoder"][0]), text).candidates[0][0]
    # transformers' softmax also gives a little mass to the padding rows of the embedding, never a token
    assert best["token"] == ours.token_id and best["score"] == pytest.approx(ours.probability, abs=1e-3)


def test_cli_commands_print_the_answers_and_refuse_mistakes(trained, capsys):
    decoder, encoder = trained["decoder"][0], trained["encoder"][0]
    assert main(["generate", "--model", str(decoder), "--prompt", "Return the absolute"]) == 0
    assert capsys.readouterr().out == SENTENCES[0] + "\n"
    assert main(["fill-mask", "--model", str(encoder), "--text", next(iter(FILLS)), "--top-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[MASK] 1:" and out[1].endswith("'of'") and out[-1] == f"filled: {SENTENCES[0]}"
    for argv, message in (
        (["fill-mask", "--model", str(decoder), "--text", "a [MASK]"], "fill-mask needs an encoder"),
        (["generate", "--model", str(encoder), "--prompt", "a"], "generate needs a decoder"),
        (["fill-mask", "--model", str(encoder), "--text", "no mask"], "no [MASK] in the text"),
        (["generate", "--model", str(decoder), "--prompt", "a", "--top-k", "5"], "with strategy sample"),
        (["generate", "--model", str(decoder.parent), "--prompt", "a"], "neither a plmscale model directory"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("plmscale: error: ") and message in err and len(err.splitlines()) == 1


def test_python_m_plmscale_in_a_fresh_process(trained):
    """Also a process that never seeded torch, whose random initial seed the model's init must accept."""
    run = subprocess.run([sys.executable, "-m", "plmscale", "--version"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout == f"plmscale {version('plmscale')}\n"
    model, text = str(trained["encoder"][0]), next(iter(FILLS))
    argv = [sys.executable, "-m", "plmscale", "fill-mask", "--model", model, "--text", text]
    run = subprocess.run(argv, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.endswith(f"filled: {SENTENCES[0]}\n"), run.stderr[-2000:]
