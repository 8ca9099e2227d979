"""The Hugging Face export computes what plmscale computes: same logits, same token ids, offline."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from plmscale.config import REPO_ROOT, ConfigError, RunConfig
from plmscale.export import add_export_parser
from plmscale.export.hf import export_hf, hf_tokenizer, verify_export
from plmscale.inference.model import encode_masked
from plmscale.model import TransformerLM
from plmscale.model_dir import load_local_model, save_model_dir
from plmscale.tokenizer import TRAINER_SPECIAL_ARGS, WORD_START, Tokenizer

STDLIB = ("argparse", "collections", "datetime", "decimal", "functools", "inspect", "json", "logging", "os")
STDLIB += ("pathlib", "shutil", "subprocess", "tarfile", "textwrap", "unittest", "zipfile", "http.client")
TRAIN_LINES = 1600  # the tokenizer trains on these; later lines are held out for tests


def docstring_lines() -> list[str]:
    """About 2,400 distinct lines of English-like text from the standard library, no download needed."""
    lines = []
    for name in STDLIB:
        for obj in vars(importlib.import_module(name)).values():
            doc = inspect.getdoc(obj) if callable(obj) else None
            lines += [line.strip() for line in (doc or "").splitlines() if len(line.strip()) > 20]
    return list(dict.fromkeys(lines))


def train_tiny_tokenizer(directory) -> str:
    """A SentencePiece model with plmscale's special ids ([PAD]=0 ... [MASK]=4)."""
    prefix = str(directory / "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docstring_lines()[:TRAIN_LINES]),
        model_prefix=prefix,
        vocab_size=400,
        hard_vocab_limit=False,
        character_coverage=0.999,
        byte_fallback=True,
        **TRAINER_SPECIAL_ARGS,
        minloglevel=2,
        num_threads=1,
    )
    return prefix + ".model"


def run_config(kind: str, vocab_size: int, num_layers: int = 2, seq_length: int = 32) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {
                "kind": kind,
                "vocab_size": vocab_size,
                "hidden_size": 32,
                "num_layers": num_layers,
                "num_heads": 4,
                "ffn_hidden_size": 48,
                "max_position_embeddings": 64,
                "type_vocab_size": 2 if kind == "encoder" else 0,
                "layernorm_eps": 1e-6,
                "init_std": 0.2,  # peaked attention, so a query/key mix-up changes the logits
            },
            "data": {"shards": "unused", "seq_length": seq_length},
            "objective": {"name": "mlm" if kind == "encoder" else "causal_lm"},
            "optimizer": {"lr": 1e-3, "warmup_steps": 0},
            "train": {
                "deepspeed_config": str(REPO_ROOT / "ds_configs" / "zero0.json"),
                "micro_batch_size": 2,
                "global_batch_size": 2,
                "train_steps": 1,
                "output_dir": "unused",
            },
        }
    )


def make_model_dir(directory, kind: str, tokenizer: str, num_layers: int = 2, seed: int = 0):
    """A random model whose biases and LayerNorms are perturbed too, so no swapped weight hides."""
    config = run_config(kind, Tokenizer(tokenizer).vocab_size, num_layers)
    torch.manual_seed(seed)
    model = TransformerLM(config.model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                param.add_(0.1 * torch.randn_like(param))
    return save_model_dir(directory, model.state_dict(), config, tokenizer, {"step": 0})


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory) -> str:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module", params=["encoder", "decoder"])
def exported(request, tokenizer_model, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = make_model_dir(root / "model", request.param, tokenizer_model)
    return model_dir, export_hf(model_dir, root / "hf")


def test_transformers_logits_equal_plmscale(exported):
    model_dir, hf_dir = exported
    model, cfg = load_local_model(model_dir)
    auto = AutoModelForMaskedLM if cfg.kind == "encoder" else AutoModelForCausalLM
    hf = auto.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == ("MegatronBertForMaskedLM" if cfg.kind == "encoder" else "GPT2LMHeadModel")
    assert hf.config.vocab_size == cfg.padded_vocab_size
    input_ids = torch.randint(5, cfg.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 15:] = 0
    attention_mask[2, 4:] = 0
    with torch.inference_mode():
        for mask in (None, attention_mask):
            ours = model(input_ids, mask)
            theirs = hf(input_ids=input_ids, attention_mask=mask).logits
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_auto_tokenizer_ids_equal_sentencepiece(exported, tokenizer_model):
    model_dir, hf_dir = exported
    kind = load_local_model(model_dir)[1].kind
    ours, theirs = Tokenizer(tokenizer_model), AutoTokenizer.from_pretrained(hf_dir)
    texts = docstring_lines()[TRAIN_LINES : TRAIN_LINES + 400] + [
        "  Leading, trailing  and   repeated spaces  ",
        "Unicode: naïve café, Ünïcode — 漢字 ✓ (byte fallback)",
        "digits 0123456789 and punctuation !?;:",
    ]
    for text in texts:
        expected = ours.encode([text])[0]
        assert theirs(text, add_special_tokens=False)["input_ids"] == expected, text
    wrapped = theirs(texts[0])["input_ids"]
    plain = ours.encode([texts[0]])[0]
    assert wrapped == ([ours.cls_id, *plain, ours.sep_id] if kind == "encoder" else [ours.sep_id, *plain])
    assert (theirs.pad_token_id, theirs.mask_token_id) == (ours.pad_id, ours.mask_id)


def test_verify_catches_a_wrong_mapping(exported, tokenizer_model, tmp_path):
    model_dir, hf_dir = exported
    model, _ = load_local_model(model_dir)
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in hf_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = load_file(str(broken / "model.safetensors"))
    name = next(k for k in weights if k.endswith(("query.weight", "c_attn.weight")))
    weights[name] = weights[name].flip(0).contiguous()  # permuted rows: a plausible mapping mistake
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="differs from plmscale"):
        verify_export(model, model_dir / "tokenizer.model", broken)


def test_export_command(tokenizer_model, tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "model", "decoder", tokenizer_model, num_layers=1)
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["export", "--model", str(model_dir), "--format", "hf", "--output", str(tmp_path / "hf")]
    )
    args.func(args)
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert "logits verified" in capsys.readouterr().out
    weights = (model_dir / "model.safetensors").read_bytes()
    into_model_dir = parser.parse_args(["export", "--model", str(model_dir), "--output", str(model_dir)])
    with pytest.raises(ConfigError, match="a plmscale model directory; export to another directory"):
        into_model_dir.func(into_model_dir)
    assert (model_dir / "model.safetensors").read_bytes() == weights


def test_decode_is_sentencepiece_decode_and_a_continuation_keeps_its_space(exported, tokenizer_model):
    model_dir, hf_dir = exported
    kind = load_local_model(model_dir)[1].kind
    ours, theirs = Tokenizer(tokenizer_model), AutoTokenizer.from_pretrained(hf_dir)
    texts = docstring_lines()[TRAIN_LINES : TRAIN_LINES + 200] + ["Unicode: naïve café, 漢字 ✓", "a\nb  c"]
    for text in texts:
        ids = ours.encode([text])[0]
        # the decoder keeps the dummy "▁" of the first token: a continuation is decoded on its own
        space = " " if kind == "decoder" and ours.id_to_piece(ids[0]).startswith(WORD_START) else ""
        assert theirs.decode(ids) == space + ours.decode(ids), text
        assert theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True) == space + ours.decode(ids)
    ids = ours.encode(["Return the absolute value of the argument."])[0]
    cut = next(k for k in range(1, len(ids)) if ours.id_to_piece(ids[k]).startswith(WORD_START))
    glued = ours.decode(ids[:cut]) + theirs.decode(ids[cut:])
    assert (glued == ours.decode(ids)) == (kind == "decoder")


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("the [MASK].", ["▁the", "[MASK]", "."]),
        ("[MASK] is", ["[MASK]", "▁is"]),
        ("  a  [MASK][MASK] b ", ["▁a", "[MASK]", "[MASK]", "▁", "b"]),
        ("x[MASK]y", ["▁", "x", "[MASK]", "y"]),
    ],
)
def test_a_mask_takes_the_word_boundary_before_it(tokenizer_model, text, pieces):
    """As in training, where a masked token carried its own "▁": the same ids from the export's tokenizer
    and from `plmscale fill-mask` on the model directory."""
    ours = Tokenizer(tokenizer_model)
    assert [ours.id_to_piece(i) for i in encode_masked(ours, text)] == pieces
    for kind in ("encoder", "decoder"):
        theirs = hf_tokenizer(Path(tokenizer_model), run_config(kind, ours.vocab_size).model)
        assert theirs(text, add_special_tokens=False)["input_ids"] == encode_masked(ours, text)
