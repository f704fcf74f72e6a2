"""build_shards: one pass over the data that writes a reusable, verifiable shard set.

The work is a deterministic plan of output shards (whole trajectories each), computed the same
way by every rank; rank r builds shards r, r + W, r + 2W, ... Each finished shard leaves a small
record under ``parts/`` (its files' sizes and sha256), written after its files are in place: a
rerun skips shards whose record verifies and redoes the rest. The finalize step merges the
records into ``manifest.json``, written last; a rerun of a finished build changes no byte.

A build owns its output directory while it runs (one lock per rank: a second build of the same
rank refuses at once) and owns only the files it writes there: ``overwrite`` removes those and
refuses when the directory holds anything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import ConfigError, check, config_diff, to_dict
from pipeline.formats import FORMATS, ShardWriter
from pipeline.manifest import (
    BUILD_STATE,
    COORDINATES,
    MANIFEST,
    SCHEMA_VERSION,
    TOOL_VERSION,
    DataEntry,
    EncoderEntry,
    FileEntry,
    FormatName,
    LatentEntry,
    Manifest,
    ShardEntry,
    SplitEntry,
    build_config_hash,
    build_id,
    file_entry,
    formats_of,
    part_is_done,
    read_manifest,
    sample_set_id,
    shard_name,
    tar_path,
    write_manifest,
)
from pipeline.query_codec import entropy_bound_bytes, query_slots, row_bytes
from pipeline.records import RecordSchema, ShardBlock, ShardError, record_schema
from pipeline.samplers import SamplerConfig, make_sampler
from pipeline.schedules import ScheduleConfig, k_per_epoch
from pipeline.sources.pdebench import DataInfo, PDEBenchFile
from pipeline.sources.splits import (
    SPLITS,
    DataConfig,
    NormStats,
    TrajectorySums,
    trajectory_sums,
)
from pipeline.stages import (
    EncoderLoader,
    EncodeStage,
    ImportanceStage,
    LatentEncoder,
    QueryPlanStage,
    ReadStage,
    StageClock,
    assemble,
)
from pipeline.storage import file_sha256, write_atomic
from pipeline.write_pool import ShardWrite, WritePool


@dataclass
class BuildConfig:
    data: DataConfig = field(default_factory=DataConfig)
    out: str = "shards/burgers1d"
    format: Literal["zarr", "wds", "both"] = "both"
    encoder: str | None = (
        None  # encoder checkpoint, read by the build's encoder loader; null: field-only shards
    )
    epochs: int = 10  # query sets precomputed per snapshot
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trajectories_per_shard: int = 4
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    latent_dtype: Literal["float16", "float32"] = "float32"
    batch_size: int = 64  # snapshots per encode / importance batch
    write_workers: int = 4  # shards written at once, behind the GPU stages
    # auto: worker processes on CUDA, where the writes' Python would hold up the GPU's thread;
    # threads on the CPU, whose cores the compute needs (pipeline/write_pool.py)
    write_in: Literal["auto", "processes", "threads"] = "auto"
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    amp: bool = True  # encode in bf16 autocast on CUDA (latents then differ from an fp32 encode by bf16 rounding)
    overwrite: bool = False
    rank: int = -1  # -1: from torchrun's RANK, else 0
    world_size: int = -1  # -1: from torchrun's WORLD_SIZE, else 1
    finalize: bool = False  # only merge finished parts into the manifest
    finalize_timeout: float = 3600.0  # seconds rank 0 waits for the other ranks' parts
    progress: bool = True

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        check(
            self.trajectories_per_shard >= 1,
            "trajectories_per_shard",
            "an integer >= 1",
            self.trajectories_per_shard,
        )
        check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        check(self.write_workers >= 1, "write_workers", "an integer >= 1", self.write_workers)
        check(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        check(
            self.finalize_timeout > 0,
            "finalize_timeout",
            "a positive number",
            self.finalize_timeout,
        )
        check(bool(self.out), "out", "a directory path", self.out)
        check(
            bool(self.splits) and set(self.splits) <= set(SPLITS),
            "splits",
            f"a non-empty subset of {list(SPLITS)}",
            self.splits,
        )

    @property
    def formats(self) -> list[FormatName]:
        return formats_of(self.format)


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: whole trajectories of one split, a contiguous block of its snapshots."""

    split: str
    index: int
    trajectories: tuple[int, ...]
    start: int  # first snapshot, counted within the split
    count: int

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def tar(self) -> str:
        return tar_path(self.name)

    @property
    def record(self) -> str:
        return f"parts/{self.name}.json"


@dataclass
class BuildPlan:
    """Everything that determines the output, computed identically by every rank before writing."""

    cfg: BuildConfig
    info: DataInfo
    splits: dict[str, list[int]]
    norm: NormStats
    encoder: LatentEncoder | None
    source: dict[str, Any]  # the data file's sha256 (and norm) and what they were computed for
    data_sha256: str
    k_per_epoch: list[int]
    sample_set_id: str
    build_id: str
    shards: list[ShardPlan]

    @property
    def chunk(self) -> int:
        return self.cfg.trajectories_per_shard * self.info.num_steps

    def schema(self) -> RecordSchema:
        latent = None
        if self.encoder is not None:
            latent = (*self.encoder.latent_shape, self.cfg.latent_dtype)
        return record_schema(len(self.info.channels), self.info.grid, self.k_per_epoch, latent)

    def writers(self) -> list[ShardWriter]:
        """One writer per output format, in the config's order."""
        root, schema = Path(self.cfg.out), self.schema()
        return [FORMATS[fmt].writer(root, schema, self.chunk) for fmt in self.cfg.formats]


def make_plan(cfg: BuildConfig, load_encoder: EncoderLoader | None = None) -> BuildPlan:
    """Validate everything that can be validated before a single byte is written.

    ``load_encoder`` reads ``cfg.encoder`` (a checkpoint path) into a :class:`LatentEncoder`; the
    pipeline knows no model, so a build with an encoder needs one (docs/design.md, section 3).
    """
    source, splits = cfg.data.open()
    info = source.info
    encoder = None
    if cfg.encoder is not None:
        if load_encoder is None:
            raise ConfigError(
                f"option 'encoder': {cfg.encoder} needs an encoder loader, none was given "
                "(tools/build_shards.py passes the codec's; run_build(cfg, load_encoder=...))"
            )
        encoder = load_encoder(cfg.encoder, info, splits)
    facts = source_facts(cfg, source, splits["train"], need_norm=encoder is None)
    if encoder is not None:
        norm = encoder.norm
    else:
        norm = NormStats(tuple(facts["norm"]["mean"]), tuple(facts["norm"]["std"]))
    ks = k_per_epoch(cfg.schedule, cfg.epochs, info.num_points)
    data_sha256 = facts["sha256"]
    set_id = sample_set_id(
        data_sha256=data_sha256,
        splits={split: splits[split] for split in cfg.splits},
        grid=list(info.grid),
        sampler=to_dict(cfg.sampler),
        schedule=to_dict(cfg.schedule),
        k_per_epoch=ks,
        seed=cfg.seed,
        epochs=cfg.epochs,
        norm=norm,
    )
    files_id = build_id(
        sample_set_id=set_id,
        encoder_sha256=None if encoder is None else encoder.identity["sha256"],
        format=cfg.format,
        latent_dtype=cfg.latent_dtype,
        trajectories_per_shard=cfg.trajectories_per_shard,
    )
    shards = []
    tps, steps = cfg.trajectories_per_shard, info.num_steps
    for split in cfg.splits:
        trajs = splits[split]
        for index, first in enumerate(range(0, len(trajs), tps)):
            chunk = tuple(trajs[first : first + tps])
            shards.append(ShardPlan(split, index, chunk, first * steps, len(chunk) * steps))
    return BuildPlan(
        cfg, info, splits, norm, encoder, facts, data_sha256, ks, set_id, files_id, shards
    )


# ---------------------------------------------------------------- output directory state


METADATA_RECORD = "parts/metadata.json"  # the formats' up-front files, recorded when created
SOURCE_RECORD = "parts/source.json"  # source_facts: the data file's sha256 and train norm
# what a build writes in its output directory, as glob patterns: overwrite removes these only
BUILD_WRITES = {
    ".": [MANIFEST, BUILD_STATE, ".lock", ".lock-rank*", ".*.tmp-*"],
    "parts": ["*.json", ".*.json.tmp-*"],
    "wds": ["*.tar", ".*.tar.tmp-*"],
    "zarr": ["zarr.json", "*/zarr.json", "*/*/zarr.json", "*/*/c/*", "*.partial"],
    # layers of adaptive sets (pipeline/layers.py), finished or partial
    "layers": ["*/layer.json", "*/wds/*.tar*", "*/zarr/*", "*/parts/*.json*"],
}


def foreign_files(root: Path) -> list[Path]:
    """Files under ``root`` that no build writes (data, notes, another tool's output)."""
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        relative = path.relative_to(root)
        top = relative.parts[0] if len(relative.parts) > 1 else "."
        inside = "/".join(relative.parts[1:]) if top != "." else relative.name
        if not any(fnmatch.fnmatch(inside, p) for p in BUILD_WRITES.get(top, [])):
            out.append(relative)
    return out


def remove_build_files(root: Path) -> None:
    """Delete what a build wrote under ``root``; refuses, deleting nothing, if anything else is there."""
    foreign = foreign_files(root)
    if foreign:
        shown = ", ".join(str(p) for p in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ShardError(
            f"{root} also holds files no build writes ({shown}); overwrite removes only a build's "
            "own files, so nothing was removed: choose another 'out'"
        )
    for path in sorted(root.iterdir()):
        if path.name.startswith(".lock"):
            continue  # held by the running ranks
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def check_out(out: str) -> Path:
    """The output directory, refused when it is a file."""
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"option 'out': {root} is a file; expected a directory (or a new path)")
    return root


@contextlib.contextmanager
def _locked(root: Path):
    """An exclusive lock on the output directory, for the few steps ranks must not interleave."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rank_lock_path(root: Path, rank: int) -> Path:
    return root / f".lock-rank{rank}"


@contextlib.contextmanager
def rank_lock(root: Path, rank: int):
    """Held by rank ``rank`` for its whole build: a second build of that rank refuses at once, and
    rank 0 can tell a rank that died (its lock is free) from one still building."""
    root.mkdir(parents=True, exist_ok=True)
    path = _rank_lock_path(root, rank)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ShardError(
                f"{root}: another build is writing it (rank {rank}'s lock {path.name} is held); "
                "wait for it to finish or choose another 'out'"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class RankWatch:
    """Which of the ranks a process waits on are gone: their lock on ``root`` has stayed free
    for ``DEAD_RANK_GRACE_S`` (the rank died or never started), so waiting longer is pointless."""

    def __init__(self, root: Path):
        self.root = root
        self.idle_since: dict[int, float] = {}  # rank -> when its lock was first seen free

    def gone(self, ranks: list[int]) -> list[int]:
        now = time.monotonic()
        for r in ranks:
            if rank_is_building(self.root, r):
                self.idle_since.pop(r, None)
            else:
                self.idle_since.setdefault(r, now)
        return [r for r in ranks if now - self.idle_since.get(r, now) >= DEAD_RANK_GRACE_S]


def rank_is_building(root: Path, rank: int) -> bool:
    """True while a process holds rank ``rank``'s lock on ``root``."""
    path = _rank_lock_path(root, rank)
    if not path.exists():
        return False
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def source_facts(
    cfg: BuildConfig, source: PDEBenchFile, train: list[int], need_norm: bool
) -> dict[str, Any]:
    """What a build needs from the whole data file: its sha256 and, for field-only sets, the
    train split's normalisation. Both read every byte (minutes for a 50 GB file), so they are
    computed once per output directory, not once per rank and rerun: rank 0 hashes the file
    while every rank sums its share of the train trajectories (``parts/norm-R-of-W.json``, see
    :func:`_norm_sums`), and rank 0's ``prepare_output`` records the result with the file's
    resolved path, size and modification time (``parts/source.json``); the other ranks wait for
    that record while rank 0 is building, and later runs reuse it while the file is unchanged."""
    path = Path(cfg.data.path)
    stat = path.stat()
    key = {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    root, record = Path(cfg.out), Path(cfg.out) / SOURCE_RECORD
    rank, world = resolve_rank(cfg)
    start, rank_zero = time.monotonic(), RankWatch(root)
    facts: dict[str, Any] = {}
    # this rank's share of the norm's sums and their seconds, once written (a rerun writes it
    # again: an old one may be stale)
    own: tuple[list[TrajectorySums], float] | None = None
    while True:
        try:
            saved = json.loads(record.read_text())
        except (FileNotFoundError, ValueError):
            saved = None
        if isinstance(saved, dict) and {name: saved.get(name) for name in key} == key:
            facts = saved
            if not need_norm or (saved.get("norm") or {}).get("train") == list(train):
                return saved
        if rank == 0 or rank_zero.gone([0]) or time.monotonic() - start > cfg.finalize_timeout:
            break  # rank 0 computes; another rank computes itself when rank 0 is not there to
        if need_norm and own is None and _share_norm(root, world):
            mine, tick = train[rank::world], time.monotonic()
            sums = trajectory_sums(source, mine, cfg.progress)
            own = sums, time.monotonic() - tick
            share = {**key, "trajectories": mine, "sums": sums}
            write_atomic(_share_path(root, rank, world), json.dumps(share).encode())
        time.sleep(0.2)
    # the hash (hashlib releases the interpreter lock) runs beside the norm statistics, so the
    # other ranks wait for the longer of the two, not their sum
    with ThreadPoolExecutor(max_workers=1) as hasher:
        digest = None if facts else hasher.submit(file_sha256, path)
        norm = None
        if need_norm:
            sums = (
                _norm_sums(cfg, source, train, key, rank, world, own)
                if _share_norm(root, world)
                else trajectory_sums(source, train, cfg.progress)
            )
            norm = NormStats.from_sums(sums)
        facts = dict(facts) if digest is None else {**key, "sha256": digest.result()}
    if norm is not None:
        facts["norm"] = {"train": list(train), **to_dict(norm)}
    return facts


NORM_SHARES = ("norm-*-of-*.json", ".norm-*-of-*.json.tmp-*")  # under parts/, and their temps


def _share_norm(root: Path, world: int) -> bool:
    """Whether the ranks share out the norm's sums: with several, in a directory holding a
    build's files alone (in another, rank 0 refuses to build and must not wait for shares)."""
    return world > 1 and not foreign_files(root)


def _share_path(root: Path, rank: int, world: int) -> Path:
    return root / "parts" / f"norm-{rank}-of-{world}.json"


def _norm_sums(
    cfg: BuildConfig,
    source: PDEBenchFile,
    train: list[int],
    key: dict[str, Any],
    rank: int,
    world: int,
    own: tuple[list[TrajectorySums], float] | None = None,
) -> list[TrajectorySums]:
    """The train trajectories' sums in train order, from ``world`` shares (rank r sums
    ``train[r::world]``): this rank's computed here (or ``own``: the sums and their seconds,
    when this rank computed them already while it waited for rank 0), the others' read from
    their records as they come, and computed here for a rank that is gone, or whose share is
    still missing well after this one's was done (twice its time, plus the grace a dead rank
    gets: a rank building another file or split never writes a matching one). Added in train
    order they give the same bits as one process summing them all, so the statistics (and the
    sample set's id) do not depend on the number of ranks."""
    root, watch, start = Path(cfg.out), RankWatch(Path(cfg.out)), time.monotonic()
    if own is None:
        own = trajectory_sums(source, train[rank::world], cfg.progress), 0.0
    shares = {rank: own[0]}
    patience = DEAD_RANK_GRACE_S + 2 * (time.monotonic() - start + own[1])
    waiting = [r for r in range(world) if r not in shares]
    while waiting:
        for r in waiting:
            try:
                saved = json.loads(_share_path(root, r, world).read_text())
            except (FileNotFoundError, ValueError):
                continue
            same_file = {name: saved.get(name) for name in key} == key
            if same_file and saved.get("trajectories") == train[r::world]:  # not a stale share
                shares[r] = [(s, sq, n) for s, sq, n in saved["sums"]]
        missing = [r for r in waiting if r not in shares]
        late = time.monotonic() - start > patience
        for r in missing if late else watch.gone(missing):
            shares[r] = trajectory_sums(source, train[r::world], cfg.progress)
        waiting = [r for r in waiting if r not in shares]
        if waiting:
            time.sleep(0.2)
    return [shares[i % world][i // world] for i in range(len(train))]


def _only_shares(parts: Path) -> bool:
    """True when ``parts/`` holds nothing but the ranks' norm shares (a build starting)."""
    return all(any(fnmatch.fnmatch(p.name, s) for s in NORM_SHARES) for p in parts.iterdir())


def prepare_output(plan: BuildPlan, world: int) -> None:
    """Refuse a directory holding another build unless --overwrite; create the formats' arrays once."""
    cfg, root = plan.cfg, Path(plan.cfg.out)
    with _locked(root):
        state = root / BUILD_STATE
        previous = json.loads(state.read_text()) if state.exists() else None
        others = [
            p
            for p in root.iterdir()
            if not p.name.startswith(".lock") and not (p.name == "parts" and _only_shares(p))
        ]
        if (previous is None and others) or (
            previous is not None and previous["build_id"] != plan.build_id
        ):
            found = (
                "files of no build"
                if previous is None
                else f"shards of sample_set_id {previous['sample_set_id'][:12]}"
            )
            if not cfg.overwrite:
                raise ShardError(
                    f"{root} holds {found}, not this build (sample_set_id {plan.sample_set_id[:12]}); "
                    "choose another 'out' or pass --overwrite true to replace it"
                )
            if world > 1:
                raise ShardError(
                    f"{root}: --overwrite with several ranks would race; delete the directory first"
                )
            remove_build_files(root)
            previous = None
        record = root / SOURCE_RECORD
        if not record.exists() or json.loads(record.read_text()) != plan.source:
            write_atomic(record, json.dumps(plan.source, sort_keys=True).encode())
        if previous is None:
            write_atomic(
                state,
                json.dumps(
                    {"sample_set_id": plan.sample_set_id, "build_id": plan.build_id}
                ).encode(),
            )
        if not (root / METADATA_RECORD).exists():
            sizes = {
                split: sum(s.count for s in plan.shards if s.split == split) for split in cfg.splits
            }
            writers = plan.writers()
            for writer in writers:  # zarr: the store describes itself
                writer.create(sizes, attributes=zarr_attributes(plan))
            recorded = {
                name: to_dict(file_entry(root, name, 0))
                for writer in writers
                for name in writer.metadata()
            }
            write_atomic(root / METADATA_RECORD, json.dumps(recorded, sort_keys=True).encode())


ZARR_ATTRIBUTE = "ups_shards"  # the root group's attribute that describes the set


def zarr_attributes(plan: BuildPlan) -> dict[str, dict[str, Any]]:
    """The zarr store's group attributes, by group path ("" the root, else a split), so that the
    store describes itself without the manifest: ids, data (channels, grid, dt, normalisation,
    ...), epochs and k, sampler, schedule, seed, latent; per split its trajectories and counts.
    Everything comes from the plan and nothing from the run (no time, no path), so every rank
    and every rerun writes the same bytes."""
    cfg, info = plan.cfg, plan.info
    data = {key: value for key, value in to_dict(_data_entry(plan)).items() if key != "path"}
    latent = None
    if plan.encoder is not None:
        latent = to_dict(LatentEntry(*plan.encoder.latent_shape, cfg.latent_dtype))
    root = {
        "schema_version": SCHEMA_VERSION,
        "sample_set_id": plan.sample_set_id,
        "build_id": plan.build_id,
        "data": data,
        "epochs": cfg.epochs,
        "k_per_epoch": list(plan.k_per_epoch),
        "query_slots": [to_dict(s) for s in query_slots(info.num_points, plan.k_per_epoch)],
        "sampler": to_dict(cfg.sampler),
        "schedule": to_dict(cfg.schedule),
        "seed": cfg.seed,
        "trajectories_per_shard": cfg.trajectories_per_shard,
        "latent": latent,
    }
    attributes: dict[str, dict[str, Any]] = {"": {ZARR_ATTRIBUTE: root}}
    for split in cfg.splits:
        entry = _split_entry(plan, split)
        attributes[split] = {
            "trajectories": list(entry.trajectories),
            "snapshots_per_trajectory": entry.snapshots_per_trajectory,
            "num_snapshots": entry.num_snapshots,
        }
    return attributes


def remove_leftovers(root: Path, shard: ShardPlan, writers: list[ShardWriter]) -> None:
    """Delete the temporary files a killed build left for ``shard`` (a partial tar, zarr's
    ``*.partial`` chunk files, a record's temporary name); only the shard's own rank calls this."""
    patterns = [f"parts/.{shard.name}.json.tmp-*"]
    for writer in writers:
        patterns += writer.leftovers(shard.split, shard.index, shard.name)
    for pattern in patterns:
        for path in root.glob(pattern):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------- the pass


class Builder:
    """Runs the stages over this rank's shards, overlapping reads and writes with the GPU work."""

    def __init__(self, plan: BuildPlan, device: torch.device):
        cfg = plan.cfg
        self.plan, self.root, self.device = plan, Path(cfg.out), device
        source, _ = cfg.data.open()
        sampler = make_sampler(cfg.sampler)
        self.read = ReadStage(source)
        self.encode = (
            EncodeStage(plan.encoder, device, cfg.batch_size, cfg.latent_dtype, cfg.amp)
            if plan.encoder
            else None
        )
        self.writers = plan.writers()
        self.importance = ImportanceStage(sampler, plan.norm, plan.info.periodic, cfg.batch_size)
        self.query_plan = QueryPlanStage(sampler, plan.k_per_epoch, cfg.seed, plan.info.grid)
        self.clock = StageClock(device)

    def compute(self, shard: ShardPlan, read: dict[str, np.ndarray]) -> ShardBlock:
        """A shard's records from its read, every step timed: ``to device`` (the fields),
        ``checks`` (their range, and q's), the GPU stages, and ``to host`` (q to the record)."""
        timed = self.clock.timed
        fields = timed("to device", torch.from_numpy(read["fields"]).to, self.device)
        timed("checks", self._check_range, shard, fields, read)
        latent = timed("encode", self.encode, fields) if self.encode else None
        q = timed("importance", self.importance, fields)
        timed("checks", self._check_range, shard, q, read, "the importance q")
        queries, pi_scale = timed("query plan", self.query_plan, q, read["snapshot_id"])
        return timed("to host", assemble, read, q, queries, pi_scale, latent)

    def _check_range(
        self, shard: ShardPlan, values: torch.Tensor, read: dict, what: str = ""
    ) -> None:
        """Refuse values float32 arithmetic cannot carry, naming the file, trajectory and time:
        normalised fields whose square (the MSE losses) overflows, or a q that is not finite."""
        if not what:
            values, what = self.plan.norm.normalize(values), "the normalised fields"
            bad = ~(values.abs() < _FLOAT32_SQRT_MAX)
        else:
            bad = ~torch.isfinite(values)
        rows = bad.flatten(1).any(1).nonzero().flatten().tolist()
        if rows:
            row = rows[0]
            largest = float(values[row].abs().max())
            raise ShardError(
                f"{self.plan.cfg.data.path}: trajectory {int(read['trajectory'][row])}, time "
                f"{int(read['time'][row])} (split {shard.split}): {what} reach {largest:.3g}, beyond "
                "what float32 training can carry; check the data (values this large are not physical)"
            )

    def write_job(self, shard: ShardPlan) -> ShardWrite:
        """What a write worker needs for ``shard``: its files' places and its part record's."""
        plan = self.plan
        return ShardWrite(
            root=str(self.root),
            formats=tuple(plan.cfg.formats),
            schema=plan.schema(),
            chunk=plan.chunk,
            split=shard.split,
            index=shard.index,
            name=shard.name,
            record=shard.record,
            record_fields={
                "owner": plan.build_id,
                "split": shard.split,
                "index": shard.index,
                "count": shard.count,
            },
        )

    def run(self, shards: list[ShardPlan], pool: WritePool) -> None:
        """Read ahead one shard, and keep up to ``write_workers`` shards writing (in ``pool``'s
        processes or threads), while the current one is on the GPU. What the GPU stages still
        wait for is counted: ``read wait`` and ``write wait``, the seconds their thread waited for
        a shard's read and for a free writer (the last writes included)."""
        limit = self.plan.cfg.write_workers
        bars = {}
        for split in self.plan.cfg.splits:
            total = sum(s.count for s in shards if s.split == split)
            if total:
                bars[split] = tqdm(
                    total=total,
                    desc=f"build {split}",
                    unit="snap",
                    disable=not self.plan.cfg.progress,
                )
        with ThreadPoolExecutor(max_workers=1) as reader:
            reads: dict[int, Future] = {}
            writing: deque[Future[float]] = deque()
            if shards:
                reads[0] = reader.submit(self._timed_read, shards[0])
            for i, shard in enumerate(shards):
                if i + 1 < len(shards):
                    reads[i + 1] = reader.submit(self._timed_read, shards[i + 1])
                waited = time.perf_counter()
                read = reads.pop(i).result()
                self.clock.add("read wait", waited)
                block = self.compute(shard, read)
                waited = time.perf_counter()
                while len(writing) >= limit:
                    self.clock.count("write", pool.wait(writing.popleft()))
                writing.append(pool.submit(self.write_job(shard), block))  # waits for workers
                self.clock.add("write wait", waited)  # to start, the first time
                bars[shard.split].update(shard.count)
            waited = time.perf_counter()
            for future in writing:
                self.clock.count("write", pool.wait(future))  # summed over the workers
            self.clock.add("write wait", waited)
        for bar in bars.values():
            bar.close()

    def _timed_read(self, shard: ShardPlan) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = self.read(shard.trajectories)
        self.clock.add("read", start)
        return out


# the stage table's rows, in the order a shard passes them (read and write overlap the rest;
# ``total`` is their wall-clock)
STAGES = (
    "read", "to device", "checks", "encode", "importance", "query plan", "to host", "write", "total",
)  # fmt: skip

_FLOAT32_SQRT_MAX = float(np.sqrt(np.finfo(np.float32).max))  # ~1.8e19: its square still fits

# build options that do not change what is built: left out of the manifest's config
RUN_OPTIONS = (
    "write_workers",
    "write_in",
    "rank",
    "world_size",
    "finalize",
    "progress",
    "overwrite",
    "finalize_timeout",
    "device",
    "amp",
)


def finalize(plan: BuildPlan) -> Manifest:
    """Merge the shard records into manifest.json (written last, atomically)."""
    root, cfg = Path(plan.cfg.out), plan.cfg
    missing = [s.record for s in plan.shards if not (root / s.record).exists()]
    if missing:
        raise ShardError(
            f"{root}: cannot finalize, {len(missing)} shard(s) unfinished, e.g. {missing[:3]}; rerun the build"
        )
    files: dict[str, FileEntry] = {}
    for shard in plan.shards:
        record = json.loads((root / shard.record).read_text())
        files.update({name: FileEntry(**entry) for name, entry in record["files"].items()})
    for name, entry in json.loads((root / METADATA_RECORD).read_text()).items():
        if file_entry(root, name, 0) != FileEntry(**entry):
            raise ShardError(
                f"{root / name}: changed since this build created it (edited?); a finished set "
                "is not rewritten: build into an empty 'out'"
            )
        files[name] = FileEntry(**entry)
    config = {key: value for key, value in to_dict(cfg).items() if key not in RUN_OPTIONS}
    encoder = plan.encoder
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        tool=TOOL_VERSION,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        config=config,
        config_hash=build_config_hash(config),
        sample_set_id=plan.sample_set_id,
        build_id=plan.build_id,
        encoder=None if encoder is None else EncoderEntry(**encoder.identity),
        latent=None if encoder is None else LatentEntry(*encoder.latent_shape, cfg.latent_dtype),
        data=_data_entry(plan),
        formats=cfg.formats,
        epochs=cfg.epochs,
        k_per_epoch=plan.k_per_epoch,
        query_slots=query_slots(plan.info.num_points, plan.k_per_epoch),
        query_bytes=_query_storage(plan, files),
        splits={split: _split_entry(plan, split) for split in cfg.splits},
        files=files,
    )
    if (root / MANIFEST).exists():
        try:
            existing = read_manifest(str(root))
        except ShardError:
            existing = None
        if existing is not None and existing.identity == manifest.identity:
            return existing  # a no-op rebuild changes no byte
        if not cfg.overwrite:
            diff = (
                ["the manifest does not read back"]
                if existing is None
                else config_diff(existing.identity_view(), manifest.identity_view())
            )
            raise ShardError(
                f"{root / MANIFEST}: differs from what this build writes ({'; '.join(diff[:3])}); "
                "a finished set is not rewritten: pass overwrite=true to rewrite its manifest"
            )
    write_manifest(root, manifest)
    return manifest


def _data_entry(plan: BuildPlan) -> DataEntry:
    info = plan.info
    return DataEntry(
        path=str(plan.cfg.data.path),
        sha256=plan.data_sha256,
        channels=list(info.channels),
        grid=list(info.grid),
        coordinates=COORDINATES,
        periodic=list(info.periodic),
        dt=info.dt,
        params=info.params,
        norm=plan.norm,
    )


def _split_entry(plan: BuildPlan, split: str) -> SplitEntry:
    own = [s for s in plan.shards if s.split == split]
    return SplitEntry(
        trajectories=plan.splits[split],
        num_snapshots=sum(s.count for s in own),
        snapshots_per_trajectory=plan.info.num_steps,
        shards=[ShardEntry(s.index, s.start, s.count, list(s.trajectories), s.tar) for s in own],
    )


def _query_storage(plan: BuildPlan, files: dict[str, FileEntry]) -> dict[str, float]:
    """Bytes per sparse snapshot-epoch of the stored query sets: as coded (the tars), as stored
    in zarr (compressed), and the entropy bound, each averaged over the sampled (k < N) epochs."""
    n = plan.info.num_points
    sparse = [k for k in plan.k_per_epoch if k < n]
    if not sparse:
        return {"entropy_bound": 0.0, "tar": 0.0}
    coded = row_bytes(n, plan.k_per_epoch)  # dense epochs take no bytes
    out = {
        "entropy_bound": float(np.mean([entropy_bound_bytes(n, k) for k in sparse])),
        "tar": coded / len(sparse),
    }
    zarr_bytes = sum(v.bytes for name, v in files.items() if "/queries/c/" in name)
    if zarr_bytes:
        out["zarr"] = zarr_bytes / (sum(s.count for s in plan.shards) * len(sparse))
    return out


def resolve_rank(cfg: BuildConfig) -> tuple[int, int]:
    rank = cfg.rank if cfg.rank >= 0 else int(os.environ.get("RANK", 0))
    world = cfg.world_size if cfg.world_size >= 0 else int(os.environ.get("WORLD_SIZE", 1))
    check(world >= 1 and 0 <= rank < world, "rank", f"0 <= rank < world_size={world}", rank)
    return rank, world


def run_build(cfg: BuildConfig, load_encoder: EncoderLoader | None = None) -> dict[str, Any]:
    """Build this rank's shards; rank 0 then waits for the others and writes the manifest.

    ``load_encoder`` turns ``cfg.encoder`` into a :class:`LatentEncoder` (see :func:`make_plan`).
    """
    rank, world = resolve_rank(cfg)
    root = check_out(cfg.out)
    device = _device(cfg.device)
    created = not root.exists()
    started = time.perf_counter()
    # worker processes start while the plan is made (the source's hash and norm statistics);
    # a finalize writes no shard, so it starts none
    processes = not cfg.finalize and (
        cfg.write_in == "processes" or (cfg.write_in == "auto" and device.type == "cuda")
    )
    with rank_lock(root, rank), WritePool(cfg.write_workers, processes) as pool:
        try:
            plan = make_plan(cfg, load_encoder)
        except BaseException:
            if created:  # leave no trace of a build that never started
                _rank_lock_path(root, rank).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    root.rmdir()
            raise
        if cfg.finalize:
            return {"manifest": finalize(plan), "seconds": {}}
        prepare_output(plan, world)
        return _build(plan, rank, world, device, pool, setup=time.perf_counter() - started)


def _device(option: str) -> torch.device:
    """The build's device; ``cuda`` without a CUDA device is refused before any work."""
    if option == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(option)
    except RuntimeError:
        raise ConfigError(
            f"option 'device': expected auto, cpu or cuda[:N], got {option!r}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"option 'device': {option!r}, but no CUDA device is available here")
    return device


def _build(
    plan: BuildPlan, rank: int, world: int, device: torch.device, pool: WritePool, setup: float
) -> dict[str, Any]:
    """This rank's shards, then (rank 0) the manifest. The summary's seconds hold the stages
    (``total`` is their wall-clock; ``read wait`` and ``write wait`` the parts of it the GPU
    stages spent waiting for reads and writers) and, apart, what surrounds them: ``setup`` (the
    plan, with the source's sha256 and norm statistics computed or awaited, and the output
    prepared), ``start`` (the builder on its device), and on rank 0 ``wait`` (for the other
    ranks) and ``finalize``."""
    root = Path(plan.cfg.out)
    mine = [s for i, s in enumerate(plan.shards) if i % world == rank]
    todo = [s for s in mine if not part_is_done(root, root / s.record, plan.build_id)]
    clock = time.perf_counter()
    builder = Builder(plan, device)
    for shard in todo:
        remove_leftovers(root, shard, builder.writers)
    start = time.perf_counter()
    builder.run(todo, pool)
    seconds = dict(
        builder.clock.seconds, total=time.perf_counter() - start, setup=setup, start=start - clock
    )
    summary: dict[str, Any] = {
        "rank": rank,
        "world_size": world,
        "shards": len(mine),
        "skipped": len(mine) - len(todo),
        "snapshots": sum(s.count for s in todo),
        "seconds": seconds,
        "device": str(device),
    }
    if rank == 0:
        clock = time.perf_counter()
        wait_for_ranks(plan, world)
        seconds["wait"] = time.perf_counter() - clock
        summary["manifest"] = finalize(plan)
        seconds["finalize"] = time.perf_counter() - clock - seconds["wait"]
    return summary


DEAD_RANK_GRACE_S = 30.0  # a rank whose lock stays free this long, its shards unfinished, is gone


def wait_for_ranks(plan: BuildPlan, world: int) -> None:
    """Rank 0: wait, with a progress bar, until every shard's record exists. Fails with the ranks
    named when ``finalize_timeout`` passes, or sooner when a rank with unfinished shards holds no
    lock (it died or never started) for ``DEAD_RANK_GRACE_S``."""
    cfg, root = plan.cfg, Path(plan.cfg.out)
    owner = {s.record: i % world for i, s in enumerate(plan.shards)}
    start, watch = time.monotonic(), RankWatch(root)
    bar = tqdm(total=len(plan.shards), desc="shards of all ranks", disable=not cfg.progress)
    try:
        while True:
            unfinished = [s.record for s in plan.shards if not (root / s.record).exists()]
            missing = sorted({owner[record] for record in unfinished})
            bar.n = len(plan.shards) - len(unfinished)
            bar.set_postfix_str(f"waiting for ranks {missing}" if missing else "")
            bar.refresh()
            if not missing:
                return
            gone = watch.gone(missing)
            if gone:
                raise ShardError(
                    f"{root}: rank(s) {gone} left shards unfinished and no process is building "
                    f"them; rerun those ranks, then build_shards --finalize true"
                )
            if time.monotonic() - start > cfg.finalize_timeout:
                raise ShardError(
                    f"{root}: rank(s) {missing} did not finish within finalize_timeout="
                    f"{cfg.finalize_timeout} s; run build_shards --finalize true once they have"
                )
            time.sleep(0.5)
    finally:
        bar.close()


__all__ = ["MANIFEST", "STAGES", "BuildConfig", "make_plan", "run_build"]
