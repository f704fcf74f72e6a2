"""The zarr (v3) shard format: one group per split, one array per record name.

Arrays are chunked along the snapshot axis in blocks of ``chunk`` snapshots -- one block per
output shard -- and zstd-compressed, so a reader request returns a contiguous block of
snapshots and every writer owns whole chunks (no two processes ever touch one chunk file).
The query sets are also chunked along their byte axis, every ``QUERY_CHUNK_BYTES``: an epoch's
sets (one slot of that axis, pipeline/query_codec.py) are then read from the one or two chunk
files holding its slot, not with the sets of every other epoch.

The store describes itself: every array carries zarr v3 ``dimension_names`` and a build gives the
root and split groups attributes (docs/shard-format.md, "Zarr store"), all written once at
creation and deterministic (no times, no paths), so a rebuild leaves every ``zarr.json`` as it was.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.codecs import ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import FsspecStore, WrapperStore

from pipeline.manifest import FileEntry, ShardEntry, check_listed
from pipeline.records import RecordSchema, ShardError, StoredRecords, _Record
from pipeline.storage import (
    MAX_RECORD_BYTES,
    RemoteConfig,
    disk_cache,
    join,
    read_capped,
    retrying_async,
    streams,
    zarr_store,
)

ZSTD_LEVEL = 3  # fast; the query sets' codes are near their entropy bound already
# bytes of a snapshot's query sets per chunk: NS 2D 128x128 holds 16-32 epochs' sets in one
QUERY_CHUNK_BYTES = 32768


def chunk_shape(name: str, chunk: int, tail: tuple[int, ...]) -> tuple[int, ...]:
    """The chunk shape of array ``name`` whose snapshots are ``tail``-shaped: ``chunk`` snapshots
    by every axis whole, but the query sets' bytes cut every ``QUERY_CHUNK_BYTES``."""
    if name == "queries" and tail[0] > QUERY_CHUNK_BYTES:
        return (chunk, QUERY_CHUNK_BYTES)
    return (chunk, *tail)


def chunk_paths(split: str, name: str, chunk_index: int, array: zarr.Array) -> list[str]:
    """Relative paths of the chunk files holding snapshot block ``chunk_index`` of
    ``split/name`` (v3 default keys): one per chunk of the axes after the snapshot axis."""
    counts = [
        -(-size // step) for size, step in zip(array.shape[1:], array.chunks[1:], strict=True)
    ]
    return [
        "/".join([split, name, "c", str(chunk_index), *map(str, rest)])
        for rest in itertools.product(*(range(count) for count in counts))
    ]


# names of the axes after the snapshot axis, by record name (zarr v3 ``dimension_names``)
DIMENSIONS = {
    "fields": ("channel",),  # then one per grid axis: x, y, z
    "importance": ("point",),
    "error": ("point",),
    "queries": ("byte",),
    "pi_scale": ("epoch", "scale"),
    "latent": ("token", "feature"),
}
GRID_AXES = ("x", "y", "z")


def dimension_names(name: str, ndim: int) -> tuple[str | None, ...]:
    """The ``dimension_names`` of array ``name`` with ``ndim`` axes: ``snapshot`` first, then the
    record's own axes (``fields``: channel and the grid's x, y, z; ids: none); an axis of a record
    this table does not know is unnamed (None)."""
    tail = DIMENSIONS.get(name, ())
    if name == "fields":
        tail = (*tail, *GRID_AXES[: ndim - 2])
    names = ("snapshot", *tail)[:ndim]
    return (*names, *[None] * (ndim - len(names)))


class ZarrWriter:
    """Writes the ``zarr/`` store of a set: arrays created once, then one chunk per array per shard."""

    def __init__(self, root: Path, schema: RecordSchema, chunk: int):
        self.root, self.schema, self.chunk = root / "zarr", schema, chunk

    def create(
        self,
        snapshots_per_split: dict[str, int],
        attributes: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Create (or overwrite the metadata of) every split's arrays; chunks are written later.

        ``attributes``: the groups' zarr attributes by group path (``""`` the root, a split's name
        its group), written now so that the ``zarr.json`` files are final when they are recorded;
        None leaves the groups' attributes alone. Every array gets its ``dimension_names``."""
        attributes = attributes or {}
        group = zarr.open_group(
            zarr_store(str(self.root), read_only=False), mode="a", zarr_format=3
        )
        if "" in attributes:
            group.attrs.put(attributes[""])
        for split, num in snapshots_per_split.items():
            split_group = group.require_group(split)
            if split in attributes:
                split_group.attrs.put(attributes[split])
            for name, (tail, dtype) in self.schema.items():
                split_group.create_array(
                    name,
                    shape=(num, *tail),
                    chunks=chunk_shape(name, self.chunk, tail),
                    dtype=dtype,
                    compressors=ZstdCodec(level=ZSTD_LEVEL),
                    fill_value=0,
                    dimension_names=dimension_names(name, 1 + len(tail)),
                    overwrite=True,
                )

    def write(self, split: str, index: int, name: str, block: _Record) -> list[str]:
        """Write one block into its own chunk of every array; returns the chunk files written."""
        store = zarr_store(str(self.root), read_only=False)
        start = index * self.chunk
        written = []
        for array_name, values in block.arrays().items():
            if values.size == 0:  # e.g. the query sets of a set whose every epoch is dense
                continue  # zarr keeps no chunk file for an empty chunk, and reads it as empty
            array = zarr.open_array(store, path=f"{split}/{array_name}", mode="r+", zarr_format=3)
            # write_empty_chunks: a block equal to the fill value (e.g. the ids of trajectory 0)
            # must still leave its chunk file, which the shard record and the manifest list.
            array = array.with_config({"write_empty_chunks": True})
            array[start : start + len(values)] = values
            # the chunks the store's own metadata says (a build resumed from an older layout
            # keeps writing that layout, which its readers follow)
            written += ["zarr/" + p for p in chunk_paths(split, array_name, index, array)]
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


# zarr's metadata documents: a read of one of these may find nothing. Opened with
# zarr_format=3 (as ZarrReader opens every array), zarr asks for ``zarr.json`` only, each one
# listed; the v2 names are answered "absent" without a refusal in case another opener probes them.
METADATA_NAMES = ("zarr.json", ".zgroup", ".zarray", ".zattrs", ".zmetadata")


def _byte_slice(data: bytes, byte_range: ByteRequest) -> bytes:
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    if isinstance(byte_range, SuffixByteRequest):
        return data[-byte_range.suffix :] if byte_range.suffix else b""
    raise ValueError(f"unexpected byte range {byte_range!r}")


class _VerifyingStore(WrapperStore):
    """Serves only files the manifest lists, each read whole (retried as ``remote`` says) and
    checked against its size and sha256 before zarr sees a byte of it; a byte-range request is
    answered from the verified whole file. A file the manifest does not list is refused,
    except a metadata document zarr merely probes for and does not find."""

    def __init__(
        self, store, location: str, files: dict[str, FileEntry], remote: RemoteConfig | None
    ):
        super().__init__(store)
        self._location, self._files = location, files
        self._remote = remote or RemoteConfig()

    def _with_store(self, store):
        return type(self)(store, self._location, self._files, self._remote)

    async def get(self, key, prototype, byte_range=None):
        url = join(self._location, key)
        entry = self._files.get(f"zarr/{key}")
        if entry is None and key.rsplit("/", 1)[-1] not in METADATA_NAMES:
            raise ShardError(f"{url}: not listed in the manifest")
        cache = disk_cache(url, self._remote) if entry is not None else None
        if cache is not None:
            data = await asyncio.to_thread(cache.get, entry.sha256, entry.bytes)
            if data is not None:
                return prototype.buffer.from_bytes(
                    data if byte_range is None else _byte_slice(data, byte_range)
                )
        limit = entry.bytes if entry is not None else MAX_RECORD_BYTES
        buf = await retrying_async(
            url, self._remote, lambda: self._fetch(key, url, prototype, limit)
        )
        if buf is None:
            if entry is not None:  # zarr would silently read the fill value
                raise ShardError(f"{url}: missing shard file (listed in the manifest)")
            return None
        if entry is None:
            raise ShardError(f"{url}: not listed in the manifest")
        # hash off zarr's event loop thread, so that reads of several shards verify in parallel
        data = await asyncio.to_thread(check_listed, url, buf.to_bytes(), entry)
        if cache is not None:
            await asyncio.to_thread(cache.put, entry.sha256, data)
        if byte_range is None:
            return buf
        return prototype.buffer.from_bytes(_byte_slice(data, byte_range))

    async def _fetch(self, key: str, url: str, prototype, limit: int):
        """One attempt at file ``key``, whole; over http(s) streamed and refused past ``limit``
        bytes (its manifest size), so a hostile server cannot fill memory. None: absent."""
        store = self._store
        if not (isinstance(store, FsspecStore) and streams(store.fs)):
            return await super().get(key, prototype)
        try:
            data = await read_capped(store.fs, join(store.path, key), url, self._remote, limit)
        except FileNotFoundError:
            return None
        return prototype.buffer.from_bytes(data)

    async def get_partial_values(self, prototype, key_ranges):
        return list(
            await asyncio.gather(*(self.get(key, prototype, rng) for key, rng in key_ranges))
        )

    async def _get_many(self, requests):
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def exists(self, key):
        return await self.get(key, default_buffer_prototype()) is not None


class ZarrReader:
    """Reads one split's shards as contiguous snapshot blocks, verifying each chunk file it touches.

    Arrays are opened by name from the manifest's record schema, never by listing the store
    (a web server need not list directories), and checked against that schema."""

    sets_apart = True  # an epoch's query sets are read from their own chunks (read_columns)

    def __init__(
        self,
        location: str,
        split: str,
        stored: StoredRecords,
        remote: RemoteConfig | None = None,
    ):
        location = join(location, "zarr")
        store = _VerifyingStore(
            zarr_store(location, read_only=True, remote=remote), location, stored.files, remote
        )
        num, self._record = stored.num_snapshots, stored.record
        self._arrays = {}
        for name, (tail, dtype) in stored.schema.items():
            where = join(location, split, name)
            try:
                array = zarr.open_array(store, path=f"{split}/{name}", mode="r", zarr_format=3)
            except FileNotFoundError as err:
                raise ShardError(
                    f"{where}: no zarr array '{name}' of split '{split}' ({err})"
                ) from None
            if array.shape != (num, *tail) or array.dtype != np.dtype(dtype):
                raise ShardError(
                    f"{where}: array {array.shape} {array.dtype}, the manifest implies "
                    f"{(num, *tail)} {np.dtype(dtype)}"
                )
            self._arrays[name] = array

    def read_columns(self, shard: ShardEntry, name: str, columns: slice) -> np.ndarray:
        """``columns`` of array ``name`` (the axis after the snapshot axis) of the shard's
        snapshots, from the chunk files holding them only."""
        return np.asarray(self._arrays[name][shard.start : shard.start + shard.count, columns])

    def read(self, shard: ShardEntry, record: type[_Record] | None = None) -> _Record:
        record = record or self._record
        wanted = record.names()  # the other arrays' chunks are not read
        stop = shard.start + shard.count
        data = {
            name: np.asarray(arr[shard.start : stop])
            for name, arr in self._arrays.items()
            if name in wanted
        }
        return record(**data)
