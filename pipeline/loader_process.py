"""The loader graph in a child process; batches handed over through a ring of shared slots.

Why a process: the loader's Python (stream, batcher, collate threads) shares the interpreter
lock with the training step, and every torch call of the step releases that lock. A loader
thread that takes it then makes the step wait to get it back, dozens of times per step
(docs/benchmarks.md, "The loader"). In a child process the same graph runs on its own
interpreter, and the training process does only this per batch: receive a slot number and the
batch's layout, copy the slot to the GPU in one transfer, cut the fields out of it.

    child:  ShardStream -> Batcher -> Collate -> copy into a free slot -> send (slot, layout)
    parent: receive -> one copy of the slot to the device, on a stream of its own
            (pipeline/transfer.py) -> field views -> SparseBatch
            the slot goes back to the child once that copy has finished (a CUDA event)

A slot is a shared-memory byte buffer. The child allocates it, and a larger one when a batch
does not fit (an epoch with more query points); the parent maps it once and, with CUDA, pins it
(``cudaHostRegister``), so the copy out of it is asynchronous. Nothing is pickled per batch but
the layout: a few names, dtypes, shapes and offsets.

Failures: what the child raises (a corrupt shard's ShardError) is raised again in the parent; a
child that dies (SIGKILL, the out-of-memory killer) is one LoaderError, a ShardError the tools
print as one line. Ctrl-C is the parent's alone, and the child leaves nothing for the resource
tracker to clean up, so no run ends with a traceback or warning of the child's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import pickle
import signal
import threading
import traceback
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch
import torch.multiprocessing  # registers the reductions that send shared tensors as handles

from pipeline.collate import SparseBatch
from pipeline.graph import BatchGraph, LoaderPlan
from pipeline.records import ShardError
from pipeline.transfer import SideStreamCopy

# (field name, dtype, shape, byte offset in the slot, bytes) per tensor field of a batch
Layout = list[tuple[str, torch.dtype, tuple[int, ...], int, int]]
_ALIGN = 64  # byte alignment of every field in a slot
_PIPE_GONE = (EOFError, BrokenPipeError, ConnectionResetError)  # the other end has closed


class _ParentGone(Exception):
    """The training process closed its end of the pipe: it closed the loader, or exited."""


def _talk(call: Any, *args: Any) -> Any:
    """``call(*args)`` on the child's end of the pipe; _ParentGone where the parent has gone, so
    that an OSError of the graph (a connection reset while reading a remote shard) is not taken
    for the parent's leaving but reported to it."""
    try:
        return call(*args)
    except _PIPE_GONE as err:
        raise _ParentGone from err


class LoaderError(ShardError, RuntimeError):
    """The loader process died (killed, out of memory) or could not send what it raised. A
    ShardError, so the tools print it as one line."""


def _portable(err: BaseException) -> BaseException:
    """``err``, or a LoaderError with its message where it would not pickle and unpickle (an
    exception whose ``__init__`` does not take its ``args``): the parent must get a message."""
    try:
        pickle.loads(ForkingPickler.dumps(err))
        return err
    except Exception:
        portable = LoaderError(f"in the loader process: {type(err).__name__}: {err}")
        portable.add_note(f"in the loader process:\n{traceback.format_exc()}")
        return portable


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:
        return "it has not exited"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        how = f"it was killed by {name} (exit code {exitcode})"
        if -exitcode == signal.SIGKILL:
            how += (
                "; if the out-of-memory killer sent it, lower loader.cache_mb, loader.prefetch "
                "or loader.read_ahead"
            )
        return how
    return f"it exited with code {exitcode}"


def batch_layout(batch: SparseBatch) -> tuple[Layout, int]:
    """Where each tensor field of ``batch`` lies in a slot, and the bytes the slot needs."""
    layout, offset = [], 0
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, torch.Tensor):
            layout.append((field.name, value.dtype, tuple(value.shape), offset, value.nbytes))
            offset += -(-value.nbytes // _ALIGN) * _ALIGN
    return layout, offset


def _add_layers(graph: BatchGraph, layers: Connection) -> None:
    """Thread of the child: extend the graph's chain of layers by each id the parent sends (an
    adaptive refresh), until the parent closes the pipe. A layer that cannot be added is raised
    by the reader waiting for it (ShardSet.wait_for_layer)."""
    with contextlib.suppress(*_PIPE_GONE, OSError):
        while True:
            layer_id = layers.recv()
            with contextlib.suppress(Exception):
                graph.source.shards.add_layer(layer_id)
    # The parent is gone (it closed the loader, or was killed mid-refresh): no layer comes any
    # more, so stop the stream, or a reader waiting for one keeps this process alive for ever,
    # an orphan. The main thread's iteration then ends, and it finds the parent gone. Stopped
    # again until the main thread ends: a stream still starting clears the stop (its reset).
    main = threading.main_thread()
    while main.is_alive():
        graph.source.stop()
        main.join(timeout=1)


def serve_batches(
    plan: LoaderPlan, start: tuple[int, int], conn: Connection, layers: Connection
) -> None:
    """The child: run the plan's graph from ``start`` (epoch, examples to skip) and put its
    batches into the ring's slots. ``conn`` carries slot numbers back (a slot is free again) and
    ends with the parent (EOF); ``layers`` carries the ids of layers added while it runs."""
    torch.set_num_threads(1)  # the work is numpy; no OpenMP team spinning on the cores
    # Ctrl-C is the training process's to handle: it closes this one (or, at its exit, its
    # multiprocessing terminates it); a KeyboardInterrupt here would only print a traceback.
    # Already ignored where the parent started this process from its main thread.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # This process starts no other. With the fork method, the multiprocessing Event torchdata's
    # ParallelMapper makes even for threads is an anonymous semaphore, gone with the process, not a
    # named one the resource tracker must unlink (and warn of as leaked) when this process is
    # killed or terminated rather than left to exit.
    if "fork" in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method("fork", force=True)
    graph = None
    try:
        try:
            graph = BatchGraph(plan)
            threading.Thread(target=_add_layers, args=(graph, layers), daemon=True).start()
            slots: list[torch.Tensor | None] = [None] * plan.cfg.prefetch
            free = deque(range(plan.cfg.prefetch))
            for batch in graph.batches(*start):
                while _talk(conn.poll) or not free:  # collect the slots the parent gave back
                    free.append(_talk(conn.recv))
                slot = free.popleft()
                layout, nbytes = batch_layout(batch)
                grown = None
                buffer = slots[slot]
                if buffer is None or buffer.numel() < nbytes:
                    buffer = grown = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
                    slots[slot] = buffer
                raw = buffer.numpy()
                for name, _, _, offset, size in layout:
                    value = getattr(batch, name).numpy()
                    np.copyto(raw[offset : offset + size].view(value.dtype), value.ravel())
                _talk(conn.send, (slot, grown, batch.epoch, layout))
            _talk(conn.send, StopIteration())
        except _ParentGone:  # the parent closed the loader
            return
        except Exception as err:  # raised again in the training process, by LoaderProcess
            err.add_note(f"in the loader process:\n{traceback.format_exc()}")
            conn.send(_portable(err))
        while True:  # stay until the parent closes: it may still be fetching a slot's handle
            conn.recv()
    except _PIPE_GONE:
        return
    finally:
        if graph is not None:
            graph.stop()


class LoaderProcess:
    """Iterator of the batches a :func:`serve_batches` child makes, delivered on ``device``
    (``None``: copied out of the slots on the CPU)."""

    def __init__(self, plan: LoaderPlan, start: tuple[int, int], device: torch.device | None):
        context = torch.multiprocessing.get_context("spawn")  # never fork a CUDA process
        self._conn, child = context.Pipe()
        self._layers, child_layers = context.Pipe()
        self._process: BaseProcess | None = context.Process(
            target=serve_batches,
            args=(plan, start, child, child_layers),
            name="loader",
            daemon=True,
        )
        # Ctrl-C reaches the child too (one process group): it must not raise KeyboardInterrupt
        # there, not even while the child imports. An ignored SIGINT stays ignored across exec,
        # and Python then installs no handler of its own; the parent's is restored at once.
        # (signal's rules: only the main thread sets handlers; one set in C cannot be put back)
        main = threading.current_thread() is threading.main_thread()
        handler = signal.getsignal(signal.SIGINT) if main else None
        if handler is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self._process.start()
        finally:
            if handler is not None:
                signal.signal(signal.SIGINT, handler)
        child.close()
        child_layers.close()
        self.device = device
        self.cuda = device is not None and device.type == "cuda"
        self._copy = SideStreamCopy(device) if device is not None and self.cuda else None
        self._slots: dict[int, torch.Tensor] = {}  # slot -> its shared (and pinned) buffer
        self._copying: deque[tuple[int, torch.cuda.Event]] = deque()  # slots read by copies
        self._ring = plan.cfg.prefetch

    def __iter__(self) -> LoaderProcess:
        return self

    def __next__(self) -> SparseBatch:
        if self._process is None:  # closed
            raise StopIteration
        message = self._receive()
        if isinstance(message, BaseException):
            raise message
        slot, grown, epoch, layout = message
        if grown is not None:
            self._adopt(slot, grown)
        _, _, _, offset, size = layout[-1]
        raw = self._slots[slot][: offset + size]
        if self._copy is not None:
            raw, copied = self._copy.tensor(raw)  # one transfer, from pinned memory
            self._copying.append((slot, copied))
        else:
            raw = raw.to(self.device or "cpu", copy=True)
            with contextlib.suppress(OSError):  # a dead child: the next receive says so
                self._conn.send(slot)
        fields = {
            name: raw[offset : offset + size].view(dtype).view(shape)
            for name, dtype, shape, offset, size in layout
        }
        return SparseBatch(epoch=epoch, **fields)

    def _receive(self) -> Any:
        """The child's next message; gives back the slots whose copies have finished. A child
        that died, or a pipe that failed, is one LoaderError, within a second or two."""
        process = self._process
        assert process is not None, "receiving from a closed loader"
        problem: OSError | EOFError | None = None
        try:
            while True:
                while self._copying and self._copying[0][1].query():
                    self._conn.send(self._copying.popleft()[0])
                if len(self._copying) == self._ring:  # the child has no free slot: wait for one
                    slot, copied = self._copying.popleft()
                    copied.synchronize()
                    self._conn.send(slot)
                if self._conn.poll(1.0):
                    return self._conn.recv()
                if not process.is_alive():
                    break
        except (EOFError, OSError) as err:  # the child's end is gone; or a slot's handle failed
            problem = err
        gone = problem is None or isinstance(problem, _PIPE_GONE)
        process.join(timeout=10 if gone else 1)
        if process.exitcode is None and problem is not None:
            raise LoaderError(
                f"receiving a batch from the loader process: {type(problem).__name__}: {problem}"
            ) from problem
        raise LoaderError(
            f"the loader process ended without a word: {_how_it_ended(process.exitcode)}"
        )

    def add_layer(self, layer_id: str) -> None:
        """Tell the child to read layer ``layer_id`` from now on (ShardLoader.add_layer)."""
        with contextlib.suppress(OSError):  # a dead child: the next receive says so
            self._layers.send(layer_id)

    def _adopt(self, slot: int, buffer: torch.Tensor) -> None:
        """Take the child's new buffer for ``slot``; with CUDA pin it, so copies are async."""
        self._unpin(slot)
        if self.cuda:
            portable = 1  # cudaHostRegisterPortable: pinned for every device of the process
            error = torch.cuda.cudart().cudaHostRegister(
                buffer.data_ptr(), buffer.numel(), portable
            )
            if int(error) != 0:
                raise RuntimeError(f"pinning a loader slot of {buffer.numel()} bytes: {error}")
        self._slots[slot] = buffer

    def _unpin(self, slot: int) -> None:
        buffer = self._slots.pop(slot, None)
        if buffer is not None and self.cuda:
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())

    def close(self) -> None:
        """Stop the child and release the slots (after the copies out of them have finished)."""
        process = self._process
        if process is None:
            return
        for _, copied in self._copying:
            copied.synchronize()
        self._copying.clear()
        for slot in list(self._slots):
            self._unpin(slot)
        self._conn.close()
        self._layers.close()
        process.join(timeout=10)
        if process.is_alive():
            process.terminate()
            process.join()
        self._process = None

    def __del__(self) -> None:
        """A loader dropped without ``close``: unpin before the buffers are unmapped."""
        if getattr(self, "_process", None) is not None:
            with contextlib.suppress(Exception):  # CUDA may be gone at interpreter exit
                self.close()
