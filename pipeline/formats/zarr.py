"""The zarr (v3) shard format: one group per split, one array per record name.

Arrays are chunked along the snapshot axis in blocks of ``chunk`` snapshots -- one block per
output shard -- and zstd-compressed, so a reader request returns a contiguous block of
snapshots and every writer owns whole chunks (no two processes ever touch one chunk file).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import WrapperStore

from pipeline.manifest import Manifest, ShardEntry
from pipeline.records import RecordSchema, ShardBlock, ShardError
from pipeline.storage import join, sha256_bytes, zarr_store

ZSTD_LEVEL = 3  # fields, latents, importance: fast
QUERY_ZSTD_LEVEL = 19  # the bitmasks are small; level 19 brings them near the entropy bound


def chunk_path(split: str, name: str, chunk_index: int, ndim: int) -> str:
    """Relative path of the chunk file holding block ``chunk_index`` of ``split/name`` (v3 default keys)."""
    return "/".join([split, name, "c", str(chunk_index), *["0"] * (ndim - 1)])


class ZarrWriter:
    """Writes the ``zarr/`` store of a set: arrays created once, then one chunk per array per shard."""

    def __init__(self, root: Path, schema: RecordSchema, chunk: int):
        self.root, self.schema, self.chunk = root / "zarr", schema, chunk

    def create(self, snapshots_per_split: dict[str, int]) -> None:
        """Create (or overwrite the metadata of) every split's arrays; chunks are written later."""
        group = zarr.open_group(
            zarr_store(str(self.root), read_only=False), mode="a", zarr_format=3
        )
        for split, num in snapshots_per_split.items():
            split_group = group.require_group(split)
            for name, (tail, dtype) in self.schema.items():
                level = QUERY_ZSTD_LEVEL if name == "queries" else ZSTD_LEVEL
                split_group.create_array(
                    name,
                    shape=(num, *tail),
                    chunks=(self.chunk, *tail),
                    dtype=dtype,
                    compressors=ZstdCodec(level=level),
                    fill_value=0,
                    overwrite=True,
                )

    def write(self, split: str, index: int, name: str, block: ShardBlock) -> list[str]:
        """Write one block into its own chunk of every array; returns the chunk files written."""
        group = zarr.open_group(zarr_store(str(self.root), read_only=False), mode="r+")[split]
        start = index * self.chunk
        written = []
        for array_name, values in block.arrays().items():
            # write_empty_chunks: a block equal to the fill value (e.g. the ids of trajectory 0)
            # must still leave its chunk file, which the shard record and the manifest list.
            array = group[array_name].with_config({"write_empty_chunks": True})
            array[start : start + len(values)] = values
            written.append("zarr/" + chunk_path(split, array_name, index, values.ndim))
        return written

    def leftovers(self, split: str, index: int, name: str) -> list[str]:
        """zarr's ``*.partial`` chunk files of the shard's chunks."""
        patterns = []
        for array_name in self.schema:
            patterns.append(f"zarr/{split}/{array_name}/c/{index}.*.partial")
            patterns.append(f"zarr/{split}/{array_name}/c/{index}/**/*.partial")
        return patterns

    def metadata(self) -> list[str]:
        return [
            meta.relative_to(self.root.parent).as_posix()
            for meta in sorted(self.root.rglob("zarr.json"))
        ]


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
        if verify and await asyncio.to_thread(sha256_bytes, buf.to_bytes()) != expected:
            raise ShardError(
                f"{join(self._location, key)}: checksum mismatch (corrupt or edited shard file)"
            )
        return buf


class ZarrReader:
    """Reads one split's shards as contiguous snapshot blocks, verifying each chunk file it touches."""

    def __init__(self, location: str, split: str, manifest: Manifest):
        location = join(location, "zarr")
        checksums = {name: entry.sha256 for name, entry in manifest.files.items()}
        store = _VerifyingStore(zarr_store(location, read_only=True), location, checksums)
        try:
            group = zarr.open_group(store, mode="r")[split]
        except (FileNotFoundError, KeyError) as err:
            raise ShardError(f"{location}: no zarr group '{split}' ({err})") from None
        self._arrays = {name: group[name] for name in group.array_keys()}

    def read(self, shard: ShardEntry) -> ShardBlock:
        stop = shard.start + shard.count
        data = {name: np.asarray(arr[shard.start : stop]) for name, arr in self._arrays.items()}
        return ShardBlock(**data)
