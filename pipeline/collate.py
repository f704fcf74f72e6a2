"""The batch the losses see, and the work that produces it from streamed examples.

An example is a snapshot, or a window of consecutive snapshots of one trajectory, as stored:
fields in physical units, q, the epoch's query bitmask, latents. :class:`GatherCollate` turns a
list of them into a :class:`SparseBatch` in a few vectorised passes. Dense fields travel only
when a dense loss asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from pipeline.records import ShardError
from pipeline.samplers import weights_from_scale
from pipeline.shards import ShardSet
from ups.data.pdebench import grid_coordinates


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


class GatherCollate:
    """A list of streamed examples -> one SparseBatch, vectorised over the batch.

    Per window position: ``sparse_steps`` (0 = u_t, 1 = u_{t+1}) get this epoch's query
    coordinates, normalised targets and weights; ``dense_steps`` get their full normalised
    fields. Weights w = (k / (N pi))^beta are derived for the whole batch at once from the
    stored q and k_e.
    """

    def __init__(
        self,
        grid_coords: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
        beta: float,
        dt: float,
        params: list[float],
        sparse_steps: tuple[int, ...],
        dense_steps: tuple[int, ...],
        latents: bool,
    ):
        self.grid_coords = grid_coords  # (N, d)
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)  # (C,)
        self.beta, self.dt, self.params = beta, dt, list(params)
        self.sparse_steps, self.dense_steps, self.latents = sparse_steps, dense_steps, latents

    @classmethod
    def for_shards(
        cls,
        shards: ShardSet,
        sparse_steps: tuple[int, ...],
        dense_steps: tuple[int, ...],
        latents: bool,
    ) -> GatherCollate:
        """The collate for a shard set: grid, normalisation, beta, dt and parameters from its manifest."""
        data = shards.manifest["data"]
        return cls(
            grid_coordinates(tuple(data["grid"])),
            np.asarray(data["norm"]["mean"]),
            np.asarray(data["norm"]["std"]),
            shards.beta,
            float(data["dt"]),
            list(data["params"].values()),
            sparse_steps,
            dense_steps,
            latents,
        )

    def __call__(self, examples: list[dict[str, Any]]) -> SparseBatch:
        b, k, n = len(examples), examples[0]["k"], self.grid_coords.shape[0]
        c = self.mean.shape[0]
        batch: dict[str, Any] = {
            "snapshot_id": torch.tensor([ex["snapshot_id"] for ex in examples], dtype=torch.int64),
            "epoch": examples[0]["epoch"],
            "dt": torch.full((b,), self.dt, dtype=torch.float32),
            "params": torch.tensor([self.params] * b, dtype=torch.float32).reshape(
                b, len(self.params)
            ),
        }
        for step in self.sparse_steps:
            suffix = "" if step == 0 else "_next"
            packed = np.stack([ex["queries"][step] for ex in examples])  # (B, ceil(N/8))
            bits = np.unpackbits(packed, axis=1, count=n).view(bool)  # (B, N)
            flat = np.flatnonzero(bits)  # positions of the set bits, row by row, ascending
            # each row holds exactly k bits iff, cut into rows of k, every row stays in its own
            # grid row (first index >= 0, last < N after removing the row's offset)
            exact = flat.size == b * k
            if exact:
                idx = flat.reshape(b, k) - (np.arange(b) * n)[:, None]  # (B, k)
                exact = idx[:, 0].min() >= 0 and idx[:, -1].max() < n
            if not exact:
                counts = bits.sum(axis=1)
                raise ShardError(
                    f"query bitmasks hold {sorted(set(counts.tolist()))} points, the manifest says k={k}"
                )
            targets = np.stack(
                [
                    np.take(ex["fields"][step].reshape(c, n), row, axis=1)
                    for ex, row in zip(examples, idx, strict=True)
                ]
            ).transpose(0, 2, 1)  # (B, k, C) physical
            q_at = np.stack(
                [
                    np.take(ex["importance"][step], row)
                    for ex, row in zip(examples, idx, strict=True)
                ]
            )  # (B, k)
            scale = torch.from_numpy(np.stack([ex["pi_scale"][step] for ex in examples]))  # (B, 2)
            batch[f"coords{suffix}"] = torch.from_numpy(
                np.take(self.grid_coords, idx, axis=0)
            )  # (B, k, d)
            batch[f"targets{suffix}"] = torch.from_numpy((targets - self.mean) / self.std)
            batch[f"weights{suffix}"] = weights_from_scale(
                torch.from_numpy(q_at), n, k, scale, self.beta
            )
        for step in self.dense_steps:
            fields = np.stack([ex["fields"][step] for ex in examples])  # (B, C, *grid)
            shape = (1, c) + (1,) * (fields.ndim - 2)
            normalised = (fields - self.mean.reshape(shape)) / self.std.reshape(shape)
            batch["fields" if step == 0 else "fields_next"] = torch.from_numpy(normalised)
        if self.latents:
            latents = torch.from_numpy(
                np.stack([ex["latent"] for ex in examples])
            ).float()  # (B, h+1, T, D)
            batch["z"], batch["z_next"] = latents[:, 0], latents[:, 1:]
        return SparseBatch(**batch)
