"""The logical record of a shard set (docs/design.md, section 6), shared by both formats.

Per snapshot: ids (snapshot_id, trajectory, time), the cached latent (absent in field-only
shards), the full target fields in physical units, the sampling distribution q over grid points
(``importance``; inclusion probabilities for an epoch follow from q and k_e) and the E query
sets, each in its own slot of a byte row (pipeline/query_codec.py: Elias-Fano or a bitmask,
whichever is smaller for the epoch's k), with two
integers per epoch (``pi_scale``) that turn q at the queried points into their inclusion
probabilities -- a cache of what follows from q and k_e, so that weights cost O(k), not O(N).
"""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, fields
from typing import Any, ClassVar, Self

import numpy as np

from pipeline.query_codec import row_bytes

ID_ARRAYS = ("snapshot_id", "trajectory", "time")


class ShardError(ValueError):
    """A shard set or shard file that is missing, corrupt or incompatible."""


class _Record:
    """Arrays of a contiguous block of snapshots, one per record name (a dataclass's fields)."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]  # every record is a dataclass
    snapshot_id: np.ndarray

    def __len__(self) -> int:
        return len(self.snapshot_id)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every record name this type holds (an optional one may be None in a block)."""
        return tuple(f.name for f in fields(cls))

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays present in this block, by record name."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def select(self, rows: slice | np.ndarray) -> Self:
        return type(self)(**{name: value[rows] for name, value in self.arrays().items()})


@dataclass
class ShardBlock(_Record):
    """A contiguous block of snapshots, as written to and read from one shard."""

    snapshot_id: np.ndarray  # (S,) int64, trajectory * steps + time
    trajectory: np.ndarray  # (S,) int64, index into the source file
    time: np.ndarray  # (S,) int64
    fields: np.ndarray  # (S, C, *grid) float32, physical units
    importance: np.ndarray  # (S, N) float32, q: sums to 1 per snapshot
    queries: np.ndarray  # (S, Q) uint8: the E query sets, one slot each (query_codec.query_slots)
    # (S, E, 2) int64 [remaining, total]: pi = remaining * fixed(q) / total, and 1 for the
    # k - remaining largest q of a drawn set (the capped points)
    pi_scale: np.ndarray
    latent: np.ndarray | None = None  # (S, T, D) float16/float32


@dataclass
class SnapshotBlock(_Record):
    """A shard's snapshots without their query sets: what the training stream reads once and
    keeps, reading each epoch's coded sets apart (ShardSet.read_codes) where the format stores
    them in chunks of their own (zarr); the sets of all epochs are most of a shard's bytes."""

    snapshot_id: np.ndarray  # (S,) int64
    trajectory: np.ndarray  # (S,) int64
    time: np.ndarray  # (S,) int64
    fields: np.ndarray  # (S, C, *grid) float32, physical units
    importance: np.ndarray  # (S, N) float32, q
    pi_scale: np.ndarray  # (S, E, 2) int64, as ShardBlock's
    latent: np.ndarray | None = None  # (S, T, D), absent in field-only shards


@dataclass
class SnapshotFields(_Record):
    """What a refresh needs of a shard's snapshots: ids, target fields and latent. Read alone
    (ShardSet.read_fields), it leaves the query sets of every epoch unread, most of a shard's
    bytes once there are many epochs (NS 2D 128x128, k/N 0.3, 199 epochs: 408 KB of 607)."""

    snapshot_id: np.ndarray  # (S,) int64
    trajectory: np.ndarray  # (S,) int64
    time: np.ndarray  # (S,) int64
    fields: np.ndarray  # (S, C, *grid) float32, physical units
    latent: np.ndarray | None = None  # (S, T, D), absent in field-only shards


@dataclass
class LayerBlock(_Record):
    """One shard's snapshots in a layer of adaptive query sets (pipeline/layers.py): the model's
    per-point error, the q drawn from, and the query sets of the layer's epochs only."""

    snapshot_id: np.ndarray  # (S,) int64
    trajectory: np.ndarray  # (S,) int64
    time: np.ndarray  # (S,) int64
    error: np.ndarray  # (S, N) float16, the per-point loss q was computed from
    importance: np.ndarray  # (S, N) float32, q
    queries: np.ndarray  # (S, Q) uint8, one slot per epoch of the layer
    pi_scale: np.ndarray  # (S, E_layer, 2) int64, as ShardBlock's


def trajectory_ids(trajectories: list[int] | tuple[int, ...], steps: int) -> dict[str, np.ndarray]:
    """The id arrays of whole trajectories' snapshots, in stored order: (S,) int64 each, with
    S = len(trajectories) * steps and snapshot_id = trajectory * steps + time."""
    trajectory = np.repeat(np.asarray(trajectories, dtype=np.int64), steps)
    time = np.tile(np.arange(steps, dtype=np.int64), len(trajectories))
    return {"snapshot_id": trajectory * steps + time, "trajectory": trajectory, "time": time}


# record name -> (shape of one snapshot's entry, dtype)
RecordSchema = dict[str, tuple[tuple[int, ...], str]]


def record_schema(
    channels: int,
    grid: tuple[int, ...],
    k_per_epoch: list[int],
    latent: tuple[int, int, str] | None,
) -> RecordSchema:
    """What one snapshot holds, per record name, for query sets of ``k_per_epoch``; ``latent``
    is (tokens, width, dtype), or None for field-only shards. The writers create their arrays from
    it and readers check what they read against it."""
    n = math.prod(grid)
    schema: RecordSchema = {
        "snapshot_id": ((), "int64"),
        "trajectory": ((), "int64"),
        "time": ((), "int64"),
        "fields": ((channels, *grid), "float32"),
        "importance": ((n,), "float32"),
        "queries": ((row_bytes(n, k_per_epoch),), "uint8"),
        "pi_scale": ((len(k_per_epoch), 2), "int64"),
    }
    if latent is not None:
        tokens, width, dtype = latent
        schema["latent"] = ((tokens, width), dtype)
    return schema


def layer_schema(grid: tuple[int, ...], k_per_epoch: list[int]) -> RecordSchema:
    """What one snapshot holds in a layer whose epochs have ``k_per_epoch`` points."""
    n = math.prod(grid)
    return {
        "snapshot_id": ((), "int64"),
        "trajectory": ((), "int64"),
        "time": ((), "int64"),
        "error": ((n,), "float16"),
        "importance": ((n,), "float32"),
        "queries": ((row_bytes(n, k_per_epoch),), "uint8"),
        "pi_scale": ((len(k_per_epoch), 2), "int64"),
    }


@dataclass(frozen=True)
class StoredRecords:
    """What a format's reader needs to read one split of records: their schema and type, the
    files it may read (each checked against its entry), and the split's snapshot count."""

    record: type[_Record]
    schema: RecordSchema
    files: dict[str, Any]  # name -> manifest.FileEntry
    num_snapshots: int
