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

from pipeline.records import ID_ARRAYS, ShardBlock

ARRAY_MEMBERS = ("fields", "importance", "queries", "pi_scale", "latent")


def sample_key(trajectory: int, time: int) -> str:
    return f"{trajectory:06d}_{time:06d}"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_tar(path: Path, block: ShardBlock) -> None:
    """Write one shard tar through webdataset's ShardWriter, to a temporary name renamed on close."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_pattern = str(path.with_name(f".{path.name}.tmp-{os.getpid()}-")).replace("%", "%%") + "%d"
    arrays = block.arrays()
    with wds.ShardWriter(
        tmp_pattern,
        maxcount=len(block) + 1,
        post=lambda name: os.replace(name, path),
        verbose=0,
        encoder=False,
        mtime=0.0,
        user="ups",
        group="ups",
    ) as sink:
        for i in range(len(block)):
            ids = {name: int(arrays[name][i]) for name in ID_ARRAYS}
            sample = {
                "__key__": sample_key(ids["trajectory"], ids["time"]),
                "meta.json": json.dumps(ids).encode(),
            }
            for name in ARRAY_MEMBERS:
                if name in arrays:
                    sample[f"{name}.npy"] = _npy(arrays[name][i])
            sink.write(sample)


# np.load parses each .npy header with ast.literal_eval, and CPython 3.11's parser is not safe
# to call from several threads at once ("AST constructor recursion depth mismatch"); the
# loader reads shards from a thread pool, so headers are parsed one at a time.
_NPY_LOAD = threading.Lock()


def _load_npy(data: bytes) -> np.ndarray:
    with _NPY_LOAD:
        return np.load(io.BytesIO(data), allow_pickle=False)


def read_tar(data: bytes, location: str) -> ShardBlock:
    """Parse a shard tar (already read and verified) with webdataset's tar reader."""
    files = ({**f, "__url__": location} for f in tar_file_iterator(io.BytesIO(data)))
    columns: dict[str, list] = {}
    for sample in group_by_keys(files):
        meta = json.loads(sample["meta.json"])
        for name in ID_ARRAYS:
            columns.setdefault(name, []).append(meta[name])
        for name in ARRAY_MEMBERS:
            if f"{name}.npy" in sample:
                columns.setdefault(name, []).append(_load_npy(sample[f"{name}.npy"]))
    return ShardBlock(**{name: np.stack(values) for name, values in columns.items()})
