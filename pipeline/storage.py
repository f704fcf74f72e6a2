"""Where shard sets live: local paths, ``file://``, ``http(s)://`` and other fsspec URLs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import fsspec


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def join(root: str | Path, *parts: str) -> str:
    """Join a root (path or URL) and relative parts with '/'."""
    return "/".join([str(root).rstrip("/"), *parts])


def read_bytes(location: str) -> bytes:
    """The whole file at a local path or URL."""
    if not is_url(location):
        return Path(location).read_bytes()
    with fsspec.open(location, "rb") as f:
        return f.read()


def exists(location: str) -> bool:
    if not is_url(location):
        return Path(location).exists()
    fs, path = fsspec.core.url_to_fs(location)
    return fs.exists(path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zarr_store(location: str, read_only: bool = True):
    """A zarr v3 store for a local path or any fsspec URL."""
    from zarr.storage import FsspecStore, LocalStore

    if is_url(location) and not location.startswith("file://"):
        return FsspecStore.from_url(location, read_only=read_only)
    path = location.removeprefix("file://")
    return LocalStore(path, read_only=read_only)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
