"""The loader graph in a child process; batches handed over through a ring of shared slots.

Why a process: the loader's Python (stream, batcher, collate threads) shares the interpreter
lock with the training step, and every torch call of the step releases that lock. A loader
thread that takes it then makes the step wait to get it back, dozens of times per step
(docs/benchmarks.md, "The loader"). In a child process the same graph runs on its own
interpreter, and the training process does only this per batch: receive a slot number and the
batch's layout, copy the slot to the GPU in one transfer, cut the fields out of it.

    child:  ShardStream -> Batcher -> Collate -> copy into a free slot -> send (slot, layout)
    parent: receive -> one copy of the slot to the device -> field views -> SparseBatch
            the slot goes back to the child once that copy has finished (a CUDA event)

A slot is a shared-memory byte buffer. The child allocates it, and a larger one when a batch
does not fit (an epoch with more query points); the parent maps it once and, with CUDA, pins it
(``cudaHostRegister``), so the copy out of it is asynchronous. Nothing is pickled per batch but
the layout: a few names, dtypes, shapes and offsets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
import torch.multiprocessing  # registers the reductions that send shared tensors as handles

from pipeline.collate import SparseBatch
from pipeline.graph import BatchGraph, LoaderPlan

# (field name, dtype, shape, byte offset in the slot, bytes) per tensor field of a batch
Layout = list[tuple[str, torch.dtype, tuple[int, ...], int, int]]
_ALIGN = 64  # byte alignment of every field in a slot
_PIPE_GONE = (EOFError, BrokenPipeError, ConnectionResetError)  # the other end has closed


def batch_layout(batch: SparseBatch) -> tuple[Layout, int]:
    """Where each tensor field of ``batch`` lies in a slot, and the bytes the slot needs."""
    layout, offset = [], 0
    for field in dataclasses.fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, torch.Tensor):
            layout.append((field.name, value.dtype, tuple(value.shape), offset, value.nbytes))
            offset += -(-value.nbytes // _ALIGN) * _ALIGN
    return layout, offset


def serve_batches(plan: LoaderPlan, start: tuple[int, int], conn: Connection) -> None:
    """The child: run the plan's graph from ``start`` (epoch, examples to skip) and put its
    batches into the ring's slots. ``conn`` carries slot numbers back (a slot is free again) and
    ends with the parent (EOF)."""
    torch.set_num_threads(1)  # the work is numpy; no OpenMP team spinning on the cores
    graph = None
    try:
        try:
            graph = BatchGraph(plan)
            slots: list[torch.Tensor | None] = [None] * plan.cfg.prefetch
            free = deque(range(plan.cfg.prefetch))
            for batch in graph.batches(*start):
                while conn.poll() or not free:  # collect the slots the parent gave back
                    free.append(conn.recv())
                slot = free.popleft()
                layout, nbytes = batch_layout(batch)
                grown = None
                if slots[slot] is None or slots[slot].numel() < nbytes:
                    slots[slot] = grown = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
                raw = slots[slot].numpy()
                for name, _, _, offset, size in layout:
                    value = getattr(batch, name).numpy()
                    np.copyto(raw[offset : offset + size].view(value.dtype), value.ravel())
                conn.send((slot, grown, batch.epoch, layout))
            conn.send(StopIteration())
        except _PIPE_GONE:  # the parent closed the loader
            return
        except Exception as err:  # raised again in the training process, by LoaderProcess
            err.add_note(f"in the loader process:\n{traceback.format_exc()}")
            try:
                conn.send(err)
            except Exception:  # an exception that does not pickle
                conn.send(RuntimeError(f"in the loader process: {traceback.format_exc()}"))
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
        self._process = context.Process(
            target=serve_batches,
            args=(plan, start, child),
            name="loader",
            daemon=True,
        )
        self._process.start()
        child.close()
        self.device = device
        self.cuda = device is not None and device.type == "cuda"
        self._slots: dict[int, torch.Tensor] = {}  # slot -> its shared (and pinned) buffer
        self._copying: deque[tuple[int, torch.cuda.Event]] = deque()  # slots read by copies
        self._ring = plan.cfg.prefetch

    def __iter__(self) -> LoaderProcess:
        return self

    def __next__(self) -> SparseBatch:
        message = self._receive()
        if isinstance(message, BaseException):
            raise message
        slot, grown, epoch, layout = message
        if grown is not None:
            self._adopt(slot, grown)
        _, _, _, offset, size = layout[-1]
        raw = self._slots[slot][: offset + size]
        if self.cuda:
            raw = raw.to(self.device, non_blocking=True)  # one transfer, from pinned memory
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.device))
            self._copying.append((slot, copied))
        else:
            raw = raw.to(self.device or "cpu", copy=True)
            self._conn.send(slot)
        fields = {
            name: raw[offset : offset + size].view(dtype).view(shape)
            for name, dtype, shape, offset, size in layout
        }
        return SparseBatch(epoch=epoch, **fields)

    def _receive(self) -> Any:
        """The child's next message; gives back the slots whose copies have finished."""
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
                if not self._process.is_alive():
                    break
        except (EOFError, OSError):  # the child's end of the pipe is gone
            pass
        self._process.join(timeout=10)
        raise RuntimeError(
            f"the loader process ended without a word (exit code {self._process.exitcode})"
        )

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
        if self._process is None:
            return
        for _, copied in self._copying:
            copied.synchronize()
        self._copying.clear()
        for slot in list(self._slots):
            self._unpin(slot)
        self._conn.close()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._process = None

    def __del__(self) -> None:
        """A loader dropped without ``close``: unpin before the buffers are unmapped."""
        if getattr(self, "_process", None) is not None:
            with contextlib.suppress(Exception):  # CUDA may be gone at interpreter exit
                self.close()
