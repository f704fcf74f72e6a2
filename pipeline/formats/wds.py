"""The webdataset shard format: plain tars of ``.npy`` and ``.json`` members, no pickles.

One sample per snapshot, keyed ``{trajectory:06d}_{time:06d}`` so keys sort with a trajectory's
snapshots contiguous. Members: ``fields.npy`` (C, *grid) float32, ``importance.npy`` (N,)
float32, ``queries.npy`` (E, ceil(N/8)) uint8, ``pi_scale.npy`` (E, 2) int64, ``latent.npy``
(T, D) when present, and
``meta.json`` ({"snapshot_id", "trajectory", "time"}). Tars are reproducible: fixed mtime, owner
and mode, members in sorted order.
"""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipeline.manifest import Manifest, ShardEntry, read_listed
from pipeline.records import ID_ARRAYS, RecordSchema, ShardBlock
from pipeline.storage import join

ARRAY_MEMBERS = ("fields", "importance", "queries", "pi_scale", "latent")


def sample_key(trajectory: int, time: int) -> str:
    return f"{trajectory:06d}_{time:06d}"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def tar_path(name: str) -> str:
    """Where shard ``name``'s tar lies, relative to the set's root."""
    return f"wds/{name}.tar"


class WdsWriter:
    """Writes one tar per shard under ``wds/``, through webdataset's ShardWriter."""

    def __init__(self, root: Path, schema: RecordSchema, chunk: int):
        self.root = root

    def create(self, snapshots_per_split: dict[str, int]) -> None:
        """Nothing to create before the shards: each tar stands alone."""

    def write(self, split: str, index: int, name: str, block: ShardBlock) -> list[str]:
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
            mtime=0.0,
            user="ups",
            group="ups",
        ) as sink:
            for i in range(len(block)):
                ids = {id_name: int(arrays[id_name][i]) for id_name in ID_ARRAYS}
                sample = {
                    "__key__": sample_key(ids["trajectory"], ids["time"]),
                    "meta.json": json.dumps(ids).encode(),
                }
                for member in ARRAY_MEMBERS:
                    if member in arrays:
                        sample[f"{member}.npy"] = _npy(arrays[member][i])
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


def _load_npy(data: bytes) -> np.ndarray:
    with _NPY_LOAD:
        return np.load(io.BytesIO(data), allow_pickle=False)


class WdsReader:
    """Reads one split's shards from their tars, each read whole and verified, then parsed with
    webdataset's tar reader."""

    def __init__(self, location: str, split: str, manifest: Manifest):
        self.location, self.manifest = location, manifest

    def read(self, shard: ShardEntry) -> ShardBlock:
        data = read_listed(self.manifest, self.location, shard.tar)
        files = tar_file_iterator(io.BytesIO(data))
        located = ({**f, "__url__": join(self.location, shard.tar)} for f in files)
        columns: dict[str, list] = {}
        for sample in group_by_keys(located):
            meta = json.loads(sample["meta.json"])
            for name in ID_ARRAYS:
                columns.setdefault(name, []).append(meta[name])
            for name in ARRAY_MEMBERS:
                if f"{name}.npy" in sample:
                    columns.setdefault(name, []).append(_load_npy(sample[f"{name}.npy"]))
        return ShardBlock(**{name: np.stack(values) for name, values in columns.items()})
