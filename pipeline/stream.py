"""The loader's source node: which examples a rank streams, in which order, read ahead.

Order. An epoch's examples are (shard, example-in-shard) pairs: a global permutation of the
split's shards from (seed, epoch), each shard's examples in place. That global stream is cut
into ``partitions`` contiguous, equal slices of floor(M / partitions) examples (the remainder is
dropped). A partition is read in groups of ``shuffle_shards`` shard segments whose examples are
permuted from (seed, epoch, partition, group): the shuffle buffer. Global batch b takes the b-th
run of batch_size / partitions examples of every partition, partition by partition. A rank of
``world_size`` streams partitions_per_rank = partitions / world_size neighbouring partitions,
so it reads only their shards, and its batch b is its partitions' share of global batch b. The
sequence of global batches therefore depends on the seed, the batch size and the number of
partitions, not on the number of ranks: a checkpoint resumes on any world size that divides
``partitions`` (as MosaicML Streaming's canonical nodes do).

Decoded shards stay in a bounded RAM cache (``cache_mb``), so a split that fits is read and
verified once, not every epoch. Where the format stores each epoch's query sets in chunks of
their own (zarr), the cache holds shards without them and an epoch reads only its own sets:
those of all epochs are most of a shard's bytes. A shard's query sets of an epoch are decoded,
gathered and normalised in one vectorised pass over the shard (``gather_queries``,
``Collate.prepare``), in threads ahead of the stream, so each snapshot is prepared once per
epoch and the collate only cuts batches out of prepared arrays.

The state is (epoch, examples emitted): resuming seeks every partition to its place, re-reads one
group each and skips within it; it never replays the epoch (docs/design.md, section 7).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from torchdata.nodes import BaseNode

from pipeline.collate import Collate
from pipeline.config import check
from pipeline.loader_config import LoaderConfig
from pipeline.records import LayerBlock, ShardBlock, ShardError, SnapshotBlock
from pipeline.shards import ShardSet

Block = ShardBlock | SnapshotBlock | LayerBlock  # what a stream reads of a shard and keeps

_ORDER_STREAM, _SHUFFLE_STREAM = 1, 2


def _rng(*key: int) -> np.random.Generator:
    """A generator keyed by integers only (no global state)."""
    return np.random.default_rng(np.random.SeedSequence(list(key)))


class _Cursor:
    """Where one partition stands in an epoch: the group streaming, its examples in shuffled
    order, and how many of them were taken. ``examples`` is None until the group is loaded;
    ``loaded`` is the (epoch, partition, group) whose examples those are."""

    def __init__(self, partition: int):
        self.partition, self.epoch, self.group, self.offset = partition, 0, 0, 0
        self.examples: list[dict] | None = None
        self.loaded: tuple[int, int, int] | None = None
        self.order = np.zeros(0, dtype=np.int64)

    def seek(self, epoch: int, group: int, offset: int) -> None:
        self.epoch, self.group, self.offset, self.examples = epoch, group, offset, None
        self.loaded = None


class ShardStream(BaseNode[dict]):
    """Source node: yields the examples of this rank's partitions of every epoch, in a seeded
    order, batch by batch: ``batch_size / partitions`` examples of each of its partitions in
    turn, so ``Batcher(batch_size / world_size)`` cuts the rank's share of each global batch.

    An example is a window of ``window + 1`` consecutive snapshots of one trajectory (window 0:
    single snapshots for the codec; 1: pairs (u_t, u_{t+1}); h: rollout windows). Each epoch
    yields ``batches_per_epoch`` batches, then the stream runs on into the next epoch without a
    pause: shard reads run ahead across the epoch boundary. It ends before the first epoch that
    has no query sets.
    """

    def __init__(
        self,
        shards: ShardSet,
        cfg: LoaderConfig,
        collate: Collate,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
    ):
        super().__init__()
        window, steps = collate.spec.window, shards.steps
        if window >= steps:
            raise ShardError(
                f"{shards.location}: windows of {window + 1} snapshots need trajectories of at least {window + 1}; these have {steps}"
            )
        partitions = cfg.partitions
        # every rank streams whole partitions; every global batch takes as many from each
        check(
            partitions % world_size == 0,
            "loader.partitions",
            f"a multiple of the world size {world_size} (it fixes the data order: keep it for "
            "the whole run)",
            partitions,
        )
        check(
            batch_size % partitions == 0,
            "batch_size",
            f"a multiple of loader.partitions={partitions}",
            batch_size,
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
        self.examples_per_shard = [s.count // steps * self.per_trajectory for s in shards.shards]
        self.partitions = partitions
        self.per_partition = sum(self.examples_per_shard) // partitions
        self.share = batch_size // partitions  # examples of a partition in one global batch
        self.batches_per_epoch = self.per_partition // self.share
        if self.batches_per_epoch < 1:
            raise ShardError(
                f"batch_size {batch_size} takes {self.share} examples from each of "
                f"loader.partitions={partitions} partitions, which hold {self.per_partition} "
                f"examples each ({shards.location}, split '{shards.split}'): use a smaller "
                "batch_size or fewer partitions"
            )
        mine = partitions // world_size
        self._cursors = [_Cursor(p) for p in range(rank * mine, (rank + 1) * mine)]
        self.per_epoch = self.batches_per_epoch * self.share * mine  # examples of this rank
        self._start = (0, 0)
        self.read_ahead, self.read_threads = cfg.read_ahead, cfg.read_threads
        self._pool: ThreadPoolExecutor | None = None  # shard reads, ahead of use
        self._decode: ThreadPoolExecutor | None = None  # query sets, after reads
        self._stopped = threading.Event()
        # (epoch, partition, group) -> per shard (its reads, decoded)
        self._ahead: dict[tuple[int, int, int], list[tuple[list[Future], Future]]] = {}
        # (shard, layer id or None) -> its block (or layer block), least recently used first
        self._cache: OrderedDict[tuple[int, str | None], Block] = OrderedDict()
        self._cache_bytes, self._cache_limit = 0, cfg.cache_mb * 2**20
        # reads in flight: those of blocks by their cache key, those of an epoch's coded sets
        # (ShardSet.read_codes, never cached) by (shard, "codes <stored epoch>")
        self._reading: dict[tuple[int, str | None], Future] = {}
        self._layers_seen = 0  # layers in the chain at the last read-ahead
        self._plans: dict[tuple[int, int], list[list[tuple[int, int, int]]]] = {}

    def has_epoch(self, epoch: int) -> bool:
        return self.wrap_epochs or epoch < self.shards.epochs

    # -- the plan of an epoch: which (shard, example range) segments, in which groups
    def _groups(self, epoch: int, partition: int) -> list[list[tuple[int, int, int]]]:
        if (epoch, partition) not in self._plans:
            order = _rng(self.seed, epoch, _ORDER_STREAM).permutation(len(self.shards.shards))
            lo, hi = partition * self.per_partition, (partition + 1) * self.per_partition
            segments, offset = [], 0
            for shard in order.tolist():
                n = self.examples_per_shard[shard]
                start, stop = max(lo, offset), min(hi, offset + n)
                if start < stop:
                    segments.append((shard, start - offset, stop - offset))
                offset += n
            self._plans = {key: g for key, g in self._plans.items() if key[0] >= epoch - 1}
            self._plans[(epoch, partition)] = [
                segments[i : i + self.shuffle_shards]
                for i in range(0, len(segments), self.shuffle_shards)
            ]
        return self._plans[(epoch, partition)]

    def _upcoming(self, cursor: _Cursor) -> list[tuple[int, int, int]]:
        """(epoch, partition, group) of the cursor's group, unless it is loaded already, and of
        the ``read_ahead`` after it, across epochs, up to an epoch whose layer of query sets is
        still to come."""
        epoch, partition, group = cursor.epoch, cursor.partition, cursor.group
        keys: list[tuple[int, int, int]] = []
        while len(keys) <= self.read_ahead and self.has_epoch(epoch):
            if keys and self.shards.pending(epoch):
                break
            if group < len(self._groups(epoch, partition)):
                keys.append((epoch, partition, group))
                group += 1
            else:
                epoch, group = epoch + 1, 0
        return [key for key in keys if key != cursor.loaded]

    def _read_ahead(self) -> None:
        """Start reading and preparing the groups every partition of this rank streams next
        (:meth:`_upcoming`); drop those no longer wanted."""
        self._layers_seen = len(self.shards.layers)
        wanted = [key for c in self._cursors for key in self._upcoming(c)]
        self._ahead = {key: f for key, f in self._ahead.items() if key in wanted}
        for e, p, g in wanted:
            if (e, p, g) not in self._ahead:
                self._ahead[(e, p, g)] = [
                    self._prepare(shard, e) for shard, _, _ in self._groups(e, p)[g]
                ]
        pending = {
            id(read) for futures in self._ahead.values() for reads, _ in futures for read in reads
        }
        self._reading = {key: f for key, f in self._reading.items() if id(f) in pending}

    def _blocks(
        self, cursor: _Cursor
    ) -> list[tuple[ShardBlock | SnapshotBlock, dict[str, np.ndarray]]]:
        """The cursor's group's shard blocks with their arrays prepared for its epoch. Its shards
        are read and prepared in parallel, and the next ``read_ahead`` groups of every partition
        of this rank (of this epoch or the next) are already in flight while this one streams.
        An epoch whose layer is still to come waits for it here."""
        if self.collate.spec.sparse_steps and self.shards.pending(cursor.epoch):
            self.shards.wait_for_layer(cursor.epoch, self._stopped)
            if self._stopped.is_set():
                raise StopIteration
        self._read_ahead()
        prepared = []
        for reads, decoded in self._ahead.pop((cursor.epoch, cursor.partition, cursor.group)):
            prepared.append(decoded.result())
            for read in reads:
                key, block = read.result()
                self._remember(key, block)
        return [(block, arrays) for block, arrays in prepared]

    def _prepare(self, shard: int, epoch: int) -> tuple[list[Future], Future]:
        """Futures of the shard's reads (its block, and its block of the epoch's layer if the
        epoch has one, else the epoch's coded sets where they are read apart) and of (block,
        its arrays prepared for ``epoch``)."""
        reads = [self._read(shard, None)]
        if self.collate.spec.sparse_steps:
            stored, _ = self.shards.k_for_epoch(epoch, self.wrap_epochs)
            layer = self.shards.layer_of(stored)
            if layer is not None:
                reads.append(self._read(shard, layer))
            elif self.shards.sets_apart:
                reads.append(self._read_codes(shard, stored))
        assert self._decode is not None, "reset() starts the decode threads"
        return reads, self._decode.submit(self._decoded, reads, shard, epoch)

    def _decoded(
        self, reads: list[Future], shard: int, epoch: int
    ) -> tuple[ShardBlock | SnapshotBlock, dict[str, np.ndarray]]:
        """(block, its arrays for ``epoch``): the epoch's query sets decoded and gathered, then
        the collate's per-shard preparation. Runs in the ``_decode`` threads."""
        block, *rest = [read.result()[1] for read in reads]
        queries = None
        if self.collate.spec.sparse_steps:
            sets = next((r for r in rest if isinstance(r, LayerBlock)), None)
            codes = next((r for r in rest if isinstance(r, np.ndarray)), None)
            queries = self.shards.epoch_queries(block, shard, epoch, self.wrap_epochs, sets, codes)
        return block, self.collate.prepare(block, queries)

    def _read(self, shard: int, layer) -> Future:
        """A future of (cache key, the shard's block) -- or its block of ``layer`` -- from the
        cache, a read in flight, or a new read."""
        key = (shard, None if layer is None else layer.record.id)
        if key in self._cache:
            self._cache.move_to_end(key)
            done: Future = Future()
            done.set_result((key, self._cache[key]))
            return done
        if layer is None:
            return self._submit(key, lambda: self.shards.read_block(shard))
        return self._submit(key, lambda: self.shards.read_layer(layer, shard))

    def _read_codes(self, shard: int, stored: int) -> Future:
        """A future of (key, the shard's coded sets of stored epoch ``stored``): a read in
        flight, or a new one. An epoch's sets are used once (unless epochs wrap), so unlike
        blocks they are not cached."""
        return self._submit(
            (shard, f"codes {stored}"), lambda: self.shards.read_codes(shard, stored)
        )

    def _submit(
        self, key: tuple[int, str | None], read: Callable[[], Block | np.ndarray]
    ) -> Future:
        """The read in flight under ``key``, or ``read`` started in the read threads: a future of
        (key, what it returns)."""
        if key not in self._reading:
            assert self._pool is not None, "reset() starts the read threads"
            self._reading[key] = self._pool.submit(lambda: (key, read()))
        return self._reading[key]

    def _remember(self, key: tuple[int, str | None], block: Block | np.ndarray) -> None:
        """Keep decoded blocks (least recently used out first) within ``cache_mb``; an epoch's
        coded sets are not kept."""
        if isinstance(block, np.ndarray) or key in self._cache or block.nbytes > self._cache_limit:
            return
        self._cache[key] = block
        self._cache_bytes += block.nbytes
        while self._cache_bytes > self._cache_limit:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes

    def _load_group(self, cursor: _Cursor) -> list[dict]:
        """Read the cursor's group of shard segments, join their prepared arrays and fix the
        shuffled order; returns the group's examples.

        Joined, the group's arrays let the collate cut a batch with one copy per array instead of
        one per shard and array: each copy is a point where the loader threads and the training
        step hand the interpreter lock to each other."""
        group = self._groups(cursor.epoch, cursor.partition)[cursor.group]
        prepared = [arrays for _, arrays in self._blocks(cursor)]
        joined = prepared[0]
        if len(prepared) > 1:
            joined = {name: np.concatenate([a[name] for a in prepared]) for name in joined}
        offsets = np.cumsum([0] + [len(a["snapshot_id"]) for a in prepared[:-1]])  # in joined
        examples = []
        for (_, start, stop), offset in zip(group, offsets.tolist(), strict=True):
            for e in range(start, stop):
                first = offset + (e // self.per_trajectory) * self.steps + e % self.per_trajectory
                examples.append({"arrays": joined, "row": first, "epoch": cursor.epoch})
        cursor.examples, cursor.loaded = examples, (cursor.epoch, cursor.partition, cursor.group)
        cursor.order = _rng(
            self.seed, cursor.epoch, cursor.partition, cursor.group, _SHUFFLE_STREAM
        ).permutation(len(examples))
        return examples

    def _seek(self, epoch: int, emitted: int) -> None:
        """Place every cursor after this rank's first ``emitted`` examples of ``epoch``: whole
        global batches, then the shares of the batch in progress, partition by partition."""
        done, within = divmod(emitted, self.share * len(self._cursors))
        for i, cursor in enumerate(self._cursors):
            taken = done * self.share + min(self.share, max(0, within - i * self.share))
            sizes = [sum(b - a for _, a, b in g) for g in self._groups(epoch, cursor.partition)]
            group = 0
            while group < len(sizes) and taken >= sizes[group]:  # a partition done: past its end
                taken, group = taken - sizes[group], group + 1
            cursor.seek(epoch, group, taken)

    def start(self, epoch: int, skip: int) -> None:
        """Where the next reset(None) begins: ``skip`` of this rank's examples into ``epoch``
        (no replay)."""
        self.shards.k_for_epoch(epoch, self.wrap_epochs)  # epochs beyond the query sets fail here
        self._start = (epoch, skip)

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._stopped.clear()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.read_threads)
            self._decode = ThreadPoolExecutor(max_workers=self.read_threads)
        state = initial_state or {"epoch": self._start[0], "skip": self._start[1]}
        self.epoch, self._emitted = state["epoch"], state["skip"]
        if self._emitted < self.per_epoch:
            self._seek(self.epoch, self._emitted)
            # the first group is read here, in the caller's thread: an unreadable shard at the
            # start raises its own error, not the prefetch thread's wrapped one
            self._load_group(self._cursors[self._emitted // self.share % len(self._cursors)])

    def stop(self) -> None:
        """End the stream: ``next`` raises StopIteration from now on, so every node downstream
        finishes its threads the way torchdata ends any graph; reads in flight are dropped."""
        self._stopped.set()
        for pool in (self._pool, self._decode):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._decode = None
        self._ahead, self._reading = {}, {}

    def next(self) -> dict:
        if self._stopped.is_set():
            raise StopIteration
        if len(self.shards.layers) != self._layers_seen:  # a refresh's layer came: read it ahead
            self._read_ahead()
        if self._emitted >= self.per_epoch:  # on into the next epoch
            if not self.has_epoch(self.epoch + 1):
                raise StopIteration
            self.epoch, self._emitted = self.epoch + 1, 0
            for cursor in self._cursors:
                cursor.seek(self.epoch, 0, 0)
        # this rank's batches take ``share`` examples of each of its partitions in turn
        cursor = self._cursors[self._emitted // self.share % len(self._cursors)]
        examples = cursor.examples if cursor.examples is not None else self._load_group(cursor)
        while cursor.offset >= len(examples):  # on into the partition's next group
            cursor.group, cursor.offset = cursor.group + 1, 0
            examples = self._load_group(cursor)
        example = examples[cursor.order[cursor.offset]]
        cursor.offset += 1
        self._emitted += 1
        return example

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "skip": self._emitted}
