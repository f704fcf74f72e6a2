"""``manifest.json``: what a shard set holds, how it was made, and the checksum of every file.

Written last and atomically by the build's finalize step; readers refuse a manifest of another
schema version. See docs/shard-format.md for every key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.records import ShardError
from pipeline.storage import join, read_bytes, sha256_bytes, write_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_atomic(root / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def read_manifest(location: str) -> tuple[dict[str, Any], str]:
    """The manifest of a shard set and the sha256 of its bytes (the set's identity for checkpoints)."""
    path = join(location, MANIFEST)
    try:
        data = read_bytes(path)
    except (FileNotFoundError, OSError) as err:
        raise ShardError(f"{path}: no manifest; is this a finished shard set? ({err})") from None
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema_version {version!r}, this reader understands version {SCHEMA_VERSION}; "
            "rebuild the shards with this version of build_shards"
        )
    return manifest, sha256_bytes(data)
