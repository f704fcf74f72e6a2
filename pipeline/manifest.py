"""``manifest.json``: what a shard set holds, how it was made, and the checksum of every file.

One typed schema (:class:`Manifest`) for the build that writes it, the reader that streams from
it and the tools that inspect it. Written last and atomically by the build's finalize step;
readers refuse a manifest of another schema version, and one whose keys or value types are not
this schema's. docs/shard-format.md describes every key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.records import RecordSchema, ShardError, record_schema
from pipeline.sources.pdebench import DataInfo
from pipeline.sources.splits import NormStats
from pipeline.storage import join, read_bytes, sha256_bytes, write_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
COORDINATES = "[0, 1] per axis, x first; flat indices in C order"


@dataclass(frozen=True)
class FileEntry:
    """One file of the set: what a reader checks before it uses the file's bytes."""

    bytes: int
    sha256: str
    count: int  # snapshots it holds (0 for metadata files)


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a split: whole trajectories, a contiguous block of the split's snapshots."""

    index: int
    start: int  # first snapshot, counted within the split
    count: int
    trajectories: list[int]
    tar: str  # its webdataset tar, relative to the set's root


@dataclass(frozen=True)
class SplitEntry:
    trajectories: list[int]  # indices into the source file
    num_snapshots: int
    snapshots_per_trajectory: int
    shards: list[ShardEntry]


@dataclass(frozen=True)
class EncoderEntry:
    path: str
    sha256: str


@dataclass(frozen=True)
class LatentEntry:
    tokens: int
    dim: int
    dtype: str


@dataclass(frozen=True)
class DataEntry:
    path: str
    sha256: str
    channels: list[str]
    grid: list[int]  # x first
    coordinates: str
    periodic: list[bool]
    dt: float
    params: dict[str, float]  # PDE parameters of the source file
    norm: NormStats  # train split only


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    tool: str
    created: str
    config: dict[str, Any]  # the build's resolved config (rank and run-time switches removed)
    config_hash: str
    sample_set_id: str  # hash of everything that decides the query sets
    build_id: str  # sample_set_id + what decides the files' layout
    encoder: EncoderEntry | None  # None: field-only shards
    latent: LatentEntry | None
    data: DataEntry
    formats: list[str]
    epochs: int
    k_per_epoch: list[int]
    query_bytes: dict[str, float]  # bytes per snapshot-epoch of stored query sets, and the bound
    splits: dict[str, SplitEntry]
    files: dict[str, FileEntry]

    @property
    def sampler_beta(self) -> float:
        """The weight exponent the query sets were drawn for (docs/design.md, section 5)."""
        return float(self.config["sampler"]["beta"])

    @property
    def num_points(self) -> int:
        return math.prod(self.data.grid)

    def record_schema(self) -> RecordSchema:
        """What each snapshot's record holds in this set."""
        latent = self.latent
        return record_schema(
            len(self.data.channels),
            tuple(self.data.grid),
            self.epochs,
            None if latent is None else (latent.tokens, latent.dim, latent.dtype),
        )

    def data_info(self, split: str) -> DataInfo:
        """The data description a model is built from, for one split of this set."""
        entry = self.splits[split]
        return DataInfo(
            channels=tuple(self.data.channels),
            grid=tuple(self.data.grid),
            dt=self.data.dt,
            num_steps=entry.snapshots_per_trajectory,
            num_trajectories=len(entry.trajectories),
            periodic=tuple(self.data.periodic),
            params=dict(self.data.params),
        )

    def to_json(self) -> bytes:
        return (json.dumps(to_dict(self), indent=1, sort_keys=True) + "\n").encode()


def write_manifest(root: Path, manifest: Manifest) -> None:
    write_atomic(root / MANIFEST, manifest.to_json())


def read_manifest(location: str) -> tuple[Manifest, str]:
    """The manifest of a shard set and the sha256 of its bytes (the set's identity for checkpoints)."""
    path = join(location, MANIFEST)
    try:
        data = read_bytes(path)
    except (FileNotFoundError, OSError) as err:
        raise ShardError(f"{path}: no manifest; is this a finished shard set? ({err})") from None
    try:
        raw = json.loads(data)
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema_version {version!r}, this reader understands version {SCHEMA_VERSION}; "
            "rebuild the shards with this version of build_shards"
        )
    try:
        manifest = from_dict(Manifest, raw)
    except ConfigError as err:
        message = str(err).replace("option '", "key '").replace("unknown config key", "unknown key")
        raise ShardError(f"{path}: {message}") from None
    return manifest, sha256_bytes(data)


def read_listed(manifest: Manifest, location: str, name: str) -> bytes:
    """The bytes of file ``name`` of the set at ``location``, checked against its manifest entry
    (size, then sha256); a file the manifest does not list is refused."""
    path = join(location, name)
    entry = manifest.files.get(name)
    if entry is None:
        raise ShardError(f"{path}: not listed in the manifest")
    try:
        data = read_bytes(path)
    except (FileNotFoundError, OSError) as err:
        raise ShardError(f"{path}: missing shard file ({err})") from None
    if len(data) != entry.bytes:
        raise ShardError(
            f"{path}: {len(data)} bytes, the manifest says {entry.bytes} (truncated shard file)"
        )
    if sha256_bytes(data) != entry.sha256:
        raise ShardError(f"{path}: checksum mismatch (corrupt or edited shard file)")
    return data
