"""manifest.json: what a shard directory holds and how it was made; the training side reads it here.

Every shard file is listed with its sha256, so a corrupt or missing shard is detected, not trusted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from plmscale.tokenizer import file_sha256

FORMAT = "plmscale-shards/1"
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    """A shard directory that is incomplete, corrupt or of another format."""


def write_manifest(directory: str | Path, manifest: dict) -> None:
    """Written last and atomically: a directory with a manifest holds a finished run."""
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(directory: str | Path, fmt: str, how_to_build: str, error: type[Exception]) -> dict:
    """`directory/manifest.json` of format `fmt`, with its resolved directory under "directory"."""
    directory = Path(directory).resolve()
    path = directory / MANIFEST
    if not path.is_file():
        raise error(f"{path} not found: {how_to_build}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != fmt:
        raise error(f"{path}: format {manifest.get('format')!r}, expected {fmt!r}")
    return manifest | {"directory": str(directory)}


def verify_file(path: Path, sha256: str, error: type[Exception] = ManifestError) -> None:
    """A missing file, or one whose bytes differ from its recorded sha256, is named, never read."""
    if not path.is_file():
        raise error(f"file missing: {path}")
    if file_sha256(path) != sha256:
        raise error(f"file corrupt (sha256 differs from its record): {path}")


def load_manifest(directory: str | Path, verify: bool = True) -> dict:
    """Read a shard directory's manifest; with `verify`, check every shard file's sha256."""
    manifest = read_manifest(directory, FORMAT, "build the shards with `plmscale prep shards`", ManifestError)
    if verify:
        for shards in manifest["splits"].values():
            for shard in shards:
                for name, sha256 in shard["files"].items():
                    verify_file(Path(manifest["directory"]) / name, sha256)
    return manifest


def split_prefixes(manifest: dict, split: str) -> list[str]:
    """Absolute path prefixes of a split's shards, for megatron-core's `IndexedDataset(prefix)`."""
    if split not in manifest["splits"]:
        raise ManifestError(
            f"no split {split!r} in {manifest['directory']}; has {sorted(manifest['splits'])}"
        )
    return [str(Path(manifest["directory"]) / shard["prefix"]) for shard in manifest["splits"][split]]
