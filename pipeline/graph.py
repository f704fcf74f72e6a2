"""The loader's torchdata graph, built the same way in the training process (threads) and in a
loader process (pipeline/loader_process.py)::

    ShardStream (order, read-ahead, RAM cache, query sets decoded per shard, shuffle buffer)
      -> Batcher
      -> ParallelMapper(Collate)   cuts the batch's windows out of the prepared arrays -> SparseBatch
      -> Prefetcher -> Loader

:class:`LoaderPlan` is everything that decides a rank's sequence of batches except where in it
to start; it is what crosses to a loader process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from torchdata.nodes import BaseNode, Batcher, Loader, Mapper, ParallelMapper, Prefetcher

from pipeline.collate import BatchSpec, Collate, SparseBatch
from pipeline.loader_config import LoaderConfig
from pipeline.records import ShardError
from pipeline.shards import ShardSet, open_shards
from pipeline.stream import ShardStream


@dataclass(frozen=True)
class LoaderPlan:
    """What one rank streams: the set and split, how, in which (global) batches, as which rank."""

    location: str
    split: str
    cfg: LoaderConfig
    batch_size: int  # of a global batch, shared equally among the ranks
    spec: BatchSpec
    rank: int = 0
    world_size: int = 1
    layers: tuple[str, ...] = ()  # the chain of layers of adaptive sets read (pipeline/layers.py)
    awaiting: tuple[int, ...] = ()  # first epochs of layers still to come (ShardSet.await_layers)

    @property
    def rank_batch(self) -> int:
        """This rank's share of a global batch."""
        return self.batch_size // self.world_size


class BatchGraph:
    """The graph of one plan (over ``shards`` when already open); no thread runs until
    :meth:`batches`. ``pin_memory`` builds the batches in pinned memory."""

    def __init__(
        self, plan: LoaderPlan, shards: ShardSet | None = None, *, pin_memory: bool = False
    ):
        if shards is None:
            shards = open_shards(
                plan.location, plan.split, plan.cfg.format, remote=plan.cfg.remote, layer=None
            )
            shards.use_layers(list(plan.layers))
            shards.await_layers(list(plan.awaiting))
        if plan.spec.latents and shards.manifest.latent is None:
            raise ShardError(
                f"{shards.location}: field-only shards (built with encoder: null) hold no latents"
            )
        collate = Collate.for_shards(shards, plan.spec, pin_memory)
        self.source = ShardStream(
            shards,
            plan.cfg,
            collate,
            batch_size=plan.batch_size,
            rank=plan.rank,
            world_size=plan.world_size,
        )
        self.batches_per_epoch = self.source.batches_per_epoch
        # this rank's share of each global batch
        node: BaseNode = Batcher(self.source, plan.rank_batch, drop_last=True)
        if plan.cfg.workers > 0:
            node = ParallelMapper(node, collate, num_workers=plan.cfg.workers, in_order=True)
        else:
            node = Mapper(node, collate)
        self.loader: Loader[SparseBatch] = Loader(Prefetcher(node, plan.cfg.prefetch))
        self._running: Iterator[SparseBatch] | None = None

    def batches(self, epoch: int, skip: int) -> Iterator[SparseBatch]:
        """Batches from ``skip`` of this rank's examples into ``epoch``, on across epochs until the query sets
        end. Stops the stream started before, if any."""
        self.stop()
        self.source.start(epoch, skip)
        self._running = iter(self.loader)
        return self._running

    def stop(self) -> None:
        """Stop the graph's threads: the source ends, and the batches already in flight are
        drained, so every node finishes as at the end of any stream (torchdata stops a graph
        left running only when it is garbage collected)."""
        if self._running is None:
            return
        self.source.stop()
        with contextlib.suppress(Exception):  # an error the stream already raised ends it too
            for _ in self._running:
                pass
        self._running = None
