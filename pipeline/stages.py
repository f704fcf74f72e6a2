"""The stages of one build pass, each a small unit with one job.

read (HDF5, lazily) -> encode (frozen GridEncoder, GPU) -> importance q (GPU) -> query plan
(E bitmasks from the sampler and schedule, GPU) -> writers (zarr chunks, webdataset tars).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.keys import snapshot_keys
from pipeline.records import ShardBlock
from pipeline.samplers import Sampler, inclusion_scale
from ups.data.pdebench import PDEBenchFile
from ups.data.splits import NormStats
from ups.models.codec import Codec


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(..., N) bool -> (..., ceil(N/8)) uint8, bit order as numpy.packbits (first point = MSB)."""
    n = mask.shape[-1]
    pad = (-n) % 8
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))
    bits = mask.reshape(*mask.shape[:-1], -1, 8).to(torch.uint8)
    place = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=mask.device)
    return (bits * place).sum(-1, dtype=torch.uint8)


class ReadStage:
    """Whole trajectories from the source file -> fields (S, C, *grid) in physical units + ids."""

    def __init__(self, source: PDEBenchFile):
        self.source = source
        self.steps = source.info.num_steps

    def __call__(self, trajectories: Sequence[int]) -> dict[str, np.ndarray]:
        fields = np.concatenate([self.source.trajectory(t) for t in trajectories])  # (S, C, *grid)
        trajectory = np.repeat(np.asarray(trajectories, dtype=np.int64), self.steps)
        time = np.tile(np.arange(self.steps, dtype=np.int64), len(trajectories))
        return {
            "fields": fields,
            "trajectory": trajectory,
            "time": time,
            "snapshot_id": trajectory * self.steps + time,
        }


class EncodeStage:
    """Normalised full grids -> latent tokens, with the frozen encoder, in batches, no grad."""

    def __init__(
        self, codec: Codec, norm: NormStats, device: torch.device, batch: int, dtype: str, amp: bool
    ):
        self.encoder = codec.encoder.to(device).eval().requires_grad_(False)
        self.norm, self.device, self.batch, self.dtype = norm, device, batch, np.dtype(dtype)
        self.amp = amp and device.type == "cuda"

    @torch.no_grad()
    def __call__(self, fields: torch.Tensor) -> np.ndarray:
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        )
        out = []
        with autocast:
            for chunk in self.norm.normalize(fields).split(self.batch):
                out.append(self.encoder(chunk).float().cpu().numpy())
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
    """q + snapshot ids -> the E query sets of every snapshot as packed bitmasks (S, E, ceil(N/8))."""

    def __init__(
        self, sampler: Sampler, k_per_epoch: Sequence[int], seed: int, grid: Sequence[int]
    ):
        self.sampler, self.k_per_epoch, self.seed, self.grid = (
            sampler,
            list(k_per_epoch),
            seed,
            tuple(grid),
        )

    def __call__(self, q: torch.Tensor, snapshot_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(queries (S, E, ceil(N/8)) uint8, pi_scale (S, E, 2) int64)."""
        ids = torch.from_numpy(snapshot_ids)
        masks, scales = [], []
        for epoch, k in enumerate(self.k_per_epoch):
            keys = snapshot_keys(self.seed, ids, epoch, device=q.device)
            idx = self.sampler.sample(q, k, keys, self.grid)  # (S, k)
            mask = torch.zeros(q.shape, dtype=torch.bool, device=q.device).scatter_(1, idx, True)
            masks.append(pack_bits(mask))
            scales.append(inclusion_scale(q, k))
        return torch.stack(masks, dim=1).cpu().numpy(), torch.stack(scales, dim=1).cpu().numpy()


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
