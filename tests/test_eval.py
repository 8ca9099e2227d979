"""evaluate() numbers can be recomputed by hand, repeat exactly, and the report draws and summarizes."""

from __future__ import annotations

import argparse
import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from test_export_hf import TRAIN_LINES, docstring_lines, make_model_dir, train_tiny_tokenizer

from data_prep import UserError
from plmscale.data import BatchSource, PackedStream
from plmscale.data.masking import FIRST_ORDINARY_ID
from plmscale.eval import add_eval_parser
from plmscale.eval.evaluate import evaluate
from plmscale.eval.report import loss_panels, report
from plmscale.manifest import FORMAT, write_manifest
from plmscale.model_dir import TOKENIZER, load_local_model, load_run_config
from plmscale.objectives import get_objective
from plmscale.tokenizer import SEP_ID, Tokenizer, file_sha256

TIMINGS = ("batch1_ms", "batch1_tokens_per_s", "batch32_ms", "batch32_tokens_per_s", "threads")


def write_shards(directory, tokenizer_path) -> None:
    """A `train` and a `valid` split of one shard each, one document per docstring line, and the manifest."""
    directory.mkdir()
    tokenizer = Tokenizer(tokenizer_path)
    lines = {"train": docstring_lines()[:TRAIN_LINES], "valid": docstring_lines()[TRAIN_LINES:]}
    splits = {}
    for split, texts in lines.items():
        prefix = f"{split}_00000"
        builder = IndexedDatasetBuilder(str(directory / f"{prefix}.bin"), dtype=np.uint16)
        documents = tokenizer.encode(texts)
        for ids in documents:
            builder.add_document(torch.tensor(ids), [len(ids)])
        builder.finalize(str(directory / f"{prefix}.idx"))
        files = {name: file_sha256(directory / name) for name in (f"{prefix}.bin", f"{prefix}.idx")}
        splits[split] = [
            {
                "prefix": prefix,
                "documents": len(documents),
                "sentences": len(documents),
                "tokens": sum(map(len, documents)),
                "files": files,
            }
        ]
    write_manifest(
        directory,
        {
            "format": FORMAT,
            "tokenizer": {
                "path": str(tokenizer_path),
                "sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size,
            },
            "dtype": "uint16",
            "splits": splits,
        },
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tokenizer = train_tiny_tokenizer(root)
    write_shards(root / "shards", tokenizer)
    models = {
        "teacher": make_model_dir(root / "teacher", "encoder", tokenizer, num_layers=2),
        "student": make_model_dir(root / "student", "encoder", tokenizer, num_layers=1, seed=1),
        "decoder": make_model_dir(root / "decoder", "decoder", tokenizer, num_layers=1),
    }
    return root, models


def without_timings(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TIMINGS}


def test_loss_and_accuracy_match_a_hand_computation(setup):
    root, models = setup
    result = evaluate(models["teacher"], root / "shards", batches=2, batch_size=3, seed=7)
    model, cfg = load_local_model(models["teacher"])
    run_cfg = load_run_config(models["teacher"])
    objective = get_objective(run_cfg.objective.name, run_cfg.objective.params, cfg)
    source = BatchSource(
        PackedStream.from_manifest(str(root / "shards"), "valid"), objective, 32, 3, 1, 0, 7, False
    )
    logits, labels = [], []
    with torch.no_grad():
        for batch in source.micro_batches(0, 2):
            logits.append(model(batch["input_ids"]).flatten(0, 1))
            labels.append(batch["labels"].flatten())
    logits, labels = torch.cat(logits), torch.cat(labels)
    targets = labels != -100
    assert result["targets"] == int(targets.sum()) > 0
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    accuracy = (logits.argmax(-1)[targets] == labels[targets]).float().mean().item()
    assert result["accuracy"] == pytest.approx(accuracy) and 0 <= result["accuracy"] <= 1
    assert result["tokens"] == 2 * 3 * 32 and result["threads"] >= 1
    assert result["batch32_tokens_per_s"] == pytest.approx(32 * 32 / (result["batch32_ms"] / 1000))
    assert result["batch1_ms"] > 0 and result["batch1_tokens_per_s"] > 0

    # the unigram-frequency baseline: add-one counts of the train split (each document and its [SEP]) over
    # the tokens MLM can target, scored on the same targets
    tokenizer = Tokenizer(models["teacher"] / TOKENIZER)
    counts = np.ones(tokenizer.vocab_size)
    documents = tokenizer.encode(docstring_lines()[:TRAIN_LINES])
    for ids in documents:
        np.add.at(counts, [*ids, SEP_ID], 1)
    counts[:FIRST_ORDINARY_ID] = 0
    probs = counts / counts.sum()
    hits = labels[targets].numpy()
    assert result["baseline_loss"] == pytest.approx(-np.log(probs[hits]).mean(), rel=1e-9)
    assert result["baseline_accuracy"] == pytest.approx((hits == probs.argmax()).mean())
    assert result["baseline_tokens"] == sum(len(ids) + 1 for ids in documents)


def test_same_seed_same_numbers_other_seed_other_masks(setup):
    root, models = setup
    first, second = (
        evaluate(models["teacher"], root / "shards", batches=2, batch_size=2, seed=3) for _ in "ab"
    )
    other = evaluate(models["teacher"], root / "shards", batches=2, batch_size=2, seed=4)
    assert without_timings(first) == without_timings(second)
    assert other["loss"] != first["loss"]


def test_decoder_scores_every_next_token(setup):
    root, models = setup
    result = evaluate(models["decoder"], root / "shards", batches=2, batch_size=2)
    assert result["objective"] == "causal_lm" and result["targets"] == 2 * 2 * 32
    assert 0 <= result["accuracy"] <= 1 and result["loss"] > 0


def test_shards_of_another_tokenizer_are_refused(setup, tmp_path):
    root, models = setup
    shards = shutil.copytree(root / "shards", tmp_path / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    write_manifest(shards, manifest)
    with pytest.raises(UserError, match="sha256 differs"):
        evaluate(models["teacher"], shards)


def write_metrics(run_dir, losses: list[float]) -> None:
    run_dir.mkdir()
    (run_dir / "tensorboard").mkdir()
    lines = [
        {"kind": "train", "step": 10 * (i + 1), "loss": loss, "lr": 1e-3} for i, loss in enumerate(losses)
    ]
    lines.append({"kind": "eval", "step": 10 * len(losses), "loss": losses[-1] + 0.1, "accuracy": 0.2})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_eval_command_writes_report_plot_and_json(setup, tmp_path):
    root, models = setup
    write_metrics(tmp_path / "pretrain", [8.0, 6.0, 5.0, 4.0])
    write_metrics(tmp_path / "distill", [5.0, 4.5])
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["eval", "--teacher", str(models["teacher"]), "--student", str(models["student"]),
         "--shards", str(root / "shards"), "--batches", "2", "--batch-size", "2",
         "--runs", f"pretrain={tmp_path / 'pretrain'}", f"distill={tmp_path / 'distill'}",
         "--plot", str(tmp_path / "plots" / "loss.png"), "--json", str(tmp_path / "eval.json"), "--export", "hf_dir",
         "--fill-mask", "Return the [MASK] of the argument.", "A [MASK] of [MASK] items."]
    )  # fmt: skip
    text = args.func(args)
    assert (tmp_path / "plots" / "loss.png").read_bytes().startswith(b"\x89PNG")
    numbers = json.loads((tmp_path / "eval.json").read_text())
    assert numbers["teacher"]["targets"] == numbers["student"]["targets"]  # same masks for both
    assert "pretrain: train loss 8.0000 (step 10) -> 4.0000 (step 40); held-out 4.1000 (step 40)" in text
    teacher = numbers["teacher"]
    baseline = f"baseline    {teacher['baseline_loss']:.4f}    {teacher['baseline_accuracy']:.4f}"
    assert baseline in text and f"{teacher['baseline_tokens']:,} training tokens" in text
    assert re.search(r"student / teacher: [\d.]+% of the accuracy, loss [+-][\d.]+", text)
    assert "x the speed at batch 1" in text and "x at batch 32" in text and "x the parameters" in text
    # each model's top 3 per mask, from plmscale fill-mask's own code
    lines = text.splitlines()
    first = lines.index("  Return the [MASK] of the argument.")
    assert lines[first + 1].startswith("    teacher ") and lines[first + 1].count(", ") == 2
    assert lines[first + 2].startswith("    student ")
    assert lines[first + 4].count(" | ") == 1  # two masks
    assert f"tensorboard {tmp_path / 'pretrain' / 'tensorboard'}" in text and "hf_dir" in text


def test_distillation_loss_gets_its_own_panel(tmp_path):
    write_metrics(tmp_path / "pretrain", [8.0, 6.0])
    write_metrics(tmp_path / "distill", [5.0, 4.5])
    (tmp_path / "distill" / "config.yaml").write_text("distill: {teacher: x, temperature: 2.0, alpha: 0.5}\n")
    panels = loss_panels({"pretrain": tmp_path / "pretrain", "distill": tmp_path / "distill"})
    assert {title: [(name, train) for _, name, _, train in runs] for title, runs in panels.items()} == {
        "objective loss": [("pretrain", True), ("distill", False)],  # the distill run's held-out MLM only
        "distillation loss": [("distill", True)],
    }


def test_report_without_student_or_runs(setup, capsys):
    root, models = setup
    teacher = evaluate(models["teacher"], root / "shards", batches=1, batch_size=2)
    text = report(teacher)
    assert "teacher" in text and "student" not in text and text in capsys.readouterr().out
