"""The zarr (v3) shard format: one group per split, one array per record name.

Arrays are chunked along the snapshot axis in blocks of ``chunk`` snapshots -- one block per
output shard -- and zstd-compressed, so a reader request returns a contiguous block of
snapshots and every writer owns whole chunks (no two processes ever touch one chunk file).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import WrapperStore

from pipeline.records import ShardBlock, ShardError
from pipeline.storage import join, zarr_store

ZSTD_LEVEL = 3  # fields, latents, importance: fast
QUERY_ZSTD_LEVEL = 19  # the bitmasks are small; level 19 brings them near the entropy bound


def chunk_path(split: str, name: str, chunk_index: int, ndim: int) -> str:
    """Relative path of the chunk file holding block ``chunk_index`` of ``split/name`` (v3 default keys)."""
    return "/".join([split, name, "c", str(chunk_index), *["0"] * (ndim - 1)])


def create_arrays(
    root: Path, split: str, schema: dict[str, tuple[tuple[int, ...], str]], num: int, chunk: int
) -> None:
    """Create (or overwrite the metadata of) the arrays of one split; chunks are written later."""
    group = zarr.open_group(zarr_store(str(root), read_only=False), mode="a", zarr_format=3)
    split_group = group.require_group(split)
    for name, (tail, dtype) in schema.items():
        split_group.create_array(
            name,
            shape=(num, *tail),
            chunks=(chunk, *tail),
            dtype=dtype,
            compressors=ZstdCodec(level=QUERY_ZSTD_LEVEL if name == "queries" else ZSTD_LEVEL),
            fill_value=0,
            overwrite=True,
        )


def write_block(
    root: Path, split: str, chunk_index: int, chunk: int, block: ShardBlock
) -> list[str]:
    """Write one block into its own chunk of every array; returns the chunk files written."""
    group = zarr.open_group(zarr_store(str(root), read_only=False), mode="r+")[split]
    start = chunk_index * chunk
    written = []
    for name, values in block.arrays().items():
        # write_empty_chunks: a block equal to the fill value (e.g. the ids of trajectory 0)
        # must still leave its chunk file, which the shard record and the manifest list.
        array = group[name].with_config({"write_empty_chunks": True})
        array[start : start + len(values)] = values
        written.append(chunk_path(split, name, chunk_index, values.ndim))
    return written


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _VerifyingStore(WrapperStore):
    """Checks the sha256 of every chunk file it serves against the manifest."""

    def __init__(self, store, location: str, checksums: dict[str, str]):
        super().__init__(store)
        self._location, self._checksums = location, checksums

    async def get(self, key, prototype, byte_range=None):
        buf = await super().get(key, prototype, byte_range)
        expected = self._checksums.get(f"zarr/{key}")
        if buf is None and expected is not None:  # zarr would silently read the fill value
            raise ShardError(
                f"{join(self._location, key)}: missing shard file (listed in the manifest)"
            )
        verify = buf is not None and expected is not None and byte_range is None
        # hash off zarr's event loop thread, so that reads of several shards verify in parallel
        if verify and await asyncio.to_thread(_sha256, buf.to_bytes()) != expected:
            raise ShardError(
                f"{join(self._location, key)}: checksum mismatch (corrupt or edited shard file)"
            )
        return buf


class ZarrReader:
    """Reads contiguous snapshot blocks of one split, verifying each chunk file it touches."""

    def __init__(self, location: str, split: str, checksums: dict[str, str]):
        store = _VerifyingStore(zarr_store(location, read_only=True), location, checksums)
        try:
            group = zarr.open_group(store, mode="r")[split]
        except (FileNotFoundError, KeyError) as err:
            raise ShardError(f"{location}: no zarr group '{split}' ({err})") from None
        self._arrays = {name: group[name] for name in group.array_keys()}

    def read(self, start: int, stop: int) -> ShardBlock:
        data = {name: np.asarray(arr[start:stop]) for name, arr in self._arrays.items()}
        return ShardBlock(**data)
