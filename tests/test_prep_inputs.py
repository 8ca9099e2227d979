"""Every input file is accounted for: compressed JSONL and text give the plain file's shards byte for byte, a file
of another type is listed as skipped, an unreadable one is rejected up front by reason, and a run that writes
nothing fails with exit code 2 and no manifest."""

import bz2
import gzip
import json
import lzma
import os
import random
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
import zstandard
from conftest import BIN

from data_prep import UserError
from data_prep.cli import main
from data_prep.inputs import check_inputs, scan_inputs
from data_prep.readers import RejectCounter
from data_prep.shards import build_shards
from data_prep.tokenizer import train_tokenizer

COMPRESS = {
    ".gz": lambda data: gzip.compress(data, mtime=0),
    ".zst": lambda data: zstandard.ZstdCompressor().compress(data),
    ".bz2": lambda data: bz2.compress(data, compresslevel=1),  # 100 kB blocks: a cut file keeps some
    ".xz": lzma.compress,
}
DECOMPRESS_PREFIX = {  # what a decompressor makes of a cut stream, up to the cut
    ".gz": lambda data: zlib.decompressobj(31).decompress(data),
    ".zst": lambda data: zstandard.ZstdDecompressor().decompressobj().decompress(data),
    ".bz2": lambda data: bz2.BZ2Decompressor().decompress(data),
    ".xz": lambda data: lzma.LZMADecompressor().decompress(data),
}


@pytest.fixture(scope="module")
def tokenizer(shards) -> Path:
    return shards.parent / "tokenizer" / "tokenizer.model"


@pytest.fixture(scope="module")
def corpus(shards) -> dict[str, bytes]:
    """The shared corpus as JSONL and as text (a block per document), with bad records among the good."""
    texts = [json.loads(line)["text"] for line in (shards.parent / "corpus.jsonl").read_text().splitlines()]
    jsonl = [json.dumps({"text": t}).encode() for t in texts]
    jsonl[10:10] = [b'{"text": "cut', b"", b'{"text": "caf\xe9"}', b'{"text": "  "}']
    blocks = [t.replace("\n\n", "\n").encode() for t in texts]
    blocks[7:7] = [b"\xff\xfe not UTF-8"]
    return {"jsonl": b"\n".join(jsonl), "text": b"\n\n".join(blocks)}  # no final newline: read all the same


def _build(paths, tokenizer, out, workers=1) -> dict:
    return build_shards(paths, tokenizer, out, workers=workers, valid_fraction=0.1, shard_tokens=30_000,
                        chunk_documents=16, progress=False)  # fmt: skip


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix in (".bin", ".idx")}


def _rejected(manifest: dict) -> dict:
    """The rejected records by reason, with their lines, whatever the file's name."""
    return {r: (e["count"], [x["line"] for x in e["examples"]]) for r, e in manifest["rejected"].items()}


@pytest.mark.parametrize("fmt, name", [("jsonl", "corpus.jsonl"), ("text", "corpus.txt")])
def test_compressed_inputs_give_the_plain_files_shards(corpus, tokenizer, tmp_path, fmt, name):
    plain = tmp_path / name
    plain.write_bytes(corpus[fmt])
    reference = _build([plain], tokenizer, tmp_path / "plain")
    expected = _files(tmp_path / "plain")
    assert len(expected) >= 4 and _rejected(reference)["invalid_utf8"][0] == 1
    half = len(corpus[fmt]) // 2
    for suffix, compress in COMPRESS.items():
        path = tmp_path / (name + suffix)  # two members / frames / streams, as `cat a.gz b.gz` makes
        path.write_bytes(compress(corpus[fmt][:half]) + compress(corpus[fmt][half:]))
        for workers in (1, 2):
            manifest = _build([path], tokenizer, tmp_path / f"{suffix}{workers}", workers)
            assert _files(tmp_path / f"{suffix}{workers}") == expected, (suffix, workers)
            assert manifest["counts"] == reference["counts"]
            assert _rejected(manifest) == _rejected(reference)
            assert manifest["inputs"][0]["compression"] == suffix


def test_a_tokenizer_trained_on_a_compressed_corpus_is_the_plain_corpus_tokenizer(corpus, tmp_path):
    (tmp_path / "corpus.jsonl").write_bytes(corpus["jsonl"])
    (tmp_path / "corpus.jsonl.zst").write_bytes(COMPRESS[".zst"](corpus["jsonl"]))
    out = tmp_path / "tok"  # one directory for both: the model records its path
    plain = train_tokenizer([tmp_path / "corpus.jsonl"], out, vocab_size=400)
    packed = train_tokenizer([tmp_path / "corpus.jsonl.zst"], out, vocab_size=400)
    assert packed["sha256"] == plain["sha256"] and packed["counts"] == plain["counts"]
    assert packed["rejected"]["malformed_json"]["examples"][0]["line"] == 11


@pytest.mark.parametrize(
    "fmt, suffix", [("jsonl", ".gz"), ("jsonl", ".zst"), ("jsonl", ".bz2"), ("jsonl", ".xz"), ("text", ".gz")]
)
def test_a_cut_stream_keeps_the_records_before_the_cut(corpus, tokenizer, tmp_path, fmt, suffix):
    data = COMPRESS[suffix](corpus[fmt])
    name = "cut.jsonl" if fmt == "jsonl" else "cut.txt"
    cut = tmp_path / (name + suffix)
    cut.write_bytes(data[: len(data) * 3 // 5])
    prefix = DECOMPRESS_PREFIX[suffix](cut.read_bytes())
    whole = prefix[: prefix.rfind(b"\n") + 1].splitlines(keepends=True)  # a line cut short is not a record
    if fmt == "text":  # nor is a block not yet ended by a blank line
        whole = whole[: max(i + 1 for i, line in enumerate(whole) if not line.strip())]
    assert 100 < len(whole) < len(corpus[fmt].splitlines())
    plain = tmp_path / name
    plain.write_bytes(b"".join(whole))
    reference = _build([plain], tokenizer, tmp_path / "plain")

    manifest = _build([cut], tokenizer, tmp_path / "cut", workers=2)
    assert _files(tmp_path / "cut") == _files(tmp_path / "plain")
    rejected = manifest["rejected"].pop("corrupt_file")
    assert rejected["count"] == 1 and rejected["examples"][0]["line"] == len(whole) + 1
    assert rejected["examples"][0]["file"] == str(cut) and "Error" in rejected["examples"][0]["error"]
    assert _rejected(manifest) == _rejected(reference)
    counts = manifest["counts"]
    assert counts["documents_in"] == reference["counts"]["documents_in"] + 1
    assert counts["documents_in"] == counts["documents_written"] + counts["documents_rejected"]


def test_a_flipped_byte_in_a_gzip_stream_is_counted_not_raised(corpus, tokenizer, tmp_path):
    data = bytearray(COMPRESS[".gz"](corpus["jsonl"]))
    data[len(data) // 2] ^= 0x55
    path = tmp_path / "flipped.jsonl.gz"
    path.write_bytes(data)
    manifest = _build([path], tokenizer, tmp_path / "out", workers=2)
    assert manifest["rejected"]["corrupt_file"]["count"] == 1
    counts = manifest["counts"]
    assert counts["documents_in"] == counts["documents_written"] + counts["documents_rejected"]
    assert counts["documents_written"] > 100


def test_files_of_other_types_are_listed_as_skipped(tokenizer, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "part.jsonl").mkdir()  # a directory is walked, whatever its name
    (data / ".git").mkdir()
    (data / ".git" / "HEAD").write_text("ref\n")
    good = json.dumps({"text": "A good document. It has two sentences."})
    (data / "a.jsonl").write_text(good + "\n")
    (data / "sub" / "b.txt.gz").write_bytes(gzip.compress(b"A text block.\n\nAnother one.\n"))
    (data / "part.jsonl" / "c.jsonl").write_text(good.replace("good", "nested") + "\n")
    (data / "records.json").write_text(json.dumps([{"text": "an array, not JSON Lines"}]))
    (data / "table.csv").write_text("text\nhello\n")
    (data / "d.jsonl.lz4").write_bytes(b"\x04\x22\x4d\x18")
    (data / "README").write_text("about this data\n")
    (data / ".hidden.jsonl").write_text(good + "\n")
    out = tmp_path / "out"
    main(["prep", "shards", "--input", str(data), "--tokenizer", str(tokenizer), "--out", str(out),
          "--workers", "1", "--no-progress"])  # fmt: skip

    manifest = json.loads((out / "manifest.json").read_text())
    assert [(Path(s["path"]).relative_to(data).as_posix(), s["reason"]) for s in manifest["skipped"]] == [
        (".git", "hidden"),
        (".hidden.jsonl", "hidden"),
        ("README", "unsupported_format"),
        ("d.jsonl.lz4", "unsupported_compression"),
        ("records.json", "ambiguous_json"),
        ("table.csv", "unsupported_format"),
    ]
    read = [(Path(e["path"]).relative_to(data).as_posix(), e["format"]) for e in manifest["inputs"]]
    assert read == [("a.jsonl", "jsonl"), ("part.jsonl/c.jsonl", "jsonl"), ("sub/b.txt.gz", "text")]
    assert all(len(e["sha256"]) == 64 for e in manifest["inputs"])
    assert manifest["counts"]["documents_in"] == manifest["counts"]["documents_written"] == 4
    assert manifest["rejected"] == {}
    printed = capsys.readouterr().out
    assert f"skipped ambiguous_json: 1 (first: {data / 'records.json'})" in printed
    assert f"skipped unsupported_format: 2 (first: {data / 'README'}, {data / 'table.csv'})" in printed


def test_unreadable_files_are_rejected_before_any_is_read(tokenizer, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text(json.dumps({"text": "Readable. Two sentences."}) + "\n")
    (data / "broken.jsonl").symlink_to(tmp_path / "gone.jsonl")
    os.mkfifo(data / "fifo.jsonl")  # reading it would block forever
    (data / "noise.jsonl.gz").write_bytes(random.Random(0).randbytes(500))
    (data / "empty.txt.xz").write_bytes(b"")  # not an xz stream

    counter = RejectCounter()
    found = scan_inputs([data], counter)
    assert [s.path.name for s in found.sources] == ["a.jsonl"]
    assert counter.reasons == {"broken_symlink": 1, "not_a_file": 1, "corrupt_file": 2}
    assert counter.documents_in == 4  # each rejected file is one record; nothing was read yet
    rejected = {Path(e["path"]).name: e["rejected"] for e in found.entries if "rejected" in e}
    assert rejected == {
        "broken.jsonl": "broken_symlink", "empty.txt.xz": "corrupt_file",
        "fifo.jsonl": "not_a_file", "noise.jsonl.gz": "corrupt_file",
    }  # fmt: skip

    manifest = _build([data], tokenizer, tmp_path / "out", workers=2)
    examples = manifest["rejected"]["broken_symlink"]["examples"]
    assert examples == [{"file": str(data / "broken.jsonl"), "line": None,
                         "error": f"points to {tmp_path / 'gone.jsonl'}, which does not exist"}]  # fmt: skip
    assert "BadGzipFile" in manifest["rejected"]["corrupt_file"]["examples"][1]["error"]
    counts = manifest["counts"]
    assert (
        counts["documents_written"] == 1
        and counts["documents_in"] == 1 + 4 == 1 + counts["documents_rejected"]
    )


def _run(*args: str, unprivileged: bool = False) -> subprocess.CompletedProcess:
    command = [str(BIN / "plmscale"), *args]
    if unprivileged and os.geteuid() == 0:  # root reads a mode-000 file: drop the capabilities that allow it
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: a mode-000 file stays readable")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    return subprocess.run(command, capture_output=True, text=True)


def test_a_file_without_read_permission_is_rejected_not_a_crash(tokenizer, tmp_path):
    data = tmp_path / "data"
    (data / "locked_dir").mkdir(parents=True)
    (data / "a.jsonl").write_text(json.dumps({"text": "Readable. Two sentences."}) + "\n")
    (data / "locked.jsonl").write_text(json.dumps({"text": "Not readable."}) + "\n")
    (data / "locked.jsonl").chmod(0)
    (data / "locked_dir").chmod(0)
    try:
        run = _run("prep", "shards", "--input", str(data), "--tokenizer", str(tokenizer), "--out",
                   str(tmp_path / "out"), "--workers", "1", "--no-progress", unprivileged=True)  # fmt: skip
    finally:
        (data / "locked_dir").chmod(0o755)
    assert run.returncode == 0, run.stderr
    first = f"{data / 'locked.jsonl'}, {data / 'locked_dir'}"
    assert f"rejected permission_denied: 2 (first: {first})" in run.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [e.get("rejected") for e in manifest["inputs"]] == [None, "permission_denied", "permission_denied"]
    assert manifest["counts"]["documents_in"] == 3 and manifest["counts"]["documents_written"] == 1


@pytest.mark.parametrize("case", ["empty", "random_bytes", "only_unsupported"])
def test_a_run_that_writes_nothing_exits_2_and_says_why(tokenizer, tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    if case == "empty":
        (data / "empty.jsonl").write_bytes(b"")
        why = "nothing written: 1 file(s) read, 0 records in, 0 rejected\n"
    elif case == "random_bytes":
        (data / "noise.jsonl").write_bytes(random.Random(0).randbytes(20_000))
        why = "rejected; invalid_utf8: "
    else:
        (data / "table.csv").write_text("text\nhello\n")
        (data / "records.json").write_text("[]")
        why = "1 file(s) skipped as ambiguous_json (first: "
    out = tmp_path / "out"
    run = _run("prep", "shards", "--input", str(data), "--tokenizer", str(tokenizer), "--out", str(out),
               "--workers", "2", "--no-progress")  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert run.stderr.startswith("plmscale prep shards: error: nothing written: ") and why in run.stderr
    assert not out.exists() or not any(out.iterdir())  # no manifest, no shard


def test_a_tokenizer_from_nothing_exits_2(tmp_path):
    (tmp_path / "noise.txt").write_bytes(b"\xff\xfe\n\n\xc3\x28\n")
    run = _run("prep", "tokenizer", "--input", str(tmp_path / "noise.txt"), "--out", str(tmp_path / "tok"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "nothing written: 1 file(s) read, 2 records in, 2 rejected; invalid_utf8: 2" in run.stderr


def test_a_json_file_on_the_command_line_is_refused_with_a_hint(tmp_path):
    (tmp_path / "records.json").write_text("[]")
    with pytest.raises(UserError, match=r"records\.json: expected .*\(JSON Lines belong in \.jsonl files\)"):
        check_inputs([tmp_path / "records.json"])
    (tmp_path / "corpus.jsonl.zst").write_bytes(b"")
    check_inputs([tmp_path / "corpus.jsonl.zst"])  # accepted
