"""Host-to-GPU copies of batches on a CUDA stream of their own, beside the training steps.

A copy queued on the training stream starts only after every step queued there before it, and
the next step waits for it: for its length the GPU computes nothing. On a stream of its own the
copy runs on a copy engine while the GPU still works through the steps queued before, and only
the training stream's work queued after it waits for it (an event; nothing is synchronised).
The training thread is usually a step or more ahead of the GPU, so the copy is then done before
its step starts. docs/design.md ("Stalls") has what this saves.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pipeline.collate import SparseBatch


class SideStreamCopy:
    """Copies pinned host tensors to ``device`` on a stream of its own, for the work the calling
    thread queues on its current stream from then on."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def tensor(self, host: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """``host`` on the device, and the event of its copy's end: after it ``host`` may be
        written again."""
        with torch.cuda.stream(self.stream):
            out = host.to(self.device, non_blocking=True)
        return out, self._hand_over([out])

    def batch(self, host: SparseBatch) -> SparseBatch:
        """A batch of pinned tensors on the device."""
        with torch.cuda.stream(self.stream):
            out = host.to(self.device, non_blocking=True)
        self._hand_over(out.tensors())
        return out

    def _hand_over(self, copies: Iterable[torch.Tensor]) -> torch.cuda.Event:
        """Order the current stream's later work after the copies just queued; their memory,
        allocated on the copy stream, is reused only once the current stream's reads are done."""
        copied = torch.cuda.Event()
        copied.record(self.stream)
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(copied)
        for t in copies:
            t.record_stream(consumer)
        return copied


__all__ = ["SideStreamCopy"]
