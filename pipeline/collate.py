"""The batch the losses see, and the per-example work that produces it.

``QueryGather`` turns one streamed example (a snapshot, or a window of consecutive snapshots of
one trajectory) into this epoch's query coordinates, normalised targets and weights;
``collate`` stacks examples into a :class:`SparseBatch`. Dense fields travel only when a dense
loss asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from pipeline.shards import query_set


@dataclass
class SparseBatch:
    """One training batch. B examples, k query points, C channels, T latent tokens of width D."""

    snapshot_id: torch.Tensor  # (B,) int64, id of u_t
    epoch: int
    dt: torch.Tensor  # (B,)
    params: torch.Tensor  # (B, P) PDE parameters
    coords: torch.Tensor | None = None  # (B, k, d) this epoch's query points of u_t
    targets: torch.Tensor | None = None  # (B, k, C) normalised u_t there
    weights: torch.Tensor | None = None  # (B, k) w = k / (N pi)
    coords_next: torch.Tensor | None = None  # (B, k, d) query points of u_{t+1}
    targets_next: torch.Tensor | None = None  # (B, k, C)
    weights_next: torch.Tensor | None = None  # (B, k)
    fields: torch.Tensor | None = None  # (B, C, *grid) normalised u_t (encoder input, dense losses)
    fields_next: torch.Tensor | None = None  # (B, C, *grid) normalised u_{t+1} (dense losses)
    z: torch.Tensor | None = None  # (B, T, D) latent of u_t
    z_next: torch.Tensor | None = None  # (B, h, T, D) latents of u_{t+1} .. u_{t+h}

    def _map(self, fn) -> SparseBatch:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = fn(value) if isinstance(value, torch.Tensor) else value
        return SparseBatch(**out)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SparseBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> SparseBatch:
        return self._map(lambda t: t.pin_memory())


class QueryGather:
    """Per example: decode this epoch's query set of each needed snapshot and gather its targets.

    ``sparse_steps`` lists the window positions (0 = u_t, 1 = u_{t+1}) that need sparse
    (coords, targets, weights); ``dense_steps`` those whose full normalised fields travel.
    """

    def __init__(
        self,
        grid_coords: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
        beta: float,
        sparse_steps: tuple[int, ...],
        dense_steps: tuple[int, ...],
        latents: bool,
    ):
        self.grid_coords = grid_coords  # (N, d)
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)  # (C,)
        self.beta, self.sparse_steps, self.dense_steps, self.latents = (
            beta,
            sparse_steps,
            dense_steps,
            latents,
        )

    def __call__(self, ex: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"snapshot_id": ex["snapshot_id"], "epoch": ex["epoch"]}
        c = self.mean.shape[0]
        for step in self.sparse_steps:
            idx, w = query_set(ex["queries"][step], ex["importance"][step], ex["k"], self.beta)
            flat = ex["fields"][step].reshape(c, -1)  # (C, N) physical
            targets = (flat[:, idx].T - self.mean) / self.std  # (k, C)
            suffix = "" if step == 0 else "_next"
            out[f"coords{suffix}"] = self.grid_coords[idx]
            out[f"targets{suffix}"] = targets.astype(np.float32)
            out[f"weights{suffix}"] = w
        for step in self.dense_steps:
            fields = ex["fields"][step]
            shape = (c,) + (1,) * (fields.ndim - 1)
            out["fields" if step == 0 else "fields_next"] = (
                fields - self.mean.reshape(shape)
            ) / self.std.reshape(shape)
        if self.latents:
            out["z"] = ex["latent"][0]
            out["z_next"] = ex["latent"][1:]
        return out


def collate(examples: list[dict[str, Any]], dt: float, params: list[float]) -> SparseBatch:
    """Stack gathered examples into one SparseBatch (latents as float32)."""
    b = len(examples)
    batch: dict[str, Any] = {
        "snapshot_id": torch.tensor([ex["snapshot_id"] for ex in examples], dtype=torch.int64),
        "epoch": examples[0]["epoch"],
        "dt": torch.full((b,), dt, dtype=torch.float32),
        "params": torch.tensor([params] * b, dtype=torch.float32).reshape(b, len(params)),
    }
    for name in (
        "coords",
        "targets",
        "weights",
        "coords_next",
        "targets_next",
        "weights_next",
        "fields",
        "fields_next",
        "z",
        "z_next",
    ):
        if name in examples[0]:
            batch[name] = torch.from_numpy(np.stack([ex[name] for ex in examples])).float()
    return SparseBatch(**batch)
