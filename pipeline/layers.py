"""Layers of adaptive query sets: error-based sets for a range of a finished set's epochs.

A finished shard set never changes. An adaptive refresh adds a *layer* beside it, in
``layers/<id>/``: for every training snapshot, a sampling distribution q computed from a model's
per-point error (:class:`pipeline.samplers.ErrorSampler`), and the query sets of epochs
[first, stop) drawn from q with the exact fixed-size sampler and the base set's keys (seed,
snapshot id, epoch). A layer holds the same records per shard as the base set's query sets do
(``error``, ``importance``, ``queries``, ``pi_scale``: pipeline/records.py ``LayerBlock``), in the
base set's formats and shard layout, and its own ``layer.json``:

* ``id``: a hash of the record without its provenance (the tool, the checkpoint's path),
  so of the layer's content: its files' checksums, the base set's identity, its ``parent`` (the
  layer below it, or null for the base), the model the error came from (``model.sha256``: the
  weights), the error's definition and the importance options, its epochs and their k;
* ``files``: the size and sha256 of every file, each checked when read.

Layers form a chain: the effective query set of an epoch is the newest layer of the chain that
covers it, else the base set's. A layer is written in a hidden ``layers/.partial-*`` directory
that is renamed to ``layers/<id>`` when whole, so a reader never sees half a layer, and a killed
refresh reruns into the same directory (finished shards are kept) to the same bytes.
"""

from __future__ import annotations

import json
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError, config_hash, from_dict, to_dict, without_keys
from pipeline.formats import FORMATS, ShardWriter
from pipeline.manifest import (
    TOOL_VERSION,
    FileEntry,
    FormatName,
    Manifest,
    ShardEntry,
    file_entry,
    part_is_done,
    shard_name,
)
from pipeline.query_codec import Slot, query_slots
from pipeline.records import LayerBlock, ShardError, SnapshotFields, StoredRecords, layer_schema
from pipeline.samplers import ErrorImportance, ErrorSampler
from pipeline.stages import QueryPlanStage, StageClock
from pipeline.storage import (
    RemoteConfig,
    is_url,
    join,
    read_bytes,
    write_atomic,
)
from pipeline.write_pool import ShardWrite, WritePool

LAYER_SCHEMA_VERSION = 1
LAYERS = "layers"  # the directory of a set's layers
LAYER_RECORD = "layer.json"
# where a layer comes from, not what it is: left out of its id
LAYER_PROVENANCE = ("id", "tool", "checkpoint")
_PARTS = "parts"  # a partial layer's per-shard records, removed when it is renamed into place


@dataclass(frozen=True)
class LayerRecord:
    """``layer.json``: what a layer holds, how it was made, and the checksum of every file."""

    schema_version: int
    id: str
    tool: str
    checkpoint: str | None  # the checkpoint file the model came from (provenance), if any
    base: str  # Manifest.identity of the shard set it layers
    parent: str | None  # the layer below it in the chain; null: directly on the base set
    split: str
    epochs: list[int]  # [first, stop): the base set's epochs it replaces the sets of
    k_per_epoch: list[int]  # the base set's k of those epochs
    query_slots: list[Slot]
    formats: list[FormatName]
    model: dict[str, Any]  # {"sha256": of the weights, "stage": ..., "step": ...}
    error: dict[str, Any]  # the per-point error's definition and its parameters
    importance: ErrorImportance
    seed: int  # the base set's seed: keys are (seed, snapshot id, epoch)
    files: dict[str, FileEntry] = field(default_factory=dict)

    def content_id(self) -> str:
        """The id this record's content gives (every key but :data:`LAYER_PROVENANCE`)."""
        view = to_dict(from_dict(LayerRecord, to_dict(self)))
        return config_hash(without_keys(view, LAYER_PROVENANCE))

    def covers(self, epoch: int) -> bool:
        return self.epochs[0] <= epoch < self.epochs[1]

    def slot(self, epoch: int) -> Slot:
        return self.query_slots[epoch - self.epochs[0]]

    def stored(self, manifest: Manifest, grid: tuple[int, ...]) -> StoredRecords:
        num = manifest.splits[self.split].num_snapshots
        return StoredRecords(LayerBlock, layer_schema(grid, self.k_per_epoch), self.files, num)

    def to_json(self) -> bytes:
        return (json.dumps(to_dict(self), indent=1, sort_keys=True) + "\n").encode()


def layer_location(location: str, layer_id: str) -> str:
    return join(location, LAYERS, layer_id)


def read_layer_record(location: str, layer_id: str, manifest: Manifest, remote=None) -> LayerRecord:
    """The record of layer ``layer_id`` of the set at ``location``, refused unless it parses, its
    id is its content's, and it layers this very set (``manifest``) with the set's own k."""
    path = join(layer_location(location, layer_id), LAYER_RECORD)
    try:
        raw = json.loads(read_bytes(path, remote))
    except (FileNotFoundError, OSError) as err:
        raise ShardError(f"{path}: no such layer of this shard set ({err})") from None
    except ValueError as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != LAYER_SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema_version {version!r}, this reader understands layers of version "
            f"{LAYER_SCHEMA_VERSION}; refresh the layer with this version"
        )
    try:
        record = from_dict(LayerRecord, raw)
    except ConfigError as err:
        raise ShardError(f"{path}: {str(err).replace('option ', 'key ')}") from None
    problems = []
    if record.id != layer_id or record.content_id() != layer_id:
        problems.append(f"its id {record.id[:12]}... is not its content's or its directory's")
    if record.base != manifest.identity:
        problems.append(
            f"it layers the set of identity {record.base[:12]}..., this set is "
            f"{manifest.identity[:12]}... (a layer of another shard set)"
        )
    first, stop = record.epochs if len(record.epochs) == 2 else (0, -1)
    if not 0 <= first < stop <= manifest.epochs:
        problems.append(
            f"epochs {record.epochs}: expected [first, stop) within [0, {manifest.epochs}]"
        )
    elif record.k_per_epoch != manifest.k_per_epoch[first:stop]:
        problems.append("k_per_epoch is not the set's for its epochs")
    elif record.query_slots != query_slots(manifest.num_points, record.k_per_epoch):
        problems.append("query_slots are not the slots of its k (pipeline/query_codec.py)")
    if record.split not in manifest.splits:
        problems.append(f"split {record.split!r} is not one of the set's")
    if problems:
        raise ShardError(f"{path}: {'; '.join(problems)}; the layer was edited or is corrupt")
    return record


def layer_chain(
    location: str, manifest: Manifest, layer: str | None, remote: RemoteConfig | None = None
) -> list[LayerRecord]:
    """The chain of layers ending at ``layer``, oldest first: None gives none (the base set);
    ``"latest"`` the chain of the only layer nothing is layered on (local sets; none where the
    set has no layers or lies behind a URL, which cannot be listed); else a layer id, or a
    unique prefix of one of at least 8 characters."""
    if layer is None:
        return []
    if layer == "latest":
        records = _local_layers(location, manifest, remote)
        parents = {r.parent for r in records.values()}
        tips = sorted(i for i in records if i not in parents)
        if len(tips) > 1:
            raise ShardError(
                f"{location}: its layers branch into {len(tips)} chains (tips "
                f"{', '.join(t[:12] for t in tips)}); name one with layer=ID"
            )
        return _walk(location, manifest, tips[0], remote) if tips else []
    if len(layer) < 8:
        raise ShardError(
            f"layer {layer!r}: expected a layer id or a prefix of at least 8 characters"
        )
    if len(layer) < 64 and not is_url(location):
        found = sorted(p.name for p in (Path(location) / LAYERS).glob(f"{layer}*") if p.is_dir())
        if len(found) != 1:
            raise ShardError(
                f"{location}: {'no' if not found else len(found)} layers match {layer!r}"
                + (f" ({', '.join(f[:12] for f in found)})" if found else "")
            )
        layer = found[0]
    return _walk(location, manifest, layer, remote)


def _local_layers(location: str, manifest: Manifest, remote) -> dict[str, LayerRecord]:
    if is_url(location):
        return {}
    root = Path(location) / LAYERS
    ids = sorted(
        p.parent.name for p in root.glob(f"*/{LAYER_RECORD}") if not p.parent.name.startswith(".")
    )
    return {i: read_layer_record(location, i, manifest, remote) for i in ids}


def _walk(location: str, manifest: Manifest, tip: str, remote) -> list[LayerRecord]:
    chain: list[LayerRecord] = []
    layer_id: str | None = tip
    while layer_id is not None:
        if any(r.id == layer_id for r in chain) or len(chain) > 10_000:
            raise ShardError(f"{location}: the layers below {tip[:12]} form a cycle")
        record = read_layer_record(location, layer_id, manifest, remote)
        chain.append(record)
        layer_id = record.parent
    return chain[::-1]


class LayerReader:
    """Reads one layer's shards (a LayerBlock per shard of its split), each checked against the
    layer's file checksums and the shard's snapshot ids."""

    def __init__(
        self,
        location: str,
        record: LayerRecord,
        manifest: Manifest,
        format: str,
        remote: RemoteConfig | None = None,
    ):
        if format not in record.formats:
            raise ShardError(
                f"layer {record.id[:12]}: no '{format}' files (it has {record.formats})"
            )
        self.record, self.location = record, layer_location(location, record.id)
        stored = record.stored(manifest, tuple(manifest.data.grid))
        self._reader = FORMATS[format].reader(self.location, record.split, stored, remote=remote)

    def read(self, shard: ShardEntry, expected: dict[str, np.ndarray]) -> LayerBlock:
        block = self._reader.read(shard)
        assert isinstance(block, LayerBlock)  # the reader of the record's stored(...)
        if not all(np.array_equal(getattr(block, name), ids) for name, ids in expected.items()):
            raise ShardError(
                f"{self.location}: shard {shard.index} holds other snapshots than the set's shard "
                "(a layer file was replaced)"
            )
        return block


# ---------------------------------------------------------------- writing a layer


@dataclass(frozen=True)
class LayerRequest:
    """Everything that decides a layer's bytes: the set (and chain) it extends, its epochs, the
    model and error it comes from, the importance options."""

    epochs: tuple[int, int]  # [first, stop)
    model: dict[str, Any]  # {"sha256": of the weights, "stage": ..., "step": ...}
    error: dict[str, Any]  # the per-point error's definition and parameters
    importance: ErrorImportance
    checkpoint: str | None = None  # provenance only


class LayerWriter:
    """Writes one layer of ``shards`` (a train ShardSet opened at the chain to extend): shards one
    by one (each rank of a distributed refresh its own), then :meth:`finalize` on one rank.

    ``error_of(block)`` returns the per-point error (S, N) of a shard's snapshots (a
    SnapshotFields) on ``device``:
    the model-specific part, handed in by the caller (ups/adaptive.py)."""

    def __init__(self, shards, request: LayerRequest, device: torch.device):
        manifest = shards.manifest
        first, stop = request.epochs
        if shards.split != "train":
            raise ShardError(
                f"{shards.location}: layers are for the train split, not '{shards.split}'"
            )
        if not 0 <= first < stop <= manifest.epochs:
            raise ConfigError(
                f"option 'epochs': expected A:B with 0 <= A < B <= {manifest.epochs} (the set's "
                f"epochs), got {first}:{stop}"
            )
        if is_url(shards.location):
            raise ShardError(
                f"{shards.location}: layers are written beside the set; refresh a local copy"
            )
        self.shards, self.request, self.device = shards, request, device
        self.grid = tuple(manifest.data.grid)
        self.k_per_epoch = manifest.k_per_epoch[first:stop]
        self.record = LayerRecord(
            schema_version=LAYER_SCHEMA_VERSION,
            id="",
            tool=TOOL_VERSION,
            checkpoint=request.checkpoint,
            base=manifest.identity,
            parent=shards.layer_ids[-1] if shards.layers else None,
            split="train",
            epochs=[first, stop],
            k_per_epoch=self.k_per_epoch,
            query_slots=query_slots(manifest.num_points, self.k_per_epoch),
            formats=list(manifest.formats),
            model=dict(request.model),
            error=dict(request.error),
            importance=request.importance,
            seed=int(manifest.config["seed"]),
        )
        # the same for every rank and every rerun of this request: where its parts go
        self.request_id = self.record.content_id()
        self.tmp = Path(shards.location) / LAYERS / f".partial-{self.request_id[:16]}"
        self.sampler = ErrorSampler(request.importance, manifest.sampler_beta)
        self.plan = QueryPlanStage(
            self.sampler, self.k_per_epoch, self.record.seed, self.grid, first
        )
        self.chunk = int(manifest.config["trajectories_per_shard"]) * shards.steps
        self.schema = layer_schema(self.grid, self.k_per_epoch)
        self.writers: list[ShardWriter] = [
            FORMATS[fmt].writer(self.tmp, self.schema, self.chunk) for fmt in self.record.formats
        ]
        # where write_shards' seconds go: waiting for a read, the error, the plan (q, the sets
        # and the copy to the host) on the main thread; the writes summed over their threads
        self.clock = StageClock(device)

    def create(self) -> None:
        """Once, before any shard (on one rank): the partial directory and zarr's arrays."""
        created = self.tmp / _PARTS / "created.json"
        if created.exists():
            return  # a rerun of this request: keep the shards it finished
        self.tmp.mkdir(parents=True, exist_ok=True)
        num = self.shards.manifest.splits["train"].num_snapshots
        for writer in self.writers:
            writer.create({"train": num})
        write_atomic(created, json.dumps({"request": self.request_id}).encode())

    def write_shards(
        self,
        error_of: Callable[[SnapshotFields], torch.Tensor],
        indices: list[int],
        progress: Callable[[int], None] | None = None,
        workers: int = 4,
    ) -> None:
        """Compute and write shards ``indices`` (those a rerun finds whole are kept). The next
        shard's ids, fields and latent are read while one is on the device (not its query sets
        of every epoch, most of its bytes: :meth:`ShardSet.read_fields`), and up to ``workers``
        shards are written at once behind it, in threads of a :class:`WritePool`: a refresh is
        short and runs inside training, where starting worker processes (seconds, the first
        time) would cost more than the interpreter lock they would free."""
        todo = []
        for index in indices:
            if part_is_done(self.tmp, self._part(index), self.request_id):
                if progress is not None:
                    progress(1)
            else:
                todo.append(index)
        if not todo:
            return
        with ThreadPoolExecutor(1) as reader, WritePool(workers, processes=False) as writers:
            read = self.shards.read_fields
            ahead = reader.submit(read, todo[0])
            pending: deque[Future[float]] = deque()
            for position, index in enumerate(todo):
                block = self.clock.timed("read", ahead.result)
                if position + 1 < len(todo):
                    ahead = reader.submit(read, todo[position + 1])
                error = self.clock.timed("error", error_of, block)
                layer = self.clock.timed("plan", self.plan_block, block, error)
                pending.append(writers.submit(self._write_job(index), layer))
                while len(pending) > workers or (pending and pending[0].done()):
                    # a failed write raises here
                    self.clock.count("write", writers.wait(pending.popleft()))
                    if progress is not None:
                        progress(1)
            while pending:
                self.clock.count("write", writers.wait(pending.popleft()))
                if progress is not None:
                    progress(1)

    def _part(self, index: int) -> Path:
        return self.tmp / _PARTS / f"{shard_name('train', index)}.json"

    def _write_job(self, index: int) -> ShardWrite:
        """Where shard ``index``'s files go in every format, and its part record (what a rerun
        keeps), for :func:`pipeline.write_pool.write_shard`."""
        return ShardWrite(
            root=str(self.tmp),
            formats=tuple(self.record.formats),
            schema=self.schema,
            chunk=self.chunk,
            split="train",
            index=index,
            name=shard_name("train", index),
            record=str(self._part(index).relative_to(self.tmp)),
            record_fields={"owner": self.request_id},
        )

    @torch.no_grad()
    def plan_block(self, block: SnapshotFields, error: torch.Tensor) -> LayerBlock:
        """A shard's layer records from its snapshots' per-point error (S, N)."""
        manifest = self.shards.manifest
        fields = None
        if self.request.importance.mix > 0:
            fields = manifest.data.norm.normalize(torch.from_numpy(block.fields).to(self.device))
        # stored as float16 (it is for inspection); q comes from the stored values exactly
        error = error.to(self.device).clamp(max=65504).half().float()
        q = self.sampler.error_probabilities(error, fields, manifest.data.periodic)
        queries, pi_scale = self.plan(q, block.snapshot_id)
        return LayerBlock(
            snapshot_id=block.snapshot_id,
            trajectory=block.trajectory,
            time=block.time,
            error=error.half().cpu().numpy(),
            importance=q.cpu().numpy(),
            queries=queries,
            pi_scale=pi_scale,
        )

    def finalize(self) -> str:
        """The layer's record over every shard's files, then the rename into ``layers/<id>``;
        returns the id. A layer that is already there with this id is kept as it is."""
        shards = self.shards.shards
        files: dict[str, FileEntry] = {}
        for shard in shards:
            part = self._part(shard.index)
            if not part.exists():
                raise ShardError(f"{self.tmp}: shard {shard.index} of the layer was not written")
            parts = json.loads(part.read_text())["files"]
            files.update({name: from_dict(FileEntry, entry) for name, entry in parts.items()})
        for meta in sorted(self.tmp.rglob("zarr.json")):
            name = meta.relative_to(self.tmp).as_posix()
            files[name] = file_entry(self.tmp, name, 0)
        record = replace(self.record, files=dict(sorted(files.items())))
        record = replace(record, id=record.content_id())
        final = self.tmp.parent / record.id
        if (final / LAYER_RECORD).exists():
            shutil.rmtree(self.tmp)  # the same layer, written before: nothing changes
            return record.id
        shutil.rmtree(self.tmp / _PARTS)
        for path in sorted(self.tmp.rglob("*"), reverse=True):  # a killed write's temporary files
            if path.is_file() and path.relative_to(self.tmp).as_posix() not in files:
                path.unlink()
        write_atomic(self.tmp / LAYER_RECORD, record.to_json())
        self.tmp.rename(final)  # whole, or not there
        return record.id
