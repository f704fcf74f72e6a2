"""The webdataset shard format: plain tars of ``.npy`` and ``.json`` members, no pickles.

One sample per snapshot, keyed ``{trajectory:06d}_{time:06d}`` so keys sort with a trajectory's
snapshots contiguous. Members: one ``{name}.npy`` per array of the record besides the ids -- for
a shard set ``fields.npy`` (C, *grid) float32, ``importance.npy`` (N,) float32, ``queries.npy``
(Q,) uint8 (the E coded query sets, pipeline/query_codec.py), ``pi_scale.npy`` (E, 2) int64,
``latent.npy`` (T, D) when present; for a layer of adaptive sets ``error.npy`` as well -- and
``meta.json`` ({"snapshot_id", "trajectory", "time"}). Tars are reproducible: fixed mtime, owner
and mode, members in sorted order.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import threading
from pathlib import Path

import numpy as np
import webdataset as wds

from pipeline.manifest import ShardEntry, read_listed, tar_path
from pipeline.records import ID_ARRAYS, RecordSchema, ShardError, StoredRecords, _Record
from pipeline.storage import RemoteConfig, join


def sample_key(trajectory: int, time: int) -> str:
    return f"{trajectory:06d}_{time:06d}"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class WdsWriter:
    """Writes one tar per shard under ``wds/``, through webdataset's ShardWriter."""

    def __init__(self, root: Path, schema: RecordSchema, chunk: int):
        self.root = root

    def create(self, snapshots_per_split: dict[str, int], attributes: dict | None = None) -> None:
        """Nothing to create before the shards: each tar stands alone (and tars have no group
        attributes; the manifest describes them)."""

    def write(self, split: str, index: int, name: str, block: _Record) -> list[str]:
        """Write shard ``name``'s tar to a temporary name, renamed into place when it is whole."""
        relative = tar_path(name)
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_pattern = str(path.with_name(f".{path.name}.tmp-{os.getpid()}-")).replace("%", "%%")
        arrays = block.arrays()
        with wds.ShardWriter(
            tmp_pattern + "%d",
            maxcount=len(block) + 1,
            post=lambda written: os.replace(written, path),
            verbose=0,
            encoder=False,
            mtime=0,  # an int: a float mtime makes tarfile add a PAX header (1 KiB) to every member
            user="ups",
            group="ups",
        ) as sink:
            for i in range(len(block)):
                ids = {id_name: int(arrays[id_name][i]) for id_name in ID_ARRAYS}
                sample = {
                    "__key__": sample_key(ids["trajectory"], ids["time"]),
                    "meta.json": json.dumps(ids).encode(),
                }
                for member, values in arrays.items():
                    if member not in ID_ARRAYS:
                        sample[f"{member}.npy"] = _npy(values[i])
                sink.write(sample)
        return [relative]

    def leftovers(self, split: str, index: int, name: str) -> list[str]:
        return [f"wds/.{name}.tar.tmp-*"]

    def metadata(self) -> list[str]:
        return []


# np.load parses each .npy header with ast.literal_eval, and CPython 3.11's parser is not safe
# to call from several threads at once ("AST constructor recursion depth mismatch"); the
# loader reads shards from a thread pool, so headers are parsed one at a time.
_NPY_LOAD = threading.Lock()


def _load_npy(data: bytes, where: str = "npy member") -> np.ndarray:
    """A plain ``.npy`` array (no pickles, no npz); anything else is a ShardError naming ``where``."""
    try:
        with _NPY_LOAD:
            array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ShardError(f"{where}: not a plain .npy array ({err})") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise ShardError(f"{where}: not a plain .npy array (an npz archive)")
    return array


_SAMPLE_KEY = re.compile(r"\d+_\d+")


def _samples(url: str, data: bytes, members: set[str]) -> list[tuple[str, dict[str, bytes]]]:
    """The tar's samples in order, as (key, {member suffix: bytes}): regular files only, each
    named ``{key}.{member}`` with a member of ``members``, once per sample, samples contiguous."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                key, _, suffix = info.name.partition(".")
                where = f"{url}: member '{info.name}'"
                if not info.isfile():
                    raise ShardError(f"{where} is not a regular file")
                if not _SAMPLE_KEY.fullmatch(key) or suffix not in members:
                    raise ShardError(
                        f"{where}: unexpected member; a sample holds {sorted(members)}"
                    )
                if not samples or samples[-1][0] != key:
                    if any(k == key for k, _ in samples):
                        raise ShardError(f"{where}: out of place (sample '{key}' came before)")
                    samples.append((key, {}))
                sample = samples[-1][1]
                if suffix in sample:
                    raise ShardError(f"{where}: appears twice")
                handle = tar.extractfile(info)
                sample[suffix] = b"" if handle is None else handle.read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(f"{url}: not a readable tar ({err})") from None
    return samples


def _meta(where: str, key: str, raw: bytes) -> dict[str, int]:
    """A sample's ids from its ``meta.json``: exactly the three integer ids, matching its key."""
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise ShardError(f"{where}: not valid JSON ({err})") from None
    if (
        not isinstance(meta, dict)
        or set(meta) != set(ID_ARRAYS)
        or not all(type(meta[name]) is int for name in ID_ARRAYS)
    ):
        raise ShardError(
            f"{where}: expected the integers {list(ID_ARRAYS)}, got {raw[:120].decode(errors='replace')!r}"
        )
    if sample_key(meta["trajectory"], meta["time"]) != key:
        raise ShardError(
            f"{where}: trajectory {meta['trajectory']}, time {meta['time']} do not match the key '{key}'"
        )
    return meta


class WdsReader:
    """Reads one split's shards from their tars, each read whole and verified against the
    manifest, then parsed with Python's tarfile and checked member by member against the record
    schema: a crafted tar (members missing, extra or of another dtype or shape, a pickle, a bad
    ``meta.json``) is refused with a ShardError naming the tar and the member."""

    sets_apart = False  # a tar is read whole: its samples carry every epoch's query sets

    def __init__(
        self,
        location: str,
        split: str,
        stored: StoredRecords,
        remote: RemoteConfig | None = None,
    ):
        self.location, self.stored, self.remote = location, stored, remote
        self.schema = stored.schema
        arrays = [name for name in self.schema if name not in ID_ARRAYS]
        self.arrays, self.members = arrays, {"meta.json", *(f"{n}.npy" for n in arrays)}

    def read(self, shard: ShardEntry, record: type[_Record] | None = None) -> _Record:
        """The tar is read and checked whole; only ``record``'s members are decoded."""
        record = record or self.stored.record
        columns = self._decode(shard, [name for name in self.arrays if name in record.names()])
        return record(**columns)

    def read_columns(self, shard: ShardEntry, name: str, columns: slice) -> np.ndarray:
        """``columns`` of array ``name`` of the shard's snapshots: a tar is read and checked
        whole all the same, so this saves only the other members' decoding."""
        return self._decode(shard, [name])[name][:, columns]

    def _decode(self, shard: ShardEntry, arrays: list[str]) -> dict[str, np.ndarray]:
        """The ids and ``arrays`` of the shard's samples, each checked against the schema."""
        url = join(self.location, shard.tar)
        data = read_listed(self.stored.files, self.location, shard.tar, self.remote)
        samples = _samples(url, data, self.members)
        if not samples:
            raise ShardError(f"{url}: holds no samples")
        columns: dict[str, list] = {name: [] for name in (*ID_ARRAYS, *arrays)}
        for key, sample in samples:
            missing = sorted(self.members - set(sample))
            if missing:
                raise ShardError(f"{url}: sample '{key}' lacks member '{key}.{missing[0]}'")
            meta = _meta(f"{url}: member '{key}.meta.json'", key, sample["meta.json"])
            for name in ID_ARRAYS:
                columns[name].append(meta[name])
            for name in arrays:
                where = f"{url}: member '{key}.{name}.npy'"
                array = _load_npy(sample[f"{name}.npy"], where)
                shape, dtype = self.schema[name]
                if array.shape != shape or array.dtype != np.dtype(dtype):
                    raise ShardError(
                        f"{where}: {array.shape} {array.dtype}, the record schema says "
                        f"{shape} {np.dtype(dtype)}"
                    )
                columns[name].append(array)
        return {
            **{name: np.asarray(columns.pop(name), dtype=np.int64) for name in ID_ARRAYS},
            **{name: np.stack(values) for name, values in columns.items()},
        }
