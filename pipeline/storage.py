"""Where shard sets live: local paths, ``file://``, ``http(s)://`` and other fsspec URLs."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a local file, read in 1 MiB blocks (source HDF5 files can be tens of GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def zarr_store(location: str, read_only: bool = True):
    """A zarr v3 store for a local path or any fsspec URL."""
    from zarr.storage import FsspecStore, LocalStore

    if is_url(location) and not location.startswith("file://"):
        return FsspecStore.from_url(location, read_only=read_only)
    path = location.removeprefix("file://")
    return LocalStore(path, read_only=read_only)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed into place when the block succeeds,
    so a reader never sees a half-written file. A failed block leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
