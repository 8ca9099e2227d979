"""manifest.json: what a shard or instance directory holds and how it was made, read before any of its data.

Every data file is listed with its sha256, so a corrupt or missing file is detected, not trusted. The
manifest carries the sha256 of its own content (`manifest_sha256`, over its canonical JSON), so a damaged or
edited manifest is detected too, and names the files it lists (and the tokenizer) relative to its own
directory, so moving the data directory keeps it valid.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from plmscale.tokenizer import file_sha256

FORMAT = "plmscale-shards/2"
MANIFEST = "manifest.json"
CHECKSUM = "manifest_sha256"
# Formats without a manifest checksum and with absolute paths: rebuilt, not read (a manifest whose checksum
# field was damaged would otherwise pass for one of them).
OLD_FORMATS = ("plmscale-shards/1", "plmscale-instances/1")
# megatron-core's .idx: header (magic, version, dtype code, counts), then int32 sentence lengths, int64 byte
# offsets, int64 document boundaries (data_prep/shards.py writes it).
_IDX_HEADER_BYTES = 34


class ManifestError(ValueError):
    """A shard directory that is incomplete, corrupt or of another format."""


def _content_sha256(manifest: dict) -> str:
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_manifest(directory: str | Path, manifest: dict) -> None:
    """Written last and atomically, with its checksum: a directory with a manifest holds a finished run."""
    manifest = {key: value for key, value in manifest.items() if key != CHECKSUM}
    manifest[CHECKSUM] = _content_sha256(manifest)
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as handle:
        handle.write(json.dumps(manifest, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def relative_path(path: str | Path, directory: str | Path) -> str:
    """`path` as a manifest in `directory` records it: relative to that directory."""
    return os.path.relpath(Path(path).resolve(), Path(directory).resolve())


def tokenizer_path(manifest: dict) -> Path:
    """The tokenizer a manifest names, resolved against its directory."""
    return Path(os.path.normpath(Path(manifest["directory"]) / manifest["tokenizer"]["path"]))


def read_manifest(directory: str | Path, fmt: str, how_to_build: str, error: type[Exception]) -> dict:
    """`directory/manifest.json` of format `fmt`, checked against its own checksum, with its resolved
    directory under "directory". Every way it can be wrong is one line naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise error(f"{directory}: {'not a directory' if directory.exists() else 'no such directory'}; "
                    f"{how_to_build}")  # fmt: skip
    directory = directory.resolve()
    path = directory / MANIFEST
    if not path.is_file():
        raise error(f"{path} not found: {how_to_build}")
    try:
        manifest = json.loads(path.read_bytes().decode())
    except UnicodeDecodeError:
        raise error(f"{path}: corrupt (not UTF-8 text); {how_to_build}") from None
    except json.JSONDecodeError as err:
        raise error(
            f"{path}: corrupt or truncated (invalid JSON at line {err.lineno}: {err.msg}); {how_to_build}"
        ) from None
    if not isinstance(manifest, dict):
        raise error(f"{path}: corrupt (not a JSON object); {how_to_build}")
    found = manifest.get("format")
    if found in OLD_FORMATS:
        raise error(
            f"{path}: format {found!r} predates manifest checksums and relative paths; {how_to_build} again"
        )
    if found != fmt:
        raise error(f"{path}: format {found!r}, expected {fmt!r}")
    recorded = manifest.pop(CHECKSUM, None)
    if recorded is None:
        raise error(f"{path}: has no {CHECKSUM} (damaged or written by hand); {how_to_build}")
    if recorded != _content_sha256(manifest):
        raise error(f"{path}: edited or corrupt (its content does not match its {CHECKSUM}); {how_to_build}")
    return manifest | {"directory": str(directory)}


def verify_file(path: Path, sha256: str, error: type[Exception] = ManifestError) -> None:
    """A missing file, or one whose bytes differ from its recorded sha256, is named, never read."""
    if not path.is_file():
        raise error(f"file missing: {path}")
    if file_sha256(path) != sha256:
        raise error(f"file corrupt (sha256 differs from its record): {path}")


def _shard_file_bytes(name: str, shard: dict, token_bytes: int) -> int:
    if name.endswith(".bin"):
        return shard["tokens"] * token_bytes
    return _IDX_HEADER_BYTES + 12 * shard["sentences"] + 8 * (shard["documents"] + 1)


def load_manifest(directory: str | Path, verify: bool = True) -> dict:
    """Read a shard directory's manifest; with `verify`, check every shard file's sha256, without it only
    that each file is there with the size its counts give (a stat: a truncated shard is still named)."""
    manifest = read_manifest(directory, FORMAT, "build the shards with `plmscale prep shards`", ManifestError)
    token_bytes = np.dtype(manifest["dtype"]).itemsize
    for shards in manifest["splits"].values():
        for shard in shards:
            for name, sha256 in shard["files"].items():
                path = Path(manifest["directory"]) / name
                if verify:
                    verify_file(path, sha256)
                elif not path.is_file():
                    raise ManifestError(f"file missing: {path}")
                elif path.stat().st_size != _shard_file_bytes(name, shard, token_bytes):
                    raise ManifestError(
                        f"file truncated or corrupt: {path} has {path.stat().st_size} bytes, its counts in "
                        f"{MANIFEST} give {_shard_file_bytes(name, shard, token_bytes)}"
                    )
    return manifest


def split_prefixes(manifest: dict, split: str) -> list[str]:
    """Absolute path prefixes of a split's shards, for megatron-core's `IndexedDataset(prefix)`."""
    if split not in manifest["splits"]:
        raise ManifestError(
            f"no split {split!r} in {manifest['directory']}; has {sorted(manifest['splits'])}"
        )
    return [str(Path(manifest["directory"]) / shard["prefix"]) for shard in manifest["splits"][split]]
