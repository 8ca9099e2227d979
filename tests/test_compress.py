"""`plmscale compress`: int8 and ONNX variants of a tiny encoder within their stated tolerances of the fp32
model, the table's columns (bytes are the files' sizes, parameters counted by hand, quality and task metric
those of `plmscale eval` and `plmscale finetune`), and bad inputs refused in one line before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_export_hf import run_config
from test_finetune import synthetic_rows, write_task

from plmscale.cli import main
from plmscale.compress.int8 import INT8_WEIGHTS, load_int8, quantize_int8
from plmscale.compress.onnx import FP32_ATOL, OnnxLM
from plmscale.compress.table import heldout_batches, parity
from plmscale.eval.evaluate import evaluate
from plmscale.model import TransformerLM
from plmscale.model_dir import load_local_model, save_model_dir

# int8 changes every logit a little; what must hold is the prediction (the tiny model is random, with
# init_std 0.2 its logits are far from flat; the demo's trained models agree on >= 97 % of the targets)
INT8_TOP1_AGREEMENT = 0.9
INT8_MAX_LOGIT_DIFFERENCE = 0.5


def expected_parameters(cfg) -> int:
    """BERT's parameters by hand: embeddings, per layer attention + MLP + two LayerNorms, final LayerNorm,
    MLM head (dense, LayerNorm, bias over the padded vocabulary; its matrix is the tied word embedding)."""
    h, f, v = cfg.hidden_size, cfg.ffn_size, cfg.padded_vocab_size
    embeddings = v * h + cfg.max_position_embeddings * h + cfg.type_vocab_size * h
    layer = (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 2 * (2 * h)
    return embeddings + cfg.num_layers * layer + 2 * h + (h * h + h) + 2 * h + v


@pytest.fixture(scope="module")
def compressed(shards, tmp_path_factory):
    """One `plmscale compress` run over a tiny encoder, every variant, with a fine-tuning task."""
    root = tmp_path_factory.mktemp("compress")
    config = run_config("encoder", 2000)
    torch.manual_seed(0)
    model_dir = save_model_dir(
        root / "model", TransformerLM(config.model).state_dict(), config,
        shards.parent / "tokenizer" / "tokenizer.model", {"step": 0},
    )  # fmt: skip
    train, dev = (
        "sentence\tlabel\n" + "".join(f"{t}\t{c}\n" for t, c, _ in synthetic_rows(count, seed))
        for count, seed in ((64, 0), (32, 1))
    )
    task = write_task(root / "task", train, dev)
    argv = ["compress", "--model", f"tiny={model_dir}", "--shards", str(shards), "--task", str(task),
            "--output", str(root / "out"), "--batches", "2", "--batch-size", "4", "--epochs", "1",
            "--max-seq-length", "32", "--threads", "1", "--speed-seconds", "0"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((root / "out" / "compress.json").read_text())
    return model_dir, shards, root / "out", report


def held_out(shards) -> dict:
    return dict(shards_dir=shards, split="valid", batches=2, batch_size=4, seed=1234, seq_length=32)


def test_int8_file_is_the_quantized_model_within_tolerance(compressed):
    model_dir, shards, out, _ = compressed
    fp32, _ = load_local_model(model_dir)
    loaded = load_int8(TransformerLM(fp32.cfg), out / "tiny" / "int8" / INT8_WEIGHTS)
    batch = heldout_batches(model_dir, held_out(shards))[0]
    with torch.inference_mode():  # the file rebuilds exactly the model quantized in memory
        assert torch.equal(quantize_int8(fp32)(batch["input_ids"]), loaded(batch["input_ids"]))
    qkv = loaded.layers["0"].attn.qkv
    assert qkv.weight().dtype == torch.qint8 and qkv.weight().qscheme() == torch.per_channel_affine
    found = parity(fp32, loaded, heldout_batches(model_dir, held_out(shards)))
    assert found["top1_agreement"] >= INT8_TOP1_AGREEMENT
    assert 0 < found["max_logit_difference"] <= INT8_MAX_LOGIT_DIFFERENCE


def test_onnx_fp32_matches_pytorch_and_onnx_int8_within_tolerance(compressed):
    model_dir, shards, out, _ = compressed
    fp32, _ = load_local_model(model_dir)
    batches = heldout_batches(model_dir, held_out(shards))
    onnx = OnnxLM(out / "tiny" / "onnx" / "model.onnx")
    inputs = {k: batches[0][k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batches[0]}
    with torch.inference_mode():
        hidden = fp32.hidden_states(**inputs)
    assert (onnx.hidden_states(**inputs) - hidden).abs().max() <= FP32_ATOL
    exact = parity(fp32, onnx, batches)
    assert exact["max_logit_difference"] <= FP32_ATOL and exact["top1_agreement"] == 1.0
    quantized = parity(fp32, OnnxLM(out / "tiny" / "onnx-int8" / "model.onnx"), batches)
    assert quantized["top1_agreement"] >= INT8_TOP1_AGREEMENT
    assert 0 < quantized["max_logit_difference"] <= INT8_MAX_LOGIT_DIFFERENCE


def test_table_columns_are_the_files_the_counts_and_the_other_commands_numbers(compressed, capsys):
    model_dir, shards, out, report = compressed
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows) == ["fp32", "int8", "onnx", "onnx-int8"]
    _, cfg = load_local_model(model_dir)
    assert all(row["parameters"] == expected_parameters(cfg) for row in rows.values())
    assert [Path(rows[v]["file"]).stat().st_size for v in rows] == [rows[v]["bytes"] for v in rows]
    assert rows["fp32"]["file"] == str(Path(model_dir) / "model.safetensors")
    assert (
        rows["int8"]["bytes"] < rows["fp32"]["bytes"] and rows["onnx-int8"]["bytes"] < rows["onnx"]["bytes"]
    )
    # the fp32 row is `plmscale eval`'s score of the directory; the ONNX fp32 one scores the same
    direct = evaluate(model_dir, **held_out(shards))
    assert rows["fp32"]["accuracy"] == direct["accuracy"] and rows["fp32"]["loss"] == direct["loss"]
    assert rows["onnx"]["accuracy"] == direct["accuracy"]
    assert rows["onnx"]["loss"] == pytest.approx(direct["loss"], abs=1e-5)
    # the task metric of fp32 is fine-tuning's own dev score; its ONNX export scores the same
    finetuned = json.loads((out / "tiny" / "finetuned" / "finetune.json").read_text())
    assert rows["fp32"]["task"] == finetuned["dev"]
    assert rows["onnx"]["task"]["accuracy"] == finetuned["dev"]["accuracy"]
    for row in rows.values():
        assert row["batch1_ms"] > 0 and row["batch32_tokens_per_s"] > 0
    assert (out / "compress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv_of, message",
    [
        (lambda tmp, shards: ["--model", f"t={tmp / 'nowhere'}", "--shards", str(shards)], "nowhere"),
        (lambda tmp, shards: ["--model", f"t={tmp}", "--shards", str(shards)], "config.yaml"),
    ],
)
def test_a_missing_model_dir_is_one_line(tmp_path, shards, capsys, argv_of, message):
    argv = ["compress", *argv_of(tmp_path, shards), "--output", str(tmp_path / "out"), "--variants", "fp32"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("plmscale: error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_onnx_without_onnxruntime_is_one_line(compressed, tmp_path, capsys, monkeypatch):
    model_dir, shards, _, _ = compressed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an environment without it imports
    argv = ["compress", "--model", f"t={model_dir}", "--shards", str(shards), "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "onnxruntime" in err and "plmscale[deploy]" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
