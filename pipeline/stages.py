"""The stages of one build pass, each a small unit with one job.

read (HDF5, lazily) -> encode (a frozen LatentEncoder, GPU) -> importance q (GPU) -> query plan
(E bitmasks from the sampler and schedule, GPU) -> writers (zarr chunks, webdataset tars).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from pipeline.keys import epoch_keys
from pipeline.query_codec import encode_sets, query_slots
from pipeline.records import ShardBlock, trajectory_ids
from pipeline.samplers import Sampler, epoch_passes
from pipeline.sources.pdebench import DataInfo, PDEBenchFile
from pipeline.sources.splits import NormStats


class StageClock:
    """Seconds per stage, added from any thread: the main thread's stages timed with the device
    synchronised (queued kernels count in the stage that launched them), the writes summed over
    the threads that run them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def add(self, stage: str, since: float) -> None:
        """The time since ``since`` (a perf_counter()), to ``stage``."""
        self.count(stage, time.perf_counter() - since)

    def count(self, stage: str, seconds: float) -> None:
        """``seconds`` to ``stage`` (a duration measured elsewhere: a write worker's)."""
        with self._lock:
            self.seconds[stage] += seconds

    def timed(self, stage: str, fn: Callable, *args):
        """``fn(*args)``, its seconds (the device synchronised after it) added to ``stage``."""
        start = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.add(stage, start)
        return out


class LatentEncoder(Protocol):
    """What a build needs of a trained encoder; the pipeline never imports a model library.

    Any encoder fits -- a grid encoder, a point-cloud encoder, someone else's model -- as long as it
    turns normalised full grids into (tokens, width) latents and says who it is. ``identity`` goes
    into the manifest (and so into checkpoints made on the shards); ``norm`` is the normalisation
    it was trained with, which the shards then record. ``tools/build_shards.py`` hands in the codec
    of ``ups.models.codec``.
    """

    identity: dict[str, str]  # {"path": ..., "sha256": ...} of its checkpoint
    norm: NormStats
    latent_shape: tuple[int, int]  # (tokens T, width D)

    def to(self, device: torch.device) -> LatentEncoder:
        """Move to ``device`` for inference (eval mode, no gradients)."""

    def encode(self, fields: torch.Tensor) -> torch.Tensor:
        """Normalised fields (B, C, *grid) -> latents (B, T, D), on the fields' device."""


# encoder loader: (checkpoint path, the data it will encode, its trajectory splits) -> encoder
EncoderLoader = Callable[[str, DataInfo, dict[str, list[int]]], LatentEncoder]


class ReadStage:
    """Whole trajectories from the source file -> fields (S, C, *grid) in physical units + ids."""

    def __init__(self, source: PDEBenchFile):
        self.source = source
        self.steps = source.info.num_steps

    def __call__(self, trajectories: Sequence[int]) -> dict[str, np.ndarray]:
        fields = np.concatenate([self.source.trajectory(t) for t in trajectories])  # (S, C, *grid)
        return {"fields": fields, **trajectory_ids(list(trajectories), self.steps)}


class EncodeStage:
    """Normalised full grids -> latent tokens, with the frozen encoder, in batches, no grad."""

    def __init__(
        self, encoder: LatentEncoder, device: torch.device, batch: int, dtype: str, amp: bool
    ):
        self.encoder = encoder.to(device)
        self.norm, self.device, self.batch, self.dtype = (
            encoder.norm,
            device,
            batch,
            np.dtype(dtype),
        )
        self.amp = amp and device.type == "cuda"

    @torch.no_grad()
    def __call__(self, fields: torch.Tensor) -> np.ndarray:
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        )
        out = []
        with autocast:
            for chunk in self.norm.normalize(fields).split(self.batch):
                out.append(self.encoder.encode(chunk).float().cpu().numpy())
        return np.concatenate(out).astype(self.dtype)  # (S, T, D)


class ImportanceStage:
    """Normalised fields -> the sampler's per-snapshot distribution q (S, N) float32."""

    def __init__(self, sampler: Sampler, norm: NormStats, periodic: Sequence[bool], batch: int):
        self.sampler, self.norm, self.periodic, self.batch = sampler, norm, tuple(periodic), batch

    def __call__(self, fields: torch.Tensor) -> torch.Tensor:
        parts = [
            self.sampler.probabilities(chunk, self.periodic)
            for chunk in self.norm.normalize(fields).split(self.batch)
        ]
        return torch.cat(parts)


class QueryPlanStage:
    """q + snapshot ids -> the E query sets of every snapshot, encoded side by side (S, Q).

    The sets of epochs ``first_epoch``, ``first_epoch + 1``, ...: a layer of adaptive sets
    (pipeline/layers.py) plans a range of a set's epochs with the keys of those epochs."""

    def __init__(
        self,
        sampler: Sampler,
        k_per_epoch: Sequence[int],
        seed: int,
        grid: Sequence[int],
        first_epoch: int = 0,
    ):
        self.sampler, self.k_per_epoch, self.seed, self.grid = (
            sampler,
            list(k_per_epoch),
            seed,
            tuple(grid),
        )
        self.first_epoch = first_epoch
        self.slots = query_slots(math.prod(self.grid), self.k_per_epoch)

    def __call__(self, q: torch.Tensor, snapshot_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(queries (S, Q) uint8, pi_scale (S, E, 2) int64)."""
        ids = torch.from_numpy(snapshot_ids)
        n = q.shape[1]
        epochs = range(self.first_epoch, self.first_epoch + len(self.slots))
        keys = epoch_keys(self.seed, ids, epochs, device=q.device)  # (E, S)
        # E x (S, k_e) ascending indices, every epoch of one k drawn in one pass; (S, E, 2)
        drawn, scale = self.sampler.sample_epochs(q, self.k_per_epoch, list(keys), self.grid)
        s = q.shape[0]
        queries = torch.empty(
            (s, sum(slot.nbytes for slot in self.slots)), dtype=torch.uint8, device=q.device
        )  # (S, Q): the epochs' slots back to back
        # the epochs of one k share their slot's code: encoded together, a pass of them at once,
        # where an epoch-by-epoch loop would launch the same small kernels E times
        epochs_of: dict[int, list[int]] = {}
        for epoch, k in enumerate(self.k_per_epoch):
            epochs_of.setdefault(k, []).append(epoch)
        for same_k in epochs_of.values():
            for group in epoch_passes(same_k, s, n):
                codes = encode_sets(torch.cat([drawn[e] for e in group]), n, self.slots[group[0]])
                for i, epoch in enumerate(group):  # codes: (len(group) * S, nbytes)
                    queries[:, self.slots[epoch].rows] = codes[i * s : (i + 1) * s]
        return queries.cpu().numpy(), scale.cpu().numpy()


def assemble(
    read: dict[str, np.ndarray],
    q: torch.Tensor,
    queries: np.ndarray,
    pi_scale: np.ndarray,
    latent: np.ndarray | None,
) -> ShardBlock:
    return ShardBlock(
        snapshot_id=read["snapshot_id"],
        trajectory=read["trajectory"],
        time=read["time"],
        fields=read["fields"],
        importance=q.float().cpu().numpy(),
        queries=queries,
        pi_scale=pi_scale,
        latent=latent,
    )
