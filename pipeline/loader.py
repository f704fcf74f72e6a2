"""The streaming loader: batches of a shard set on the training device, epoch by epoch.

The graph (pipeline/graph.py) runs by default in a child process that hands its batches over
through a ring of shared, pinned slots, one transfer to the GPU per batch
(pipeline/loader_process.py): the loader's Python then never competes with the training step for
the interpreter lock. With ``process: false`` it runs in threads of the training process,
building batches in pinned memory where CUDA is. Workers collate whole batches, in order, so the
batches depend on neither the number of workers nor the mode.

The loader's state is (epoch, global batches delivered): resuming seeks there, re-reads one group
per partition and skips within it; it never replays the epoch, and the state depends on neither
the number of workers, the prefetch depth nor the number of ranks, so a run resumes on another
world size to the same global batches (docs/design.md, section 7).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from pipeline.collate import BatchSpec, SparseBatch
from pipeline.graph import BatchGraph, LoaderPlan
from pipeline.loader_config import LoaderConfig
from pipeline.loader_process import LoaderProcess
from pipeline.records import ShardError
from pipeline.shards import ShardSet
from pipeline.transfer import SideStreamCopy


class ShardLoader:
    """Epochs of batches of ``spec`` from a shard set, as one rank of ``world_size`` streams them:
    its ``batch_size / world_size`` examples of each global batch of ``batch_size``.

    Batches arrive on ``device`` (``None``: on the CPU, as the collate made them)."""

    def __init__(
        self,
        shards: ShardSet,
        cfg: LoaderConfig,
        *,
        batch_size: int,
        spec: BatchSpec,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ):
        self.device = None if device is None else torch.device(device)
        self.cfg, self.shards, self.batch_size = cfg, shards, batch_size
        self.plan = LoaderPlan(
            shards.location, shards.split, cfg, batch_size, spec, rank, world_size
        )
        self.cuda = self.device is not None and self.device.type == "cuda"
        pin = self.cuda and not cfg.process
        self.graph = BatchGraph(self.plan, shards, pin_memory=pin)  # used in threads, or sized
        self.batches_per_epoch = self.graph.batches_per_epoch
        self.epoch, self._batches = 0, 0  # position: batches delivered in ``epoch``
        self._stream: Iterator[SparseBatch] | None = None  # one pass over all epochs
        self._process: LoaderProcess | None = None
        self._stalled = 0.0  # stall_seconds resolved so far
        # CUDA events around each wait, (asked, delivered), until the GPU has passed them
        self._waits: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()

    def __iter__(self) -> Iterator[SparseBatch]:
        """One epoch (the rest of it, after a resume) of batches.

        The graph runs on across epochs (the next epoch's shards are read while this one
        trains), so only the first epoch, and the first after ``load_state_dict``, starts cold.
        """
        if self._batches >= self.batches_per_epoch:
            self.epoch, self._batches = self.epoch + 1, 0
        with self._stall():  # the loader's start, where it starts: the device may have no work
            if self._stream is None:
                self._stream = self.batches_from(self.epoch, self._batches * self.plan.rank_batch)
            else:
                self.shards.k_for_epoch(self.epoch, self.cfg.wrap_epochs)  # a clear error
        while self._batches < self.batches_per_epoch:
            if self._stream is None:  # closed while this epoch was iterated
                return
            with self._stall():
                batch = next(self._stream)
            assert batch.epoch == self.epoch, (batch.epoch, self.epoch)
            self._batches += 1
            yield batch

    def batches_from(self, epoch: int, skip: int) -> Iterator[SparseBatch]:
        """The stream of batches on ``device``, from ``skip`` examples into ``epoch``, on across
        epochs until the query sets end. Stops the stream opened before, if any."""
        self.close()
        if self.cfg.process:
            plan = dataclasses.replace(
                self.plan,
                layers=tuple(self.shards.layer_ids),
                awaiting=tuple(self.shards.awaiting),
            )
            self._process = LoaderProcess(plan, (epoch, skip), self.device)
            return self._process
        batches = self.graph.batches(epoch, skip)
        if self.device is None:
            return batches
        if self.cuda:  # pinned batches, copied beside the steps still queued on the GPU
            copy = SideStreamCopy(self.device)
            return (copy.batch(batch) for batch in batches)
        return (batch.to(self.device) for batch in batches)

    def add_layer(self, layer_id: str) -> None:
        """Read the epochs layer ``layer_id`` covers from it from now on (an adaptive refresh):
        the shard set, and the running loader process, extend their chain by it, and the epochs
        waiting for it stream on. No restart: batches already made are of earlier epochs."""
        self.shards.add_layer(layer_id)
        if self._process is not None:
            self._process.add_layer(layer_id)

    @contextlib.contextmanager
    def _stall(self) -> Iterator[None]:
        """Count what waiting in the block costs the device in stall_seconds."""
        if not self.cuda:  # the CPU's step is synchronous: all of a wait is a stall
            started = time.perf_counter()
            yield
            self._stalled += time.perf_counter() - started
            return
        stream = torch.cuda.current_stream(self.device)
        asked = torch.cuda.Event(enable_timing=True)
        asked.record(stream)  # after the work the training thread queued so far
        yield  # a batch's copy to the GPU is queued on the same stream
        delivered = torch.cuda.Event(enable_timing=True)
        delivered.record(stream)
        self._waits.append((asked, delivered))
        self._resolve_waits()

    def _resolve_waits(self) -> None:
        while self._waits and self._waits[0][1].query():  # never blocks: the GPU has passed it
            asked, delivered = self._waits.popleft()
            self._stalled += asked.elapsed_time(delivered) / 1000

    @property
    def stall_seconds(self) -> float:
        """Seconds the training device went without work because of the loader. On CUDA, the
        GPU's time between the work queued before asking for each batch and the batch's copy
        done (CUDA events, nothing synchronised): its idle time while the batch was not ready,
        and the copy. A wait while the GPU was still busy with earlier steps costs it nothing
        but the copy. On the CPU the step is synchronous, so all of every wait. Waits the GPU
        has not passed yet count once it has."""
        self._resolve_waits()
        return self._stalled

    def close(self) -> None:
        """Stop the loader process, or the graph's threads; iterating again restarts the stream
        where it stopped (after the last delivered batch)."""
        if self._process is not None:
            self._process.close()
            self._process = None
        self.graph.stop()
        self._stream = None

    def state_dict(self) -> dict[str, Any]:
        """Position after the last delivered batch; independent of workers, prefetch depth and
        world size (every rank is at the same global batch)."""
        return {
            "epoch": self.epoch,
            "batches": self._batches,
            "batches_per_epoch": self.batches_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["batches_per_epoch"] != self.batches_per_epoch:
            raise ShardError(
                f"loader state has {state['batches_per_epoch']} batches per epoch, this loader "
                f"{self.batches_per_epoch}: resume with the same batch_size and loader.partitions"
            )
        self.epoch, self._batches = state["epoch"], state["batches"]
        self.close()
        self._stream = None  # restart the graph there


__all__ = ["BatchSpec", "LoaderConfig", "ShardLoader"]
