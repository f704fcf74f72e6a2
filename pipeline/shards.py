"""Reading a finished shard set: ``open_shards(path_or_url)``.

Works on both formats and on local paths, ``file://``, ``http(s)://`` and fsspec URLs. Every
file is checked against the manifest's sha256 when it is read, so a corrupt or edited shard is
reported by name instead of silently training on bad data.

The train split's query sets of an epoch come from the newest layer of adaptive sets that covers
it (pipeline/layers.py), else from the set itself. A training run that refreshes its sets names
the epochs whose layer is still to come (:meth:`ShardSet.await_layers`); readers of those epochs
wait until :meth:`ShardSet.add_layer` brings it, so every epoch's sets are decided before any of
its batches is made.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from pipeline.formats import FORMATS
from pipeline.layers import LayerReader, layer_chain, layer_location, read_layer_record
from pipeline.manifest import ShardEntry, read_listed, read_manifest
from pipeline.query_codec import Slot, decode_sets, query_slots
from pipeline.records import (
    LayerBlock,
    ShardBlock,
    ShardError,
    SnapshotBlock,
    SnapshotFields,
    trajectory_ids,
)
from pipeline.samplers import weights_from_scale
from pipeline.storage import RemoteConfig

R = TypeVar("R", ShardBlock, SnapshotBlock, SnapshotFields)


@dataclass
class QuerySets:
    """One epoch's query sets of a block of S snapshots, decoded: what a batch's sparse terms need."""

    indices: np.ndarray  # (S, k) int64 flat C-order grid indices, ascending
    values: np.ndarray  # (S, k, C) float32 the fields there, physical units
    weights: np.ndarray  # (S, k) float32 loss weights w = (k / (N pi))^beta


def gather_queries(
    block: ShardBlock | SnapshotBlock,
    codes: np.ndarray,
    slot: Slot,
    k: int,
    beta: float,
    where: str = "shard",
    sets: LayerBlock | None = None,
) -> QuerySets:
    """Decode a block's coded query sets of one stored epoch (``codes``, (S, slot bytes), the
    epoch's ``slot`` of the queries rows) and gather the fields and q there; q and pi_scale are
    those of a layer's block ``sets`` when the codes came from it.

    Vectorised over the block, so the streaming loader does it once per shard and epoch in its
    read-ahead threads, not per example; in numpy, which stays on the calling thread (see
    :func:`weights_from_scale`). The weights follow from the stored q and the two integers of
    ``pi_scale``: only q at the k points is read.
    """
    source: ShardBlock | SnapshotBlock | LayerBlock = block if sets is None else sets
    s, n = len(block), block.importance.shape[1]
    try:
        indices = decode_sets(codes, n, k, slot, where)  # (S, k)
    except ValueError as err:
        raise ShardError(str(err)) from None
    fields = block.fields.reshape(s, -1, n)  # (S, C, N)
    values = np.take_along_axis(fields, indices[:, None, :], axis=2)  # (S, C, k)
    q_at = np.take_along_axis(source.importance, indices, axis=1)  # (S, k)
    weights = weights_from_scale(q_at, n, k, source.pi_scale[:, slot.epoch], beta)
    return QuerySets(indices, np.ascontiguousarray(values.transpose(0, 2, 1)), weights)


class ShardSet:
    """One split of a shard set: snapshots by index, whole shards by index, query sets by epoch.

    ``layer``: which layers of adaptive sets the train split reads (pipeline/layers.py):
    ``"latest"`` the set's only chain of layers (none behind a URL), None none, or a layer id
    (or a prefix of 8+ characters) and the layers below it."""

    def __init__(
        self,
        location: str,
        split: str = "train",
        format: Literal["auto", "zarr", "wds"] = "auto",
        remote: RemoteConfig | None = None,
        layer: str | None = "latest",
    ):
        self.location = str(location).rstrip("/")
        self.remote = remote or RemoteConfig()  # timeouts and retries of remote reads
        self.manifest = read_manifest(self.location, self.remote)
        splits = self.manifest.splits
        if split not in splits:
            raise ShardError(
                f"{self.location}: no split '{split}'; the manifest has {sorted(splits)}"
            )
        available = self.manifest.formats
        if format == "auto":
            format = "zarr" if "zarr" in available else "wds"
        if format not in available:
            raise ShardError(f"{self.location}: no '{format}' shards; the manifest has {available}")
        self.split, self.format = split, format
        self.shards: list[ShardEntry] = splits[split].shards
        self.steps = splits[split].snapshots_per_trajectory  # snapshots per trajectory
        self.grid = tuple(self.manifest.data.grid)
        self.k_per_epoch: list[int] = self.manifest.k_per_epoch
        self.slots = query_slots(self.manifest.num_points, self.k_per_epoch)  # one per epoch
        self.beta = self.manifest.sampler_beta
        self._reader = FORMATS[format].reader(
            self.location, split, self.manifest.stored(split), remote=self.remote
        )
        self._cached: tuple[int, ShardBlock] | None = None
        # layers replace the train split's sets: other splits never read (or resolve) them
        chosen = layer if split == "train" else None
        records = layer_chain(self.location, self.manifest, chosen, self.remote)
        self.layers: list[LayerReader] = [self._layer_reader(r) for r in records]
        self._awaiting: set[int] = set()  # first epochs of layers still to come
        self._layer_error: BaseException | None = None
        self._layer_added = threading.Condition()

    # -- layers of adaptive query sets
    @property
    def layer_ids(self) -> list[str]:
        """The chain of layers read, oldest first."""
        return [layer.record.id for layer in self.layers]

    def _layer_reader(self, record) -> LayerReader:
        return LayerReader(self.location, record, self.manifest, self.format, self.remote)

    def use_layers(self, chain: list[str]) -> None:
        """Read exactly the layers ``chain`` (ids, oldest first; each layered on the one before)."""
        records = layer_chain(self.location, self.manifest, chain[-1], self.remote) if chain else []
        found = [r.id for r in records]
        if found != list(chain):
            raise ShardError(
                f"{self.location}: the layers below {chain[-1][:12]} are "
                f"{[i[:12] for i in found]}, not the chain {[i[:12] for i in chain]}"
            )
        with self._layer_added:
            self.layers = [self._layer_reader(r) for r in records]

    def await_layers(self, first_epochs: list[int]) -> None:
        """Epochs from each of ``first_epochs`` on get their sets from a layer still to come:
        their readers wait for it (:meth:`add_layer`)."""
        with self._layer_added:
            self._awaiting = set(first_epochs)

    @property
    def awaiting(self) -> list[int]:
        return sorted(self._awaiting)

    def add_layer(self, layer_id: str) -> None:
        """Extend the chain by layer ``layer_id``, layered on the current tip; wakes the readers
        waiting for epochs it covers."""
        try:
            record = read_layer_record(self.location, layer_id, self.manifest, self.remote)
            tip = self.layers[-1].record.id if self.layers else None
            if record.parent != tip:
                raise ShardError(
                    f"{layer_location(self.location, layer_id)}: layered on "
                    f"{str(record.parent)[:12]}, but this chain ends at {str(tip)[:12]}"
                )
            reader = self._layer_reader(record)
        except BaseException as err:
            with self._layer_added:
                self._layer_error = err
                self._layer_added.notify_all()
            raise
        with self._layer_added:
            self.layers.append(reader)
            self._awaiting.discard(record.epochs[0])
            self._layer_added.notify_all()

    def pending(self, epoch: int) -> bool:
        """True while ``epoch``'s sets come from a layer still to be added."""
        with self._layer_added:  # the set changes in the thread that adds layers
            return any(first <= epoch for first in self._awaiting)

    def wait_for_layer(self, epoch: int, stopped: threading.Event) -> None:
        """Block until ``epoch`` is no longer :meth:`pending` (or ``stopped`` is set)."""
        with self._layer_added:
            while self.pending(epoch) and not stopped.is_set():
                if self._layer_error is not None:
                    raise ShardError(f"adding a layer of adaptive sets: {self._layer_error}")
                self._layer_added.wait(timeout=0.5)

    def layer_of(self, stored: int) -> LayerReader | None:
        """The newest layer covering stored epoch ``stored``, or None: the set's own sets."""
        for layer in reversed(self.layers):
            if layer.record.covers(stored):
                return layer
        return None

    def read_layer(self, layer: LayerReader, index: int) -> LayerBlock:
        """Shard ``index``'s records in ``layer``, checked against the shard's snapshot ids."""
        shard = self.shards[index]
        return layer.read(shard, trajectory_ids(shard.trajectories, self.steps))

    def epoch_queries(
        self,
        block: ShardBlock | SnapshotBlock,
        index: int,
        epoch: int,
        wrap: bool,
        sets: LayerBlock | None,
        codes: np.ndarray | None = None,
    ) -> QuerySets:
        """Shard ``index``'s (``block``'s) query sets of ``epoch``: from ``sets``, the shard's
        block of the epoch's layer (:meth:`layer_of`), where it has one; else from ``codes``
        (:meth:`read_codes`), or from the block itself when it holds every epoch's."""
        stored, k = self.k_for_epoch(epoch, wrap)
        layer = self.layer_of(stored)
        slot = self.slots[stored] if layer is None else layer.record.slot(stored)
        where = f"{self.location}: shard {index} of '{self.split}', epoch {epoch}"
        if layer is not None:
            where += f" (layer {layer.record.id[:12]})"
            if sets is None:
                raise ValueError(f"{where}: the epoch's sets are in a layer; pass its block")
            codes = sets.queries[:, slot.rows]
        elif codes is None:
            if not isinstance(block, ShardBlock):
                raise ValueError(f"{where}: a block without query sets needs read_codes' codes")
            codes = block.queries[:, slot.rows]
        return gather_queries(block, codes, slot, k, self.beta, where, sets)

    @property
    def sets_apart(self) -> bool:
        """True where an epoch's coded query sets are read on their own (zarr chunks them apart),
        so that a stream reads :meth:`read_block` once and :meth:`read_codes` each epoch; False
        where a shard's file is read whole anyway (a tar) and its block carries every epoch's."""
        return self._reader.sets_apart

    def read_block(self, index: int) -> ShardBlock | SnapshotBlock:
        """What a stream keeps of shard ``index``: its SnapshotBlock where :attr:`sets_apart`,
        else its whole ShardBlock; checked as :meth:`read_shard`'s (not cached)."""
        if self.sets_apart:
            return self._read(index, SnapshotBlock)
        return self._read(index, ShardBlock)

    def read_codes(self, index: int, stored: int) -> np.ndarray:
        """Shard ``index``'s coded query sets of stored epoch ``stored`` in the set's own sets:
        (S, slot bytes) uint8, read from the chunks holding that slot only (zarr)."""
        shard, slot = self.shards[index], self.slots[stored]
        if slot.nbytes == 0:  # a dense epoch stores no set
            return np.zeros((shard.count, 0), dtype=np.uint8)
        codes = self._reader.read_columns(shard, "queries", slot.rows)
        if codes.shape != (shard.count, slot.nbytes):
            raise ShardError(
                f"{self.location}: shard {index} of '{self.split}': query sets of epoch {stored} "
                f"read as {codes.shape}, expected {(shard.count, slot.nbytes)}"
            )
        return codes

    @property
    def sample_set_id(self) -> str:
        return self.manifest.sample_set_id

    @property
    def manifest_id(self) -> str:
        """The set's identity (:attr:`Manifest.identity`), recorded by every run trained on it."""
        return self.manifest.identity

    @property
    def epochs(self) -> int:
        return len(self.k_per_epoch)

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def k_for_epoch(self, epoch: int, wrap: bool = False) -> tuple[int, int]:
        """(query-set index, k) for a training epoch; epochs beyond the precomputed sets need ``wrap``."""
        if epoch >= self.epochs and not wrap:
            raise ShardError(
                f"{self.location}: epoch {epoch} is beyond the {self.epochs} precomputed query sets; "
                "rebuild with more epochs or set wrap_epochs=true to reuse them cyclically"
            )
        stored = epoch % self.epochs
        return stored, self.k_per_epoch[stored]

    def read_shard(self, index: int, cache: bool = True) -> ShardBlock:
        """All snapshots of shard ``index`` of this split, checked against the manifest.

        ``cache`` keeps the last block for repeated ``snapshot``/``query_set`` calls; streaming
        readers pass False (and may then read from several threads).
        """
        if cache and self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        block = self._read(index, ShardBlock)
        if cache:
            self._cached = (index, block)
        return block

    def read_fields(self, index: int) -> SnapshotFields:
        """Shard ``index``'s ids, fields and latent, checked as :meth:`read_shard`'s block: what
        a refresh's error needs, without the query sets of every epoch (not cached)."""
        return self._read(index, SnapshotFields)

    def _read(self, index: int, record: type[R]) -> R:
        shard = self.shards[index]
        block = self._reader.read(shard, record)
        assert isinstance(block, record)  # what the reader was asked for
        if len(block) != shard.count:
            raise ShardError(
                f"{self.location}: shard {index} of '{self.split}' holds {len(block)} snapshots, manifest says {shard.count}"
            )
        self._check_ids(index, shard, block)
        return block

    def _check_ids(
        self, index: int, shard: ShardEntry, block: ShardBlock | SnapshotBlock | SnapshotFields
    ) -> None:
        """A shard must hold the snapshots the manifest says, in order: a listed, checksummed file
        copied over another shard's (or a manifest pointing at the wrong one) is refused here."""
        expected = trajectory_ids(shard.trajectories, self.steps)
        if not all(np.array_equal(getattr(block, name), ids) for name, ids in expected.items()):
            raise ShardError(
                f"{self.location}: shard {index} of '{self.split}' holds other snapshots than the "
                f"manifest says (trajectories {sorted(set(block.trajectory.tolist()))[:8]}, "
                f"expected {shard.trajectories[:8]}); a shard file was replaced"
            )

    def locate(self, i: int) -> tuple[int, int]:
        """(shard index, row within the shard) of snapshot ``i`` of this split."""
        if not 0 <= i < len(self):
            raise IndexError(f"snapshot {i} out of range [0, {len(self)}) in split '{self.split}'")
        for index, shard in enumerate(self.shards):
            if i < shard.start + shard.count:
                return index, i - shard.start
        raise AssertionError("unreachable")

    def snapshot(self, i: int) -> dict[str, Any]:
        """Snapshot ``i`` of this split: ids and arrays (fields in physical units, latent if any)."""
        index, row = self.locate(i)
        block = self.read_shard(index)
        return {
            name: (value[row].item() if value.ndim == 1 else value[row])
            for name, value in block.arrays().items()
        }

    def query_set(self, i: int, epoch: int, wrap: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(flat C-order indices, weights) of snapshot ``i`` in ``epoch``, from the newest layer
        covering the epoch, else the set's own; uniform sampling gives 1.0."""
        stored, _ = self.k_for_epoch(epoch, wrap)
        index, row = self.locate(i)
        layer = self.layer_of(stored)
        sets = None if layer is None else self.read_layer(layer, index).select(slice(row, row + 1))
        block = self.read_shard(index).select(slice(row, row + 1))
        queries = self.epoch_queries(block, index, epoch, wrap, sets)
        return queries.indices[0], queries.weights[0]

    def trajectories(self, limit: int | None = None) -> Iterator[np.ndarray]:
        """Whole trajectories of this split, each (T, C, *grid) in physical units, in stored order."""
        produced = 0
        for index in range(len(self.shards)):
            block = self.read_shard(index)
            for first in range(0, len(block), self.steps):
                if limit is not None and produced >= limit:
                    return
                yield block.fields[first : first + self.steps]
                produced += 1

    def verify(self) -> list[str]:
        """Read every file of the set (all splits) and of its layers read, and return a message
        per problem found."""
        listed = [(self.location, self.manifest.files)]
        listed += [(layer.location, layer.record.files) for layer in self.layers]
        problems = []
        for location, files in listed:
            for name in sorted(files):
                try:
                    read_listed(files, location, name, self.remote)
                except ShardError as err:
                    problems.append(str(err))
        return problems


def open_shards(
    location: str,
    split: str = "train",
    format: Literal["auto", "zarr", "wds"] = "auto",
    remote: RemoteConfig | None = None,
    layer: str | None = "latest",
) -> ShardSet:
    """Open one split of a finished shard set at a local path or URL; ``remote``: timeouts
    and retries of remote reads (None: the defaults); ``layer``: which layers of adaptive sets
    (:class:`ShardSet`)."""
    return ShardSet(str(location), split, format, remote, layer)
