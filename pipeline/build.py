"""build_shards: one pass over the data that writes a reusable, verifiable shard set.

The work is a deterministic plan of output shards (whole trajectories each), computed the same
way by every rank; rank r builds shards r, r + W, r + 2W, ... Each finished shard leaves a small
record under ``parts/`` (its files' sizes and sha256), written after its files are in place: a
rerun skips shards whose record verifies and redoes the rest. The finalize step merges the
records into ``manifest.json``, written last.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import ConfigError, check, config_hash, to_dict
from pipeline.formats import FORMATS, ShardWriter
from pipeline.formats.wds import tar_path
from pipeline.manifest import (
    COORDINATES,
    MANIFEST,
    SCHEMA_VERSION,
    DataEntry,
    EncoderEntry,
    FileEntry,
    LatentEntry,
    Manifest,
    ShardEntry,
    SplitEntry,
    write_manifest,
)
from pipeline.query_codec import entropy_bound_bytes
from pipeline.records import RecordSchema, ShardBlock, ShardError, record_schema
from pipeline.samplers import SamplerConfig, make_sampler
from pipeline.schedules import ScheduleConfig, k_per_epoch
from pipeline.sources.pdebench import DataInfo
from pipeline.sources.splits import SPLITS, DataConfig, NormStats
from pipeline.stages import (
    EncoderLoader,
    EncodeStage,
    ImportanceStage,
    LatentEncoder,
    QueryPlanStage,
    ReadStage,
    assemble,
)
from pipeline.storage import file_sha256, sha256_bytes, write_atomic

TOOL_VERSION = "ups-shards 0.1.0"


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
        check(
            bool(self.splits) and set(self.splits) <= set(SPLITS),
            "splits",
            f"a non-empty subset of {list(SPLITS)}",
            self.splits,
        )

    @property
    def formats(self) -> list[str]:
        return ["zarr", "wds"] if self.format == "both" else [self.format]


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
        return f"{self.split}-{self.index:06d}"

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
        return record_schema(len(self.info.channels), self.info.grid, len(self.k_per_epoch), latent)

    def writers(self) -> list[ShardWriter]:
        """One writer per output format, in the config's order."""
        root, schema = Path(self.cfg.out), self.schema()
        return [FORMATS[fmt].writer(root, schema, self.chunk) for fmt in self.cfg.formats]


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


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
        norm = encoder.norm
    else:
        norm = NormStats.from_trajectories(source, splits["train"], progress=cfg.progress)
    ks = k_per_epoch(cfg.schedule, cfg.epochs, info.num_points)
    data_sha256 = file_sha256(cfg.data.path)
    sample_set_id = _hash(
        {
            "data_sha256": data_sha256,
            "splits": splits,
            "grid": list(info.grid),
            "sampler": to_dict(cfg.sampler),
            "schedule": to_dict(cfg.schedule),
            "k_per_epoch": ks,
            "seed": cfg.seed,
            "epochs": cfg.epochs,
        }
    )
    build_id = _hash(
        {
            "sample_set_id": sample_set_id,
            "encoder": None if encoder is None else encoder.identity,
            "format": cfg.format,
            "latent_dtype": cfg.latent_dtype,
            "trajectories_per_shard": cfg.trajectories_per_shard,
            "splits": cfg.splits,
        }
    )
    shards = []
    tps, steps = cfg.trajectories_per_shard, info.num_steps
    for split in cfg.splits:
        trajs = splits[split]
        for index, first in enumerate(range(0, len(trajs), tps)):
            chunk = tuple(trajs[first : first + tps])
            shards.append(ShardPlan(split, index, chunk, first * steps, len(chunk) * steps))
    return BuildPlan(
        cfg, info, splits, norm, encoder, data_sha256, ks, sample_set_id, build_id, shards
    )


# ---------------------------------------------------------------- output directory state


@contextlib.contextmanager
def _locked(root: Path):
    """An exclusive lock on the output directory, for the few steps ranks must not interleave."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_output(plan: BuildPlan, world: int) -> None:
    """Refuse a directory holding another build unless --overwrite; create the zarr arrays once."""
    cfg, root = plan.cfg, Path(plan.cfg.out)
    with _locked(root):
        state = root / "build.json"
        previous = json.loads(state.read_text()) if state.exists() else None
        others = [p for p in root.iterdir() if p.name != ".lock"]
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
            for path in others:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            previous = None
        if previous is None:
            write_atomic(
                state,
                json.dumps(
                    {"sample_set_id": plan.sample_set_id, "build_id": plan.build_id}
                ).encode(),
            )
        ready = root / ".formats-ready"  # written once every format's up-front files exist
        if not ready.exists():
            sizes = {
                split: sum(s.count for s in plan.shards if s.split == split) for split in cfg.splits
            }
            for writer in plan.writers():
                writer.create(sizes)
            ready.touch()


def _file_entry(root: Path, name: str, count: int) -> FileEntry:
    data = (root / name).read_bytes()
    return FileEntry(bytes=len(data), sha256=sha256_bytes(data), count=count)


def shard_is_done(root: Path, shard: ShardPlan, build_id: str) -> bool:
    """True when the shard's record exists and every file it lists verifies."""
    record = root / shard.record
    if not record.exists():
        return False
    entry = json.loads(record.read_text())
    if entry.get("build_id") != build_id:
        return False
    for name, expected in entry["files"].items():
        path = root / name
        if not path.exists() or path.stat().st_size != expected["bytes"]:
            return False
        if sha256_bytes(path.read_bytes()) != expected["sha256"]:
            return False
    return True


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
        self.seconds: dict[str, float] = defaultdict(float)

    def _timed(self, stage: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[stage] += time.perf_counter() - start
        return out

    def compute(self, shard: ShardPlan, read: dict[str, np.ndarray]) -> ShardBlock:
        fields = torch.from_numpy(read["fields"]).to(self.device)
        latent = self._timed("encode", self.encode, fields) if self.encode else None
        q = self._timed("importance", self.importance, fields)
        queries, pi_scale = self._timed("query plan", self.query_plan, q, read["snapshot_id"])
        return assemble(read, q, queries, pi_scale, latent)

    def write(self, shard: ShardPlan, block: ShardBlock) -> None:
        start = time.perf_counter()
        files = []
        for writer in self.writers:
            files += writer.write(shard.split, shard.index, shard.name, block)
        record = {
            "build_id": self.plan.build_id,
            "split": shard.split,
            "index": shard.index,
            "count": shard.count,
            "files": {name: to_dict(_file_entry(self.root, name, shard.count)) for name in files},
        }
        write_atomic(self.root / shard.record, json.dumps(record, sort_keys=True).encode())
        self.seconds["write"] += time.perf_counter() - start

    def run(self, shards: list[ShardPlan]) -> None:
        """Read ahead one shard and write behind one shard while the current one is on the GPU."""
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending_write = None
            reads = {}
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
            if shards:
                reads[0] = pool.submit(self._timed_read, shards[0])
            for i, shard in enumerate(shards):
                if i + 1 < len(shards):
                    reads[i + 1] = pool.submit(self._timed_read, shards[i + 1])
                block = self.compute(shard, reads.pop(i).result())
                if pending_write is not None:
                    pending_write.result()
                pending_write = pool.submit(self.write, shard, block)
                bars[shard.split].update(shard.count)
            if pending_write is not None:
                pending_write.result()
            for bar in bars.values():
                bar.close()

    def _timed_read(self, shard: ShardPlan) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = self.read(shard.trajectories)
        self.seconds["read"] += time.perf_counter() - start
        return out


# build options that do not change what is built: left out of the manifest's config
RUN_OPTIONS = (
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
    for writer in plan.writers():
        files.update({name: _file_entry(root, name, 0) for name in writer.metadata()})
    config = {key: value for key, value in to_dict(cfg).items() if key not in RUN_OPTIONS}
    encoder = plan.encoder
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        tool=TOOL_VERSION,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        config=config,
        config_hash=config_hash(config),
        sample_set_id=plan.sample_set_id,
        build_id=plan.build_id,
        encoder=None if encoder is None else EncoderEntry(**encoder.identity),
        latent=None if encoder is None else LatentEntry(*encoder.latent_shape, cfg.latent_dtype),
        data=_data_entry(plan),
        formats=cfg.formats,
        epochs=cfg.epochs,
        k_per_epoch=plan.k_per_epoch,
        query_bytes=_query_storage(plan, files),
        splits={split: _split_entry(plan, split) for split in cfg.splits},
        files=files,
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
    """Bytes per snapshot-epoch of the stored query sets (zarr, compressed) vs the entropy bound."""
    n = plan.info.num_points
    sparse = [k for k in plan.k_per_epoch if k < n]
    bound = float(np.mean([entropy_bound_bytes(n, k) for k in sparse])) if sparse else 0.0
    out = {"entropy_bound": bound, "tar": (n + 7) // 8}
    zarr_bytes = sum(v.bytes for name, v in files.items() if "/queries/c/" in name)
    if zarr_bytes:
        snapshots = sum(s.count for s in plan.shards)
        out["zarr"] = zarr_bytes / (snapshots * len(plan.k_per_epoch))
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
    plan = make_plan(cfg, load_encoder)
    root = Path(cfg.out)
    if cfg.finalize:
        return {"manifest": finalize(plan), "seconds": {}}
    prepare_output(plan, world)
    if cfg.device != "auto":
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    mine = [s for i, s in enumerate(plan.shards) if i % world == rank]
    todo = [s for s in mine if not shard_is_done(root, s, plan.build_id)]
    builder = Builder(plan, device)
    for shard in todo:
        remove_leftovers(root, shard, builder.writers)
    start = time.perf_counter()
    builder.run(todo)
    seconds = dict(builder.seconds, total=time.perf_counter() - start)
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
        deadline = time.monotonic() + cfg.finalize_timeout
        while any(not (root / s.record).exists() for s in plan.shards):
            if time.monotonic() > deadline:
                raise ShardError(
                    f"{root}: other ranks' shards did not finish within {cfg.finalize_timeout} s; run --finalize true later"
                )
            time.sleep(0.5)
        summary["manifest"] = finalize(plan)
    return summary


__all__ = ["MANIFEST", "BuildConfig", "make_plan", "run_build"]
