"""Batches copied to the GPU on a stream of their own (pipeline/transfer.py): what the training
stream reads after a copy is the copied data, however busy the GPU is, and a host buffer may be
written again once its copy's event has passed."""

from __future__ import annotations

import pytest
import torch

from pipeline.collate import SparseBatch
from pipeline.transfer import SideStreamCopy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_the_training_stream_reads_the_copy_not_the_memory_before_it():
    """A copy of 256 MiB takes milliseconds; a sum queued on the (idle) training stream right
    after it would read the destination at once unless it waits for the copy's event."""
    copy = SideStreamCopy(torch.device("cuda"))
    for trial in range(5):
        host = torch.full((64 * 2**20,), float(trial + 1)).pin_memory()  # 256 MiB
        on_gpu, copied = copy.tensor(host)
        total = on_gpu.sum()  # queued on the training stream
        assert total.item() == host.numel() * (trial + 1)
        copied.synchronize()
        host.fill_(-1.0)  # the copy is done: the host buffer is free to refill
        assert on_gpu.sum().item() == host.numel() * (trial + 1)


def test_a_batch_arrives_whole_behind_a_busy_gpu():
    """With a long kernel queued on the training stream, the side stream's copy runs beside it,
    and every field read after it on the training stream holds the host batch's values."""
    copy = SideStreamCopy(torch.device("cuda"))
    b, k = 32, 4096
    host = SparseBatch(
        snapshot_id=torch.arange(b),
        epoch=3,
        dt=torch.full((b,), 0.5),
        params=torch.rand(b, 2),
        coords=torch.rand(b, k, 2),
        targets=torch.randn(b, k, 1),
        weights=torch.rand(b, k),
        z=torch.randn(b, 64, 128),
    ).pin_memory()
    for _ in range(5):
        torch.cuda._sleep(20_000_000)  # ~10 ms of work queued before the copy
        batch = copy.batch(host)
        assert batch.epoch == 3 and batch.coords_next is None
        for got, want in zip(batch.tensors(), host.tensors(), strict=True):
            assert got.device.type == "cuda"
            assert torch.equal(got.cpu(), want)
