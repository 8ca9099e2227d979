"""Pre-masked BERT-style instances: the build driver's guarantees (determinism across worker counts, resume
after kill, corruption detection, counts), the segment logic of NSP / SOP / packing, the reader, the
statistics, and MLM training on instances."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, TEST_VOCAB, ZH_WORDS, tiny_recipe, train_single_process, write_recipe
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from data_prep import UserError
from data_prep.cli import main as prep_main
from data_prep.instances.base import DocumentSource, Vocabulary, instance_type
from data_prep.instances.build import build_instances
from data_prep.instances.stats import instance_statistics
from data_prep.phrases import PhraseTable
from data_prep.words import chinese_word_starts
from plmscale.config import ConfigError, ModelConfig, load_config
from plmscale.data import InstanceBatchSource, InstanceSet
from plmscale.data.instances import InstanceSetError
from plmscale.data.masking import word_units
from plmscale.manifest import ManifestError, load_manifest, split_prefixes
from plmscale.model.transformer import TransformerLM
from plmscale.objectives import IGNORE_INDEX, get_objective
from plmscale.tokenizer import CLS_ID, MASK_ID, SEP_ID, Tokenizer


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def documents(shards: Path) -> list[np.ndarray]:
    """The train split's documents, each its sentences concatenated."""
    source = DocumentSource(split_prefixes(load_manifest(shards), "train"))
    return [np.concatenate(source.sentences(d)) for d in range(len(source))]


def originals(instances: InstanceSet) -> list[np.ndarray]:
    """Every instance's tokens with the masked positions put back."""
    result = []
    for i in range(len(instances)):
        item = instances[i]
        tokens = item["tokens"].astype(np.int64)
        tokens[item["mask_positions"].astype(np.int64)] = item["mask_labels"]
        result.append(tokens)
    return result


def per_document(directory: Path, shard: str = "inst_00000") -> list[int]:
    """Instances per source document of one output shard (a document with none is not listed)."""
    dataset = IndexedDataset(str(directory / f"{shard}.tokens"))  # alive while its index is read
    return np.diff(dataset.document_indices).tolist()


def contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    return needle.astype(np.int32).tobytes() in haystack.astype(np.int32).tobytes()


@pytest.fixture(scope="module")
def nsp(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nsp")
    build_instances(shards, "nsp", out, params={"max_seq_length": 64}, workers=2, docs_per_task=150,
                    dupe_factor=2, progress=False)  # fmt: skip
    return out


def test_worker_count_does_not_change_a_byte(shards, nsp, tmp_path):
    build_instances(shards, "nsp", tmp_path, params={"max_seq_length": 64}, workers=1, docs_per_task=150,
                    dupe_factor=2, progress=False)  # fmt: skip
    assert files_of(tmp_path) == files_of(nsp)


def test_resume_after_kill_keeps_finished_tasks_and_matches(shards, tmp_path):
    options = {"params": {"max_seq_length": 64}, "docs_per_task": 10, "dupe_factor": 2, "progress": False}
    build_instances(shards, "span", tmp_path / "whole", workers=1, **options)
    out = tmp_path / "killed"
    script = (
        "import sys; from data_prep.instances.build import build_instances; "
        f"build_instances(sys.argv[1], 'span', sys.argv[2], workers=2, **{options!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(shards), str(out)], cwd=REPO,
                            start_new_session=True, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.done.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the build and its pool workers
    proc.wait()
    done = sorted(out.glob("*.done.json"))
    assert 3 <= len(done) < len(list((tmp_path / "whole").glob("*.done.json"))), "not killed midway"
    assert not (out / "manifest.json").exists()
    kept = {
        p: p.stat().st_mtime_ns for p in out.iterdir() if p.name.split(".")[0] in {d.name[:10] for d in done}
    }

    manifest = build_instances(shards, "span", out, workers=2, **options)
    assert manifest["tasks_kept"] == len(done)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished tasks were verified, not rebuilt
    assert files_of(out) == files_of(tmp_path / "whole")


def test_corrupt_output_is_named_by_reader_and_resume(shards, nsp, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(nsp, out)
    victim = out / "inst_00001.tokens.bin"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(InstanceSetError, match="inst_00001.tokens.bin"):
        InstanceSet(out)
    with pytest.raises(UserError, match="inst_00001.tokens.bin"):
        build_instances(shards, "nsp", out, params={"max_seq_length": 64}, workers=1, docs_per_task=150,
                        dupe_factor=2, progress=False)  # fmt: skip


def test_truncated_input_shard_is_named(shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    victim = copy / "train_00000.bin"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ManifestError, match="train_00000.bin"):
        build_instances(copy, "mlm", tmp_path / "out", progress=False)


def test_nsp_is_balanced_and_random_next_comes_from_another_document(shards, nsp):
    docs, instances = documents(shards), InstanceSet(nsp)
    per_doc = per_document(nsp) + per_document(nsp, "inst_00001")
    owner = np.repeat(np.arange(len(per_doc)), per_doc)  # no document is rejected: the shards list them all
    assert len(owner) == instances.offsets[2]
    labels = []
    for i, tokens in enumerate(originals(instances)[: len(owner)]):
        segments = instances[i]["segments"]
        a, b = tokens[1 : (segments == 0).sum() - 1], tokens[(segments == 0).sum() : -1]
        assert tokens[0] == CLS_ID and tokens[len(a) + 1] == SEP_ID and tokens[-1] == SEP_ID
        label = int(instances[i]["pair_label"][0])
        own = docs[owner[i]]
        if label == 0:
            assert contains(own, np.concatenate([a, b])), "actual next: A B is a run of the document"
        else:
            assert contains(own, a)
            assert any(contains(d, b) for j, d in enumerate(docs) if j != owner[i]), "B from another doc"
        labels.append(label)
    assert np.mean(labels) == pytest.approx(0.5, abs=0.05)


def test_sop_swaps_half_of_the_pairs(shards, tmp_path):
    build_instances(shards, "sop", tmp_path, params={"max_seq_length": 64}, progress=False)
    docs, instances = documents(shards), InstanceSet(tmp_path)
    owner = np.repeat(np.arange(len(docs)), per_document(tmp_path))
    labels = []
    for i, tokens in enumerate(originals(instances)):
        cut = int((instances[i]["segments"] == 0).sum())
        a, b = tokens[1 : cut - 1], tokens[cut:-1]
        label = int(instances[i]["pair_label"][0])
        assert len(a) and len(b)
        assert contains(docs[owner[i]], np.concatenate([b, a] if label else [a, b]))
        labels.append(label)
    assert np.mean(labels) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("batch_tokens", [None, 300])
def test_long_documents_are_split_never_dropped_and_counted(shards, tmp_path, monkeypatch, batch_tokens):
    if batch_tokens:  # a task built in many small batches loses nothing either
        monkeypatch.setattr("data_prep.instances.build.BATCH_TOKENS", batch_tokens)
    manifest = build_instances(shards, "mlm", tmp_path, params={"max_seq_length": 32}, dupe_factor=2,
                               progress=False)  # fmt: skip
    docs, counts = documents(shards), manifest["counts"]
    per_doc = per_document(tmp_path)
    assert counts["documents_in"] == 2 * len(docs)
    assert counts["documents_in"] == counts["documents_out"] + sum(counts["rejected"].values())
    assert counts["documents_split"] == 2 * sum(n > 1 for n in per_doc) > 0
    source = DocumentSource(split_prefixes(load_manifest(shards), "train"))
    cut = sum(len(s) > 30 for d in range(len(source)) for s in source.sentences(d))
    assert counts["sentences_cut"] == 2 * cut > 0
    batches = source.batches(range(len(source)), 300)
    assert [d for batch in batches for d in batch] == list(range(len(source))) and len(batches) > 10
    sizes = [sum(len(s) for d in batch for s in source.sentences(d)) for batch in batches]
    assert all(size <= 300 or len(batch) == 1 for size, batch in zip(sizes, batches, strict=True))
    # packing within a document loses nothing: the instances of a document are the document
    instances = originals(InstanceSet(tmp_path))
    bounds = np.concatenate([[0], np.cumsum(per_doc)])
    for d, doc in enumerate(docs):
        pieces = [t[1:-1] for t in instances[bounds[d] : bounds[d + 1]]]
        assert all(len(t) <= 30 for t in pieces)
        assert np.array_equal(np.concatenate(pieces), doc)


def test_dupe_factor_masks_each_document_differently(shards, tmp_path):
    build_instances(shards, "mlm", tmp_path, params={"short_seq_prob": 0}, dupe_factor=3, progress=False)
    instances = InstanceSet(tmp_path)
    n = len(instances) // 3
    texts, items = originals(instances), [instances[i] for i in range(len(instances))]
    for i in range(n):
        copies = [i, i + n, i + 2 * n]
        assert all(np.array_equal(texts[i], texts[j]) for j in copies)
    differ = [
        len({items[j]["mask_positions"].tobytes() for j in (i, i + n, i + 2 * n)}) == 3 for i in range(n)
    ]
    assert np.mean(differ) > 0.95


def test_reader_returns_what_the_instance_type_built(shards, nsp):
    cls = instance_type("nsp")
    builder = cls(
        cls.Params(max_seq_length=64), Vocabulary(Tokenizer(shards.parent / "tokenizer" / "tokenizer.model"))
    )
    source = DocumentSource(split_prefixes(load_manifest(shards), "train"))
    instances = InstanceSet(nsp)
    built = builder.build_batch(range(150), source, np.random.default_rng([1234, 0, 0]))  # task 0
    assert len(built) == instances.manifest["shards"][0]["instances"]
    for index in range(len(built)):
        got, expected = instances[index], built[index]
        assert got.keys() == expected.keys()
        assert all(np.array_equal(got[k], expected[k]) for k in got)


def test_one_token_document_is_counted_not_crashed(tmp_path):
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"\u2581w{i}" for i in range(5, 100)]
    tokenizer = SimpleNamespace(vocab_size=100, id_to_piece=pieces.__getitem__, cls_id=2, sep_id=3, mask_id=4,
                                pad_id=0)  # fmt: skip
    vocab = Vocabulary(tokenizer)
    builder = IndexedDatasetBuilder(str(tmp_path / "docs.bin"), dtype=np.int32)
    builder.add_document(np.array([7]), [1])
    builder.add_document(np.arange(10, 40), [10, 20])
    builder.finalize(str(tmp_path / "docs.idx"))
    source = DocumentSource([str(tmp_path / "docs")])
    sop = instance_type("sop")(instance_type("sop").Params(short_seq_prob=0), vocab)
    assert sop.build_batch(range(2), source, np.random.default_rng(0)).per_document.tolist() == [0, 1]
    assert sop.counts["chunks_too_short_for_pair"] == 1


def test_statistics_match_bert_and_wwm(shards, nsp, tmp_path, capsys):
    stats = instance_statistics(nsp)
    assert stats["masked_fraction"] == pytest.approx(0.15, abs=0.015)
    assert stats["share_mask_token"] == pytest.approx(0.8, abs=0.03)
    assert stats["share_random"] == pytest.approx(0.1, abs=0.03)
    assert stats["nsp_random_next_share"] == pytest.approx(0.5, abs=0.05)
    prep_main(["prep", "instances", "--shards", str(shards), "--objective", "nsp", "--param", "masking=wwm",
               "--param", "max_seq_length=64", "--workers", "2", "--no-progress", "--out", str(tmp_path)])  # fmt: skip
    assert "nsp instances" in capsys.readouterr().out
    prep_main(["prep", "stats", str(tmp_path)])
    table = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert float(table["whole_word_units"]) == 1.0  # WWM never masks part of a word
    assert float(table["mean_unit_tokens"]) > 1.2
    with pytest.raises(SystemExit):
        prep_main(["prep", "instances", "--shards", str(shards), "--objective", "nsp", "--param", "nope=1",
                   "--out", str(tmp_path)])  # fmt: skip
    assert "nope" in capsys.readouterr().err


def test_mlm_trains_on_instances(shards, tmp_path):
    build_instances(shards, "nsp", tmp_path, params={"max_seq_length": 64}, progress=False)
    cfg = ModelConfig(kind="encoder", vocab_size=TEST_VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                      max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
    source = InstanceBatchSource(InstanceSet(tmp_path), 64, 16, dp_size=1, dp_rank=0, seed=3)
    batch = source.micro_batches(0, 1)[0]
    assert batch["input_ids"].shape == batch["labels"].shape == (16, 64)
    masked = batch["labels"] != IGNORE_INDEX
    assert (batch["input_ids"][masked] == MASK_ID).float().mean() > 0.6
    assert not masked[batch["attention_mask"] == 0].any()  # padding is never a target
    assert (batch["token_type_ids"] == 1).any()  # segment B
    torch.manual_seed(0)
    model, objective = TransformerLM(cfg), get_objective("mlm", {}, cfg)
    losses = [terms["mlm"][0] for terms in train_single_process(model, objective, source, steps=12)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses


def test_recipe_with_instances_is_validated(shards, tmp_path):
    recipe = tiny_recipe(shards, tmp_path, data={"instances": str(tmp_path)})
    assert load_config(write_recipe(tmp_path / "ok.yaml", recipe)).data.instances == str(tmp_path)
    recipe["objective"] = {"name": "causal_lm"}
    recipe["model"]["kind"] = "decoder"
    with pytest.raises(ConfigError, match="data.instances"):
        load_config(write_recipe(tmp_path / "bad.yaml", recipe))


@pytest.fixture(scope="module")
def zh_shards(tmp_path_factory) -> Path:
    """Chinese documents of random words in which 学生 is always followed by 朋友, one sentence a
    paragraph (the sentence splitter knows no 。), a small SentencePiece model and its shards."""
    from data_prep.shards import build_shards
    from data_prep.tokenizer import train_tokenizer

    root, rng = tmp_path_factory.mktemp("zh_corpus"), np.random.default_rng(0)
    words = [w for w in ZH_WORDS if w not in ("学生", "朋友")] + ["学生朋友"]  # the two never apart
    with (root / "zh.jsonl").open("w", encoding="utf-8") as out:
        for _ in range(300):
            sentences = [
                "".join(rng.choice(words, rng.integers(4, 12))) + "。" for _ in range(rng.integers(2, 6))
            ]
            out.write(json.dumps({"text": "\n\n".join(sentences)}, ensure_ascii=False) + "\n")
    train_tokenizer([root / "zh.jsonl"], root / "tokenizer", vocab_size=330, character_coverage=1.0)
    build_shards([root / "zh.jsonl"], root / "tokenizer" / "tokenizer.model", root / "shards", progress=False)
    return root / "shards"


def test_chinese_whole_words_and_ernie_phrases_come_from_jieba(zh_shards, tmp_path):
    vocab = Vocabulary(Tokenizer(zh_shards.parent / "tokenizer" / "tokenizer.model"))
    build_instances(zh_shards, "wwm_zh", tmp_path / "wwm", params={"max_seq_length": 64}, progress=False)
    instances, units_masked = InstanceSet(tmp_path / "wwm"), 0
    for i, tokens in enumerate(originals(instances)):
        hit = np.zeros(len(tokens), dtype=bool)
        hit[instances[i]["mask_positions"].astype(np.int64)] = True
        for start, end in zip(*word_units(tokens >= 5, chinese_word_starts(tokens, vocab)), strict=True):
            assert hit[start:end].all() or not hit[start:end].any()  # a jieba word is masked whole
            units_masked += end - start > 1 and hit[start]
    assert units_masked > 100  # and jieba words made of several pieces were masked

    (tmp_path / "entities.txt").write_text("北京大学\n人工智能\n", encoding="utf-8")
    # short instances: a 15 % budget's phrase quarter (2 tokens) would never fit a 4-token phrase
    params = {"words": "jieba", "entities": str(tmp_path / "entities.txt"), "mask_prob": 0.4}
    params |= {"max_seq_length": 64, "max_predictions_per_seq": 64}
    manifest = build_instances(zh_shards, "ernie", tmp_path / "ernie", params=params, progress=False)
    phrases = PhraseTable.load(manifest["params"]["phrases"]).scores
    surfaces = {"".join(vocab.pieces[t] for t in key).replace("\u2581", "") for key in phrases}
    assert "学生朋友" in surfaces  # the planted collocation of two jieba words
    instances = InstanceSet(tmp_path / "ernie")
    masked_units = {
        tuple(tokens[a:b].tolist())
        for i, tokens in enumerate(originals(instances))
        for a, b in instances[i]["spans"].reshape(-1, 2)
    }
    assert masked_units & set(phrases)  # phrases were masked as units
    assert manifest["counts"]["masked_tokens"] / manifest["counts"]["tokens"] == pytest.approx(0.4, abs=0.02)


def test_instance_batches_carry_segments_and_pair_labels(shards, nsp, tmp_path):
    instances = InstanceSet(nsp)
    source = InstanceBatchSource(instances, 64, 8, dp_size=1, dp_rank=0, seed=3, shuffle=False)
    batch = source.micro_batches(0, 1)[0]
    assert batch["pair_label"].dtype == torch.int64 and batch["pair_label"].shape == (8,)
    for row in range(8):
        item = instances[row]
        assert batch["pair_label"][row] == int(item["pair_label"][0])
        length = len(item["tokens"])
        assert batch["token_type_ids"][row, :length].tolist() == item["segments"].tolist()
        assert not batch["token_type_ids"][row, length:].any()
    build_instances(shards, "mlm", tmp_path, params={"max_seq_length": 64}, progress=False)
    unpaired = InstanceBatchSource(InstanceSet(tmp_path), 64, 8, dp_size=1, dp_rank=0, seed=3)
    assert "pair_label" not in unpaired.micro_batches(0, 1)[0]
