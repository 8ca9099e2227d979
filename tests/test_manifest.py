"""Manifests are trustworthy: checksummed, relative paths (a moved data directory stays valid), every kind
of damage one clear error naming the file; and corrupt token ids are caught on read without checksums."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_VOCAB

from data_prep.instances.build import build_instances
from plmscale.data import InstanceSet, PackedStream
from plmscale.data.instances import InstanceSetError, load_instance_manifest
from plmscale.manifest import CHECKSUM, MANIFEST, ManifestError, load_manifest, tokenizer_path


def _copy_data(shards: Path, root: Path) -> Path:
    """The shards and their tokenizer, side by side as prep writes them, under `root`."""
    shutil.copytree(shards.parent / "tokenizer", root / "tokenizer")
    return Path(shutil.copytree(shards, root / "shards"))


def _windows(stream: PackedStream, length: int = 64) -> np.ndarray:
    return np.stack([stream.window(i, length) for i in range(stream.num_windows(length))])


def test_manifest_records_its_checksum_and_relative_paths(shards):
    text = json.loads((shards / MANIFEST).read_text())
    assert len(text[CHECKSUM]) == 64
    assert text["tokenizer"]["path"] == "../tokenizer/tokenizer.model"
    manifest = load_manifest(shards)
    assert tokenizer_path(manifest) == shards.parent / "tokenizer" / "tokenizer.model"


def test_moved_data_directory_stays_valid(shards, tmp_path):
    original = _windows(PackedStream.from_manifest(str(shards), "valid"))
    _copy_data(shards, tmp_path / "before")
    os.rename(tmp_path / "before", tmp_path / "after")
    moved = load_manifest(tmp_path / "after" / "shards", verify=True)
    assert tokenizer_path(moved) == tmp_path / "after" / "tokenizer" / "tokenizer.model"
    stream = PackedStream.from_manifest(str(tmp_path / "after" / "shards"), "valid")
    np.testing.assert_array_equal(_windows(stream), original)


@pytest.fixture(scope="module")
def manifest_bytes(shards) -> bytes:
    return (shards / MANIFEST).read_bytes()


def _damaged(shards: Path, root: Path, content: bytes) -> Path:
    directory = _copy_data(shards, root)
    (directory / MANIFEST).write_bytes(content)
    return directory


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3, 0.5, 0.9, 0.999])
def test_truncated_manifest_is_named(shards, manifest_bytes, tmp_path, fraction):
    directory = _damaged(shards, tmp_path, manifest_bytes[: int(len(manifest_bytes) * fraction)])
    with pytest.raises(ManifestError, match=rf"^{directory / MANIFEST}: corrupt or truncated \(invalid JSON"):
        load_manifest(directory, verify=False)


def test_every_flipped_byte_is_named(shards, manifest_bytes, tmp_path):
    """A flipped bit anywhere (40 places spread over the file, low and high bit) is an error naming the
    manifest: invalid JSON, a wrong format, or content that no longer matches the checksum."""
    directory = _copy_data(shards, tmp_path)
    path = directory / MANIFEST
    for position in np.linspace(0, len(manifest_bytes) - 2, 20).astype(int):  # not the final newline
        for bit in (0x01, 0x80):
            flipped = bytearray(manifest_bytes)
            flipped[position] ^= bit
            path.write_bytes(bytes(flipped))
            with pytest.raises(ManifestError) as err:
                load_manifest(directory, verify=False)
            message = str(err.value)
            assert message.startswith(f"{path}: ") and "\n" not in message, (position, bit, message)


def test_edited_unsigned_and_old_manifests_are_named(shards, manifest_bytes, tmp_path):
    manifest = json.loads(manifest_bytes)
    edited = manifest | {"tokenizer": manifest["tokenizer"] | {"path": "/elsewhere/tokenizer.model"}}
    directory = _damaged(shards, tmp_path / "edited", json.dumps(edited).encode())
    with pytest.raises(ManifestError, match=f"{directory / MANIFEST}: edited or corrupt"):
        load_manifest(directory)
    unsigned = {key: value for key, value in manifest.items() if key != CHECKSUM}
    directory = _damaged(shards, tmp_path / "unsigned", json.dumps(unsigned).encode())
    with pytest.raises(ManifestError, match=f"{directory / MANIFEST}: has no {CHECKSUM}"):
        load_manifest(directory)
    old = unsigned | {"format": "plmscale-shards/1"}
    directory = _damaged(shards, tmp_path / "old", json.dumps(old).encode())
    with pytest.raises(ManifestError, match="'plmscale-shards/1' predates manifest checksums.*prep shards"):
        load_manifest(directory)


def _corrupt_token(path: Path, dtype: np.dtype, index: int) -> None:
    """Value `index` of a .bin file set to all ones: past any vocabulary, or -1 for a signed type."""
    data = bytearray(path.read_bytes())
    data[index * dtype.itemsize : (index + 1) * dtype.itemsize] = b"\xff" * dtype.itemsize
    path.write_bytes(bytes(data))


def test_corrupt_token_ids_stop_reading_without_checksums(shards, tmp_path):
    directory = _copy_data(shards, tmp_path)
    manifest = load_manifest(directory)
    _corrupt_token(directory / "valid_00000.bin", np.dtype(manifest["dtype"]), 5)
    with pytest.raises(ManifestError, match="valid_00000.bin"):  # checksums on: caught before reading
        load_manifest(directory, verify=True)
    stream = PackedStream.from_manifest(str(directory), "valid", verify=False)  # sizes still match
    assert stream.vocab_size == TEST_VOCAB
    with pytest.raises(ManifestError, match=r"valid_00000.bin: document 0 holds token ids outside .*2000"):
        stream.window(0, 64)
    last = stream.num_windows(64) - 1
    assert stream.window(last, 64).max() < TEST_VOCAB  # the other documents read as before


@pytest.fixture(scope="module")
def instances(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifest_instances") / "mlm"
    build_instances(shards, "mlm", out, params={"max_seq_length": 64}, progress=False)
    return out


def test_instance_manifest_is_checksummed_with_relative_paths(instances, tmp_path):
    text = json.loads((instances / MANIFEST).read_text())
    assert len(text[CHECKSUM]) == 64 and not os.path.isabs(text["tokenizer"]["path"])
    assert not os.path.isabs(text["source"]["directory"])
    assert tokenizer_path(load_instance_manifest(instances)).is_file()
    moved = Path(shutil.copytree(instances, tmp_path / "moved"))
    assert len(InstanceSet(moved)) == len(InstanceSet(instances))
    (moved / MANIFEST).write_bytes((moved / MANIFEST).read_bytes()[:-40])
    with pytest.raises(InstanceSetError, match=f"{moved / MANIFEST}: corrupt or truncated"):
        InstanceSet(moved)


def test_corrupt_instances_stop_reading_without_checksums(instances, tmp_path):
    moved = Path(shutil.copytree(instances, tmp_path / "mlm"))
    dtypes = load_instance_manifest(moved)["fields"]
    _corrupt_token(moved / "inst_00000.tokens.bin", np.dtype(dtypes["tokens"]), 0)
    with pytest.raises(InstanceSetError, match="inst_00000.tokens.bin"):
        InstanceSet(moved, verify=True)
    unverified = InstanceSet(moved, verify=False)
    with pytest.raises(InstanceSetError, match=r"inst_00000.tokens.bin: instance 0 holds token ids outside"):
        unverified[0]
    assert unverified[1]["tokens"].max() < TEST_VOCAB
    _corrupt_token(moved / "inst_00000.mask_positions.bin", np.dtype(dtypes["mask_positions"]), 0)
    shutil.copyfile(instances / "inst_00000.tokens.bin", moved / "inst_00000.tokens.bin")
    with pytest.raises(
        InstanceSetError, match=r"inst_00000.mask_positions.bin: instance 0 masks positions outside"
    ):
        InstanceSet(moved, verify=False)[0]
