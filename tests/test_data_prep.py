"""data_prep end to end on a slice of the embedded corpus: readers, tokenizer, shards, manifest, CLI."""

import json
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from data_prep.cli import main
from data_prep.corpus import write_corpus
from data_prep.encode import in_valid_split, split_many, split_sentences
from data_prep.inputs import scan_inputs
from data_prep.readers import RejectCounter, iter_documents
from data_prep.shards import build_shards
from data_prep.tokenizer import train_tokenizer
from plmscale.manifest import ManifestError, load_manifest, split_prefixes
from plmscale.tokenizer import Tokenizer, file_sha256

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_corpus(path, max_mb=0.3)
    return path


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([corpus], out, vocab_size=600)
    return out / "tokenizer.model"


def read_documents(inputs, counter: RejectCounter, text_field: str = "text") -> list:
    return list(iter_documents(scan_inputs(inputs, counter).sources, counter, text_field))


def _shards(corpus, tokenizer, out, **options) -> dict:
    options = {"valid_fraction": 0.2, "shard_tokens": 20_000, "progress": False} | options
    return build_shards([corpus], tokenizer, out, **options)


def test_corpus_is_deterministic_and_nontrivial(corpus, tmp_path):
    again = tmp_path / "again.jsonl"
    stats = write_corpus(again, max_mb=0.3)
    assert again.read_bytes() == corpus.read_bytes()
    assert stats["capped"] and stats["documents"] >= 100
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert all(len(r["text"]) >= 200 for r in records)
    assert len({r["text"] for r in records}) == len(records)
    assert all(not r["source"].startswith(("test.", "idlelib.")) for r in records)


def test_tokenizer_ids_sidecar_and_reproducibility(corpus, tokenizer):
    tok = Tokenizer(tokenizer)  # raises if the special ids are not [PAD]=0 ... [MASK]=4
    assert tok.vocab_size == 600
    assert tok.encode(["[MASK]"])[0][-1] == tok.mask_id
    sidecar = json.loads((tokenizer.parent / "tokenizer.json").read_text())
    assert sidecar["sha256"] == file_sha256(tokenizer)
    assert sidecar["counts"]["documents_used"] == sidecar["counts"]["documents_in"] > 100
    again = train_tokenizer([corpus], tokenizer.parent, vocab_size=600)  # same output dir: same file
    assert again["sha256"] == sidecar["sha256"]


@pytest.mark.parametrize("shard_tokens", [20_000, 300])  # 300: some documents longer than a shard
def test_shards_equal_tokenizer_output(corpus, tokenizer, tmp_path, shard_tokens):
    manifest = load_manifest(_shards(corpus, tokenizer, tmp_path, shard_tokens=shard_tokens)["directory"])
    shards = manifest["splits"]["train"] + manifest["splits"]["valid"]
    assert all(shard["tokens"] <= shard_tokens or shard["documents"] == 1 for shard in shards)
    tok = Tokenizer(tokenizer)
    expected = {"train": [], "valid": []}
    for doc in read_documents([corpus], RejectCounter()):
        sentences = [ids for ids in tok.encode(split_sentences(doc.text)) if ids]
        expected["valid" if in_valid_split(doc.text, 0.2) else "train"].append(sentences)
    assert len(manifest["splits"]["train"]) > 1 and expected["valid"]
    for split, documents in expected.items():
        read = []
        for prefix in split_prefixes(manifest, split):
            dataset = IndexedDataset(prefix)
            bounds = dataset.document_indices
            read += [[dataset[i].tolist() for i in range(a, b)] for a, b in pairwise(bounds)]
        assert read == documents
    counts = manifest["counts"]
    assert counts["documents_in"] == counts["documents_written"] == sum(map(len, expected.values()))
    assert counts["tokens"] == sum(len(s) for docs in expected.values() for d in docs for s in d)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["sha256"] == file_sha256(tokenizer)


def test_shard_files_are_what_megatron_core_writes(corpus, tokenizer, tmp_path):
    manifest = load_manifest(_shards(corpus, tokenizer, tmp_path / "out")["directory"])
    rebuilt = str(tmp_path / "rebuilt")
    for prefix in split_prefixes(manifest, "train") + split_prefixes(manifest, "valid"):
        dataset = IndexedDataset(prefix)
        builder = IndexedDatasetBuilder(rebuilt + ".bin", dtype=np.uint16)
        for a, b in pairwise(dataset.document_indices):
            sentences = [dataset[i] for i in range(a, b)]
            builder.add_document(np.concatenate(sentences), [s.size for s in sentences])
        builder.finalize(rebuilt + ".idx")
        for suffix in (".bin", ".idx"):
            assert Path(rebuilt + suffix).read_bytes() == Path(prefix + suffix).read_bytes()


def test_split_many_is_split_sentences(corpus):
    every_char = "".join(f"a.{chr(c)}b\n{chr(c)}\nc " for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    tricky = ["", " \t", "x", "Why?No. Yes!\tOk", "a\n \n\n b.", "é.  ü\n\x0b\n", "😀. x\u3000\n\u2028\nz. "]
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()] + tricky
    for batch in (texts, tricky, [every_char], []):
        expected = [split_sentences(text) for text in batch]
        sentences, counts = split_many(batch)
        assert sentences == [s for text in expected for s in text]
        assert counts.tolist() == [len(text) for text in expected]


def test_worker_count_does_not_change_shards(corpus, tokenizer, tmp_path):
    one = _shards(corpus, tokenizer, tmp_path / "one", workers=1, chunk_documents=16)
    two = _shards(corpus, tokenizer, tmp_path / "two", workers=2, chunk_documents=16)
    assert one["splits"] == two["splits"]  # same files, same sha256s


@pytest.mark.parametrize("workers, chunk_documents", [(1, 256), (2, 2)])  # units across the bad lines
def test_bad_input_is_counted_not_dropped(tokenizer, tmp_path, workers, chunk_documents):
    good = [json.dumps({"text": f"Document number {i}. It has two sentences."}) for i in range(5)]
    bad = [
        json.dumps({"text": "   "}).encode(),  # line 6: empty
        b'{"text": "caf\xe9"}',  # 7: invalid UTF-8
        b'{"text": "unterminated',  # 8: malformed JSON
        json.dumps({"body": "no text field"}).encode(),  # 9: missing field
        json.dumps({"text": 42}).encode(),  # 10: non-string field
        json.dumps({"text": "\u200b"}).encode(),  # 11: tokenizes to nothing
        b'{"text": "lone \\ud800 surrogate"}',  # 12: not encodable
    ]
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_bytes(b"\n".join([g.encode() for g in good] + bad) + b"\n")
    text = tmp_path / "notes.txt"
    text.write_bytes(b"First block.\nStill first.\n\n\xff\xfe broken block\n\nThird block.\n")
    missing = tmp_path / "missing.jsonl"
    manifest = build_shards([jsonl, text, missing], tokenizer, tmp_path / "out", valid_fraction=0.0,
                            workers=workers, chunk_documents=chunk_documents, progress=False)  # fmt: skip

    rejected = {reason: entry["count"] for reason, entry in manifest["rejected"].items()}
    assert rejected == {
        "empty": 1, "invalid_utf8": 3, "malformed_json": 1, "missing_field": 1,
        "non_string_field": 1, "empty_after_tokenization": 1, "missing_file": 1,
    }  # fmt: skip
    examples = {reason: entry["examples"] for reason, entry in manifest["rejected"].items()}
    assert examples["malformed_json"] == [{"file": str(jsonl), "line": 8}]
    assert examples["empty_after_tokenization"] == [{"file": str(jsonl), "line": 11}]
    assert examples["invalid_utf8"] == [
        {"file": str(jsonl), "line": 7}, {"file": str(jsonl), "line": 12}, {"file": str(text), "line": 4},
    ]  # fmt: skip
    assert examples["missing_file"][0]["file"] == str(missing)
    counts = manifest["counts"]
    assert counts["documents_written"] == 5 + 2  # the good JSONL lines and two text blocks
    assert counts["documents_in"] == counts["documents_written"] + counts["documents_rejected"]


def test_jsonl_lines_parse_as_json_loads_does(tmp_path):
    lines = ['{"text": "plain"}', '\ufeff{"text": "bom"}', '{"text": "extra"} x', ' {"text": "spaced"} \r',
             '{"text": "a"}{"text": "b"}', '["text"]', '{"text": NaN}', '{"text": "x", "text": "last"}', '"text"',
             '{"text": "\\u00e9 escaped", "n": [1, {"m": null}]}', '{"text": "cut', '\x0c{"text": "ff"}']  # fmt: skip
    path = tmp_path / "edge.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    expected, malformed = [], 0
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            malformed += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            expected.append(record["text"])
    counter = RejectCounter()
    assert [doc.text for doc in read_documents([path], counter)] == expected
    assert counter.documents_in == len(lines) and counter.reasons["malformed_json"] == malformed == 5


def test_manifest_detects_corrupt_and_missing_shards(corpus, tokenizer, tmp_path):
    directory = _shards(corpus, tokenizer, tmp_path)["directory"]
    assert load_manifest(directory)["directory"] == directory
    shard = tmp_path / "train_00001.bin"
    original = shard.read_bytes()
    shard.write_bytes(original[:10] + bytes([original[10] ^ 1]) + original[11:])
    with pytest.raises(ManifestError, match="train_00001.bin"):
        load_manifest(tmp_path)
    manifest = load_manifest(tmp_path, verify=False)
    shard.write_bytes(original)
    (tmp_path / "valid_00000.idx").unlink()
    for verify in (True, False):  # without checksums too: every file is stat'ed
        with pytest.raises(ManifestError, match="valid_00000.idx"):
            load_manifest(tmp_path, verify)
    with pytest.raises(ManifestError, match="no split 'test'"):
        split_prefixes(manifest, "test")


def test_parquet_hf_and_directory_inputs(tmp_path):
    texts = ["alpha beta.", None, "gamma delta.", 7]
    pq.write_table(pa.table({"text": pa.array(texts[:3])}), tmp_path / "b.parquet", row_group_size=2)
    (tmp_path / "a.txt").write_text("one.\n\ntwo.\n")
    datasets.Dataset.from_dict({"content": ["from hf.", ""]}).save_to_disk(str(tmp_path / "hf"))
    counter = RejectCounter()
    docs = read_documents([tmp_path / "hf", tmp_path], counter, text_field="content")  # hf/ read once
    assert [d.text for d in docs] == ["from hf.", "one.", "two."]  # .txt has no fields
    assert counter.reasons == {"empty": 1, "missing_field": 3} and counter.documents_in == 7
    counter = RejectCounter()
    docs = read_documents([tmp_path], counter)  # a.txt, b.parquet, then the dataset hf/ (no "text" column)
    assert [(d.text, d.line) for d in docs] == [
        ("one.", 1),
        ("two.", 3),
        ("alpha beta.", 0),
        ("gamma delta.", 2),
    ]
    assert counter.to_dict()["missing_field"] == {
        "count": 3,
        "examples": [
            {"file": str(tmp_path / "b.parquet"), "line": 1},
            {"file": str(tmp_path / "hf"), "line": 0},
            {"file": str(tmp_path / "hf"), "line": 1},
        ],
    }
    assert counter.documents_in == 7


def test_cli_runs_and_user_errors_exit_2(corpus, tokenizer, tmp_path, capsys):
    main(
        [
            "prep",
            "shards",
            "--input",
            str(corpus),
            "--tokenizer",
            str(tokenizer),
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert "manifest.json" in capsys.readouterr().out
    env = os.environ | {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for args in (["--input", str(tmp_path / "nope.jsonl")], ["--valid-fraction", "1.5"]):
        run = subprocess.run([sys.executable, "-m", "data_prep.cli", "prep", "shards", *args],
                             capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert "error:" in run.stderr.splitlines()[-1]


def test_the_tokenizer_may_be_named_by_its_directory(corpus, tokenizer, tmp_path, capsys):
    main(["prep", "shards", "--input", str(corpus), "--tokenizer", str(tokenizer.parent), "--out",
          str(tmp_path / "shards"), "--no-progress"])  # fmt: skip
    assert load_manifest(tmp_path / "shards")["tokenizer"]["sha256"] == file_sha256(tokenizer)
    with pytest.raises(SystemExit) as exit_info:
        main(["prep", "shards", "--input", str(corpus), "--tokenizer", str(tmp_path), "--out",
              str(tmp_path / "other"), "--no-progress"])  # fmt: skip
    assert exit_info.value.code == 2
    assert f"tokenizer not found: {tmp_path / 'tokenizer.model'}" in capsys.readouterr().err


def test_instances_help_lists_every_objective_param_with_its_default(capsys):
    from data_prep.instances.base import available, instance_type

    with pytest.raises(SystemExit) as exit_info:
        main(["prep", "instances", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "required by objective ernie" in " ".join(text.split())  # argparse wraps the help
    table = text[text.index("--param KEY=VALUE keys by objective") :]
    assert "    max_seq_length [128]\n" in table and "    poisson_lambda [3.0]\n" in table
    for name in available():
        assert name in table
        for key in instance_type(name).Params.model_fields:
            assert f"    {key} [" in table
