"""``manifest.json``: what a shard set holds, how it was made, and the checksum of every file.

One typed schema (:class:`Manifest`) for the build that writes it, the reader that streams from
it and the tools that inspect it. Written last and atomically by the build's finalize step;
readers refuse a manifest of another schema version, and one whose keys or value types are not
this schema's. docs/shard-format.md describes every key.

Identity is content (docs/design.md, section 6): ``sample_set_id`` and ``build_id`` are hashes of
what the config means, computed here for the build and recomputed here by every reader, and
:attr:`Manifest.identity` hashes the whole manifest except its provenance (creation time, tool,
paths). A reader also checks that the manifest's numbers agree with each other, so an edit that
changes what the set means is refused on open instead of training on it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, config_hash, from_dict, to_dict, without_keys
from pipeline.query_codec import Slot, query_slots
from pipeline.records import (
    RecordSchema,
    ShardBlock,
    ShardError,
    StoredRecords,
    record_schema,
)
from pipeline.samplers import SamplerConfig
from pipeline.schedules import ScheduleConfig, k_per_epoch
from pipeline.sources.pdebench import DataInfo
from pipeline.sources.splits import NormStats
from pipeline.storage import (
    RemoteConfig,
    disk_cache,
    join,
    read_bytes,
    sha256_bytes,
    write_atomic,
)

# 2: content identity (ids recomputed on open, provenance outside the identity)
# 3: query sets coded per epoch (Elias-Fano or bitmask, the complement above k = N/2), query_slots
SCHEMA_VERSION = 3
TOOL_VERSION = "ups-shards 0.1.0"  # recorded as the writer of manifests and layers
MANIFEST = "manifest.json"
BUILD_STATE = "build.json"  # written first by a build; without a manifest: an unfinished build
COORDINATES = "[0, 1] per axis, x first; flat indices in C order"
# where things come from, not what they are: left out of Manifest.identity
PROVENANCE = (
    "created",
    "tool",
    "data.path",
    "encoder.path",
    "config.out",
    "config.data.path",
    "config.encoder",
)


def build_config_hash(config: dict[str, Any]) -> str:
    """sha256 of a build's resolved config without its paths (the manifest's ``config_hash``)."""
    return config_hash(without_keys({"config": config}, PROVENANCE)["config"])


def shard_name(split: str, index: int) -> str:
    """The name of shard ``index`` of ``split`` (its tar and its build record are named after it)."""
    return f"{split}-{index:06d}"


def tar_path(name: str) -> str:
    """Where shard ``name``'s tar lies, relative to the set's root."""
    return f"wds/{name}.tar"


def sample_set_id(
    *,
    data_sha256: str,
    splits: dict[str, list[int]],
    grid: list[int],
    sampler: dict[str, Any],
    schedule: dict[str, Any],
    k_per_epoch: list[int],
    seed: int,
    epochs: int,
    norm: NormStats,
) -> str:
    """The identity of the query sets: everything that decides which points each snapshot's
    epoch queries and with which weights (the data's bytes, the built splits, the sampler, the
    schedule, the seed, and the normalisation the importance is computed on)."""
    return config_hash(
        {
            "data_sha256": data_sha256,
            "splits": splits,
            "grid": list(grid),
            "sampler": sampler,
            "schedule": schedule,
            "k_per_epoch": list(k_per_epoch),
            "seed": seed,
            "epochs": epochs,
            "norm": to_dict(norm),
        }
    )


def build_id(
    *,
    sample_set_id: str,
    encoder_sha256: str | None,
    format: str,
    latent_dtype: str,
    trajectories_per_shard: int,
) -> str:
    """The identity of the files: the query sets plus what decides the files' layout and latents
    (the encoder by its bytes, never its path)."""
    return config_hash(
        {
            "sample_set_id": sample_set_id,
            "encoder_sha256": encoder_sha256,
            "format": format,
            "latent_dtype": latent_dtype,
            "trajectories_per_shard": trajectories_per_shard,
        }
    )


FormatName = Literal["zarr", "wds"]  # the shard formats (pipeline/formats/)


def formats_of(format: FormatName | Literal["both"]) -> list[FormatName]:
    """The formats a build's ``format`` option writes."""
    return ["zarr", "wds"] if format == "both" else [format]


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
    formats: list[FormatName]
    epochs: int
    k_per_epoch: list[int]
    query_slots: list[Slot]  # where and how each epoch's set lies in a snapshot's queries row
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
            self.k_per_epoch,
            None if latent is None else (latent.tokens, latent.dim, latent.dtype),
        )

    def stored(self, split: str) -> StoredRecords:
        """What a format's reader reads of ``split``: this set's records and files."""
        return StoredRecords(
            ShardBlock, self.record_schema(), self.files, self.splits[split].num_snapshots
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

    def identity_view(self) -> dict[str, Any]:
        """The manifest as a dict without its provenance (:data:`PROVENANCE`): what the set is.
        Values take the types a reader parses them to (8 and 8.0 hash alike)."""
        return without_keys(to_dict(from_dict(Manifest, to_dict(self))), PROVENANCE)

    @property
    def identity(self) -> str:
        """sha256 of :meth:`identity_view`. The same set built at another time, by another tool
        version, from a copy of the data at another path or into another directory has the same
        identity; runs record it and resume only on a set with the same identity."""
        return config_hash(self.identity_view())

    def problems(self) -> list[str]:
        """What in this manifest disagrees with itself: ids that do not match the content they
        name, config and top-level values that differ, shard tables that do not add up."""
        out: list[str] = []
        cfg = self.config

        def expect(ok: bool, message: str) -> None:
            if not ok:
                out.append(message)

        try:
            sampler = from_dict(SamplerConfig, cfg.get("sampler"), "config.sampler")
            schedule = from_dict(ScheduleConfig, cfg.get("schedule"), "config.schedule")
        except ConfigError as err:
            return [str(err).replace("option '", "key '")]
        missing = [
            key
            for key in ("seed", "format", "latent_dtype", "trajectories_per_shard")
            if key not in cfg
        ]
        if missing:  # the ids below are computed from them
            return [f"key 'config.{missing[0]}': missing, the set's ids are computed from it"]
        expect(
            build_config_hash(cfg) == self.config_hash,
            f"key 'config_hash': {self.config_hash[:12]}..., its config gives "
            f"{build_config_hash(cfg)[:12]}...",
        )
        expect(
            cfg.get("epochs") == self.epochs,
            f"key 'epochs': {self.epochs}, the config says {cfg.get('epochs')!r}",
        )
        ks: list[int] | str  # the schedule's k per epoch, or why it has none
        try:
            ks = k_per_epoch(schedule, self.epochs, self.num_points)
        except ConfigError as err:
            ks = str(err)
        expect(
            isinstance(ks, list) and self.query_slots == query_slots(self.num_points, ks),
            "key 'query_slots': not the slots of this N and k_per_epoch (pipeline/query_codec.py)",
        )
        expect(
            ks == self.k_per_epoch,
            f"key 'k_per_epoch': {self.k_per_epoch}, its schedule gives {ks}",
        )
        expect(
            self.formats == formats_of(cfg.get("format", "")),
            f"key 'formats': {self.formats}, the config says format={cfg.get('format')!r}",
        )
        expect(
            sorted(self.splits) == sorted(cfg.get("splits") or []),
            f"key 'splits': {list(self.splits)}, the config says {cfg.get('splits')!r}",
        )
        expect(
            (self.encoder is None) == (self.latent is None),
            "keys 'encoder' and 'latent': one is null, the other not",
        )
        if self.latent is not None:
            expect(
                self.latent.dtype == cfg.get("latent_dtype"),
                f"key 'latent.dtype': {self.latent.dtype!r}, the config says {cfg.get('latent_dtype')!r}",
            )
        norm = self.data.norm
        channels = len(self.data.channels)
        expect(
            len(norm.mean) == len(norm.std) == channels
            and all(math.isfinite(v) for v in (*norm.mean, *norm.std))
            and all(v > 0 for v in norm.std),
            f"key 'data.norm': expected {channels} finite means and positive stds, got {to_dict(norm)}",
        )
        expect(
            len(self.data.periodic) == len(self.data.grid),
            "key 'data.periodic': one flag per grid axis",
        )
        for split, entry in self.splits.items():
            out += _split_problems(split, entry)
        expected_set = sample_set_id(
            data_sha256=self.data.sha256,
            splits={split: entry.trajectories for split, entry in self.splits.items()},
            grid=self.data.grid,
            sampler=to_dict(sampler),
            schedule=to_dict(schedule),
            k_per_epoch=self.k_per_epoch,
            seed=cfg["seed"],
            epochs=self.epochs,
            norm=norm,
        )
        expect(
            expected_set == self.sample_set_id,
            f"key 'sample_set_id': {self.sample_set_id[:12]}..., its content gives {expected_set[:12]}...",
        )
        expected_build = build_id(
            sample_set_id=expected_set,
            encoder_sha256=None if self.encoder is None else self.encoder.sha256,
            format=cfg["format"],
            latent_dtype=cfg["latent_dtype"],
            trajectories_per_shard=cfg["trajectories_per_shard"],
        )
        expect(
            expected_build == self.build_id,
            f"key 'build_id': {self.build_id[:12]}..., its content gives {expected_build[:12]}...",
        )
        return out


def _split_problems(split: str, entry: SplitEntry) -> list[str]:
    """A split's shard table must tile its snapshots: shard i starts where shard i-1 ended, holds
    whole trajectories, and together they hold the split's trajectories in order."""
    out, start, trajectories = [], 0, []
    steps = entry.snapshots_per_trajectory
    for position, shard in enumerate(entry.shards):
        where = f"key 'splits.{split}.shards[{position}]"
        if shard.index != position:
            out.append(f"{where}.index': {shard.index}, expected {position}")
        if shard.start != start:
            out.append(f"{where}.start': {shard.start}, the shards before it hold {start}")
        held = len(shard.trajectories) * steps
        if shard.count != held:
            out.append(
                f"{where}.count': {shard.count}, its {len(shard.trajectories)} trajectories of "
                f"{steps} snapshots hold {held}"
            )
        tar = tar_path(shard_name(split, position))
        if shard.tar != tar:
            out.append(f"{where}.tar': {shard.tar!r}, expected {tar!r}")
        start += shard.count
        trajectories += shard.trajectories
    if trajectories != entry.trajectories:
        out.append(
            f"key 'splits.{split}': its shards hold trajectories {trajectories[:8]}..., the split lists {entry.trajectories[:8]}..."
        )
    if start != entry.num_snapshots:
        out.append(
            f"key 'splits.{split}.num_snapshots': {entry.num_snapshots}, its shards hold {start}"
        )
    return out


def write_manifest(root: Path, manifest: Manifest) -> None:
    write_atomic(root / MANIFEST, manifest.to_json())


def read_manifest(location: str, remote: RemoteConfig | None = None) -> Manifest:
    """The manifest of a shard set, refused unless it parses as this schema and agrees with
    itself (:meth:`Manifest.problems`)."""
    path = join(location, MANIFEST)
    try:
        data = read_bytes(path, remote)
    except (FileNotFoundError, OSError) as err:
        if Path(location, BUILD_STATE).is_file():
            raise ShardError(
                f"{location}: an unfinished build (no {MANIFEST} yet); rerun the same build_shards "
                "command to finish it"
            ) from None
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
    problems = manifest.problems()
    if problems:
        raise ShardError(f"{path}: {'; '.join(problems)}; the manifest was edited or is corrupt")
    return manifest


def read_listed(
    files: dict[str, FileEntry], location: str, name: str, remote: RemoteConfig | None = None
) -> bytes:
    """The bytes of file ``name`` of the set at ``location``, checked against its entry in
    ``files`` (a manifest's: size, then sha256); a file not listed there is refused. Remote
    files come from the disk cache where ``remote`` has one (``cache_dir``)."""
    path = join(location, name)
    entry = files.get(name)
    if entry is None:
        raise ShardError(f"{path}: not listed in the manifest")
    cache = disk_cache(path, remote)
    if cache is not None:
        data = cache.get(entry.sha256, entry.bytes)
        if data is not None:
            return data
    try:
        data = read_bytes(path, remote, limit=entry.bytes)
    except (FileNotFoundError, OSError) as err:
        raise ShardError(f"{path}: missing shard file ({err})") from None
    data = check_listed(path, data, entry)
    if cache is not None:
        cache.put(entry.sha256, data)
    return data


def check_listed(path: str, data: bytes, entry: FileEntry) -> bytes:
    """``data``, read from ``path``, if it has its manifest entry's size and sha256; else one
    ShardError naming the file (every reader of every format checks files here)."""
    if len(data) != entry.bytes:
        raise ShardError(
            f"{path}: {len(data)} bytes, the manifest says {entry.bytes} (truncated shard file)"
        )
    if sha256_bytes(data) != entry.sha256:
        raise ShardError(f"{path}: checksum mismatch (corrupt or edited shard file)")
    return data


def file_entry(root: Path, name: str, count: int) -> FileEntry:
    """The entry of file ``name`` under ``root``, as a writer records it."""
    data = (root / name).read_bytes()
    return FileEntry(bytes=len(data), sha256=sha256_bytes(data), count=count)


def part_is_done(root: Path, record: Path, owner: str) -> bool:
    """True when a writer's per-shard record (a JSON of ``{"owner": ..., "files": {name: entry}}``
    under ``root``) is ``owner``'s (a build id, a layer request) and every file it lists verifies:
    what a rerun of an interrupted build or refresh keeps instead of writing again."""
    if not record.exists():
        return False
    entry = json.loads(record.read_text())
    if entry.get("owner") != owner:
        return False
    for name, expected in entry["files"].items():
        path = root / name
        if not path.exists() or path.stat().st_size != expected["bytes"]:
            return False
        if sha256_bytes(path.read_bytes()) != expected["sha256"]:
            return False
    return True
