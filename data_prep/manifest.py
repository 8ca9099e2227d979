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


def load_manifest(directory: str | Path, verify: bool = True) -> dict:
    """Read a shard directory's manifest; with `verify`, check every shard file's sha256."""
    directory = Path(directory).resolve()
    path = directory / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} not found: build the shards with `plmscale prep shards`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if verify:
        for shards in manifest["splits"].values():
            for shard in shards:
                for name, sha256 in shard["files"].items():
                    if not (directory / name).is_file():
                        raise ManifestError(f"shard file missing: {directory / name}")
                    if file_sha256(directory / name) != sha256:
                        raise ManifestError(
                            f"shard file corrupt (sha256 differs from manifest): {directory / name}"
                        )
    return manifest | {"directory": str(directory)}


def split_prefixes(manifest: dict, split: str) -> list[str]:
    """Absolute path prefixes of a split's shards, for megatron-core's `IndexedDataset(prefix)`."""
    if split not in manifest["splits"]:
        raise ManifestError(
            f"no split {split!r} in {manifest['directory']}; has {sorted(manifest['splits'])}"
        )
    return [str(Path(manifest["directory"]) / shard["prefix"]) for shard in manifest["splits"][split]]
