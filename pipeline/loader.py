"""The streaming loader: a torchdata.nodes graph from a shard set to SparseBatch.

    ShardStream (owns the order; reads shards ahead and keeps them in a RAM cache; decodes each
                 shard's query sets of the epoch; pairs/windows; seeded shuffle buffer)
      -> Batcher
      -> ParallelMapper(Collate)   cuts the batch's windows out of the prepared arrays -> SparseBatch
      -> Prefetcher -> Loader
      -> batches on the training device

By default (``process``) this graph runs in a child process and hands its batches over through
a ring of shared, pinned slots, one transfer to the GPU per batch (pipeline/loader_process.py):
the loader's Python then never competes with the training step for the interpreter lock. With
``process: false`` it runs in threads of the training process, building batches in pinned
memory where CUDA is.

Order. An epoch's examples are (shard, example-in-shard) pairs: a global permutation of the
split's shards from (seed, epoch), each shard's examples in place. That global stream is cut
into ``world_size`` contiguous, equal slices of floor(M / world_size) examples (the remainder of
M is dropped: every rank sees the same number of examples, so DDP never hangs). A rank's slice
is read in groups of ``shuffle_shards`` shard segments whose examples are permuted from
(seed, epoch, rank, group): the shuffle buffer. Workers collate whole batches, in
order, so the batches do not depend on the number of workers. Decoded shards stay in a bounded
RAM cache (``cache_mb``), so a split that fits is read and verified once, not every epoch.
A shard's query sets of an epoch are decoded, gathered and normalised in one vectorised pass
over the shard (``gather_queries``, ``Collate.prepare``), in threads ahead of the stream, so each
snapshot is prepared once per epoch and the collate only cuts batches out of prepared arrays.

The loader's state is (epoch, batches delivered): resuming seeks to that example, re-reads one
group and skips within it; it never replays the epoch, and the state does not depend on the
number of workers or the prefetch depth.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torchdata.nodes import BaseNode, Batcher, Loader, Mapper, ParallelMapper, Prefetcher

from pipeline.collate import Collate, SparseBatch
from pipeline.loader_process import LoaderProcess
from pipeline.records import ShardBlock, ShardError
from pipeline.shards import ShardSet, gather_queries
from ups.config import check

_ORDER_STREAM, _SHUFFLE_STREAM = 1, 2


@dataclass
class LoaderConfig:
    seed: int = 0  # data order (shard permutation, shuffle buffer); independent of the model seed
    workers: int = 2  # threads collating whole batches from the prepared arrays; 0 = inline
    prefetch: int = 4  # batches prepared ahead
    shuffle_shards: int = 4  # shard segments mixed by the shuffle buffer
    read_threads: int = 4  # shards read (decompressed, verified) and query sets decoded in parallel
    read_ahead: int = 2  # groups of shards read ahead of the one streaming
    cache_mb: int = 2048  # decoded shards kept in RAM for later epochs (0: read every epoch)
    format: Literal["auto", "zarr", "wds"] = "auto"
    wrap_epochs: bool = False  # reuse the precomputed query sets cyclically beyond their epochs
    process: bool = True  # run the graph in a child process (pipeline/loader_process.py)

    def __post_init__(self) -> None:
        check(self.workers >= 0, "loader.workers", "an integer >= 0", self.workers)
        check(self.read_threads >= 1, "loader.read_threads", "an integer >= 1", self.read_threads)
        check(self.read_ahead >= 0, "loader.read_ahead", "an integer >= 0", self.read_ahead)
        check(self.cache_mb >= 0, "loader.cache_mb", "an integer >= 0", self.cache_mb)
        check(self.prefetch >= 1, "loader.prefetch", "an integer >= 1", self.prefetch)
        check(
            self.shuffle_shards >= 1,
            "loader.shuffle_shards",
            "an integer >= 1",
            self.shuffle_shards,
        )


def _rng(*key: int) -> np.random.Generator:
    """A generator keyed by integers only (no global state)."""
    return np.random.default_rng(np.random.SeedSequence(list(key)))


class ShardStream(BaseNode[dict]):
    """Source node: yields the examples of this rank's slice of every epoch, in a seeded order.

    An example is a window of ``window + 1`` consecutive snapshots of one trajectory (window 0:
    single snapshots for the codec; 1: pairs (u_t, u_{t+1}); h: rollout windows). Each epoch
    yields the first ``per_epoch`` examples of its shuffled slice (whole batches), then
    the stream runs on into the next epoch without a pause: shard reads run ahead across the
    epoch boundary. It ends before the first epoch that has no query sets.
    """

    def __init__(
        self,
        shards: ShardSet,
        cfg: LoaderConfig,
        window: int,
        rank: int,
        world_size: int,
        batch_size: int,
        collate: Collate,
    ):
        super().__init__()
        steps = shards.manifest["splits"][shards.split]["snapshots_per_trajectory"]
        if window >= steps:
            raise ShardError(
                f"{shards.location}: windows of {window + 1} snapshots need trajectories of at least {window + 1}; these have {steps}"
            )
        self.shards, self.window, self.rank, self.world_size = shards, window, rank, world_size
        self.collate = collate  # prepares each shard's arrays for an epoch
        self.seed, self.shuffle_shards, self.wrap_epochs = (
            cfg.seed,
            cfg.shuffle_shards,
            cfg.wrap_epochs,
        )
        self.steps = steps
        self.per_trajectory = steps - window  # examples per trajectory
        self.examples_per_shard = [s["count"] // steps * self.per_trajectory for s in shards.shards]
        self.per_rank = sum(self.examples_per_shard) // world_size
        self.per_epoch = self.per_rank // batch_size * batch_size
        self._start = (0, 0)
        self.read_ahead = cfg.read_ahead
        self._pool = ThreadPoolExecutor(max_workers=cfg.read_threads)  # shard reads, ahead of use
        self._decode = ThreadPoolExecutor(max_workers=cfg.read_threads)  # query sets, after reads
        self._ahead: dict[tuple[int, int], list[tuple[Future, Future]]] = {}  # (read, decoded)
        self._cache: OrderedDict[int, ShardBlock] = OrderedDict()  # shard -> block, LRU
        self._cache_bytes, self._cache_limit = 0, cfg.cache_mb * 2**20
        self._reading: dict[int, Future] = {}  # shard -> read in flight
        self._plans: dict[int, list[list[tuple[int, int, int]]]] = {}

    def has_epoch(self, epoch: int) -> bool:
        return self.wrap_epochs or epoch < self.shards.epochs

    # -- the plan of an epoch: which (shard, example range) segments, in which groups
    def _groups(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        if epoch not in self._plans:
            order = _rng(self.seed, epoch, _ORDER_STREAM).permutation(len(self.shards.shards))
            lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
            segments, offset = [], 0
            for shard in order.tolist():
                n = self.examples_per_shard[shard]
                start, stop = max(lo, offset), min(hi, offset + n)
                if start < stop:
                    segments.append((shard, start - offset, stop - offset))
                offset += n
            self._plans = {e: g for e, g in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = [
                segments[i : i + self.shuffle_shards]
                for i in range(0, len(segments), self.shuffle_shards)
            ]
        return self._plans[epoch]

    def _upcoming(self, epoch: int, group: int) -> list[tuple[int, int]]:
        """(epoch, group) of this group and the ``read_ahead`` after it, across epochs."""
        keys = []
        while len(keys) <= self.read_ahead and self.has_epoch(epoch):
            if group < len(self._groups(epoch)):
                keys.append((epoch, group))
                group += 1
            else:
                epoch, group = epoch + 1, 0
        return keys

    def _blocks(self, epoch: int, group: int) -> list[tuple[ShardBlock, dict[str, np.ndarray]]]:
        """The group's shard blocks with their arrays prepared for ``epoch``. Its shards are read
        and prepared in parallel, and the next ``read_ahead`` groups (of this epoch or the next)
        are already in flight while this one streams."""
        wanted = self._upcoming(epoch, group)
        self._ahead = {key: f for key, f in self._ahead.items() if key in wanted}
        for e, g in wanted:
            if (e, g) not in self._ahead:
                self._ahead[(e, g)] = [
                    self._prepare(shard, e) for shard, _, _ in self._groups(e)[g]
                ]
        pending = {id(read) for futures in self._ahead.values() for read, _ in futures}
        self._reading = {s: f for s, f in self._reading.items() if id(f) in pending}
        prepared = [decoded.result() for _, decoded in self._ahead.pop((epoch, group))]
        for (shard, _, _), (block, _) in zip(self._groups(epoch)[group], prepared, strict=True):
            self._remember(shard, block)
        return prepared

    def _prepare(self, shard: int, epoch: int) -> tuple[Future, Future]:
        """Futures of the shard's block and of (block, its arrays prepared for ``epoch``)."""
        read = self._read(shard)
        return read, self._decode.submit(self._decoded, read, shard, epoch)

    def _decoded(
        self, read: Future, shard: int, epoch: int
    ) -> tuple[ShardBlock, dict[str, np.ndarray]]:
        """(block, its arrays for ``epoch``): the epoch's query sets decoded and gathered, then
        the collate's per-shard preparation. Runs in the ``_decode`` threads."""
        block, queries = read.result(), None
        if self.collate.sparse_steps:
            stored, k = self.shards.k_for_epoch(epoch, self.wrap_epochs)
            where = f"{self.shards.location}: shard {shard} of '{self.shards.split}', epoch {epoch}"
            queries = gather_queries(block, stored, k, self.shards.beta, where)
        return block, self.collate.prepare(block, queries)

    def _read(self, shard: int) -> Future:
        """A future of the shard's block: from the cache, a read in flight, or a new read."""
        if shard in self._cache:
            self._cache.move_to_end(shard)
            done: Future = Future()
            done.set_result(self._cache[shard])
            return done
        if shard not in self._reading:
            self._reading[shard] = self._pool.submit(self.shards.read_shard, shard, cache=False)
        return self._reading[shard]

    def _remember(self, shard: int, block: ShardBlock) -> None:
        """Keep decoded blocks (least recently used out first) within ``cache_mb``."""
        if shard in self._cache or block.nbytes > self._cache_limit:
            return
        self._cache[shard] = block
        self._cache_bytes += block.nbytes
        while self._cache_bytes > self._cache_limit:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes

    def _load_group(self) -> None:
        """Read this group's shard segments, join their prepared arrays and fix the shuffled order.

        Joined, the group's arrays let the collate cut a batch with one copy per array instead of
        one per shard and array: each copy is a point where the loader threads and the training
        step hand the interpreter lock to each other."""
        group = self._groups(self.epoch)[self._group]
        prepared = [arrays for _, arrays in self._blocks(self.epoch, self._group)]
        joined = prepared[0]
        if len(prepared) > 1:
            joined = {name: np.concatenate([a[name] for a in prepared]) for name in joined}
        offsets = np.cumsum([0] + [len(a["snapshot_id"]) for a in prepared[:-1]])  # in joined
        self._examples = []
        for (_, start, stop), offset in zip(group, offsets.tolist(), strict=True):
            for e in range(start, stop):
                first = offset + (e // self.per_trajectory) * self.steps + e % self.per_trajectory
                self._examples.append({"arrays": joined, "row": first, "epoch": self.epoch})
        self._order = _rng(
            self.seed, self.epoch, self.rank, self._group, _SHUFFLE_STREAM
        ).permutation(len(self._examples))

    def start(self, epoch: int, skip: int) -> None:
        """Where the next reset(None) begins: ``skip`` examples into ``epoch`` (no replay)."""
        self.shards.k_for_epoch(epoch, self.wrap_epochs)  # epochs beyond the query sets fail here
        self._start = (epoch, skip)

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        state = initial_state or {"epoch": self._start[0], "skip": self._start[1]}
        self.epoch, self._emitted = state["epoch"], state["skip"]
        # seek to the example ``skip`` positions into this rank's slice of the epoch
        skip, self._group = state["skip"], 0
        groups = self._groups(self.epoch)
        while self._group < len(groups):
            size = sum(stop - start for _, start, stop in groups[self._group])
            if skip < size:
                break
            skip, self._group = skip - size, self._group + 1
        self._examples, self._order, self._offset = [], np.zeros(0, dtype=np.int64), skip
        if self._group < len(groups):
            self._load_group()

    def next(self) -> dict:
        if self._emitted >= self.per_epoch:  # on into the next epoch
            if not self.has_epoch(self.epoch + 1):
                raise StopIteration
            self.epoch, self._group, self._offset, self._emitted = self.epoch + 1, 0, 0, 0
            self._load_group()
        while self._offset >= len(self._order):  # on into the next group
            self._group, self._offset = self._group + 1, 0
            self._load_group()
        example = self._examples[self._order[self._offset]]
        self._offset += 1
        self._emitted += 1
        return example

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "skip": self._emitted}


class ShardLoader:
    """A ``torchdata.nodes.Loader`` over a shard set plus what the training loop needs to know.

    Batches arrive on ``device`` (``None``: on the CPU, as the collate made them)."""

    def __init__(
        self,
        shards: ShardSet,
        cfg: LoaderConfig,
        batch_size: int,
        window: int,
        sparse_steps: tuple[int, ...],
        dense_steps: tuple[int, ...],
        latents: bool,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ):
        if latents and shards.manifest["latent"] is None:
            raise ShardError(
                f"{shards.location}: field-only shards (built with encoder: null) hold no latents"
            )
        self.device = None if device is None else torch.device(device)
        self.cfg = cfg
        # (batch_size, window, ..., world_size): the arguments a loader process rebuilds this with
        self._plan = (batch_size, window, sparse_steps, dense_steps, latents, rank, world_size)
        pin = self.device is not None and self.device.type == "cuda" and not cfg.process
        collate = Collate.for_shards(shards, window, sparse_steps, dense_steps, latents, pin)
        self.source = ShardStream(shards, cfg, window, rank, world_size, batch_size, collate)
        self.batches_per_epoch = self.source.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise ShardError(
                f"batch_size {batch_size} is larger than a rank's slice of {self.source.per_rank} examples "
                f"({shards.location}, split '{shards.split}', world size {world_size})"
            )
        node: BaseNode = Batcher(self.source, batch_size, drop_last=True)
        if cfg.workers > 0:
            node = ParallelMapper(node, collate, num_workers=cfg.workers, in_order=True)
        else:
            node = Mapper(node, collate)
        node = Prefetcher(node, cfg.prefetch)
        self.loader: Loader[SparseBatch] = Loader(node)
        self.batch_size = batch_size
        self.epoch, self._batches = 0, 0  # position: batches delivered in ``epoch``
        self._stream: Iterator[SparseBatch] | None = None  # one pass over all epochs
        self._process: LoaderProcess | None = None

    def __iter__(self) -> Iterator[SparseBatch]:
        """One epoch (the rest of it, after a resume) of batches.

        The graph runs on across epochs (the next epoch's shards are read while this one
        trains), so only the first epoch, and the first after ``load_state_dict``, starts cold.
        """
        if self._batches >= self.batches_per_epoch:
            self.epoch, self._batches = self.epoch + 1, 0
        if self._stream is None:
            self._stream = self.batches_from(self.epoch, self._batches * self.batch_size)
        else:
            self.source.shards.k_for_epoch(self.epoch, self.source.wrap_epochs)  # clear error
        while self._batches < self.batches_per_epoch:
            batch = next(self._stream)
            assert batch.epoch == self.epoch, (batch.epoch, self.epoch)
            self._batches += 1
            yield batch

    def batches_from(self, epoch: int, skip: int) -> Iterator[SparseBatch]:
        """The stream of batches on ``device``, from ``skip`` examples into ``epoch``, on across
        epochs until the query sets end. A loader process serves this same stream. Stops the
        stream opened before, if any."""
        self.close()
        if self.cfg.process:
            shards = self.source.shards
            self._process = LoaderProcess(
                shards.location, shards.split, self.cfg, self._plan, (epoch, skip), self.device
            )
            return self._process
        self.source.start(epoch, skip)
        if self.device is None:
            return iter(self.loader)
        return (batch.to(self.device, non_blocking=True) for batch in self.loader)

    def close(self) -> None:
        """Stop the loader process, or the graph's background threads (torchdata stops them only
        on garbage collection)."""
        if self._process is not None:
            self._process.close()
            self._process = None
        node = self.loader.root
        while node is not None:
            it = getattr(node, "_it", None)
            while it is not None:
                if hasattr(it, "_shutdown"):
                    it._shutdown()
                it = getattr(it, "_it", None)
            node = getattr(node, "source", None)

    def state_dict(self) -> dict[str, Any]:
        """Position after the last delivered batch; independent of workers and prefetch depth."""
        return {
            "epoch": self.epoch,
            "batches": self._batches,
            "batches_per_epoch": self.batches_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["batches_per_epoch"] != self.batches_per_epoch:
            raise ShardError(
                f"loader state has {state['batches_per_epoch']} batches per epoch, this loader "
                f"{self.batches_per_epoch}: resume with the same batch_size and world size"
            )
        self.epoch, self._batches = state["epoch"], state["batches"]
        self.close()
        self._stream = None  # restart the graph there
