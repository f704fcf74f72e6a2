"""The batch the losses see, and the work that produces it from streamed examples.

An example is a snapshot, or a window of consecutive snapshots of one trajectory, named by its
shard's prepared arrays and its first row there. :class:`Collate` prepares a shard's arrays for
an epoch and cuts a list of examples out of them into a :class:`SparseBatch`. Dense fields travel
only when a dense loss asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from pipeline.grid import grid_coordinates
from pipeline.records import ShardBlock, SnapshotBlock
from pipeline.shards import QuerySets, ShardSet
from pipeline.sources.splits import NormStats


@dataclass(frozen=True)
class BatchSpec:
    """What each batch carries, decided by the losses that consume it (one description for the
    training loop, the loader, the collate and the benchmarks).

    An example is a window of ``window + 1`` consecutive snapshots of one trajectory (0: single
    snapshots; 1: pairs (u_t, u_{t+1}); h: rollout windows). Window positions in ``sparse_steps``
    (0 = u_t, 1 = u_{t+1}) get this epoch's coords, targets and weights; those in ``dense_steps``
    their full normalised fields; ``latents`` adds the cached latents of the whole window.
    """

    window: int = 0
    sparse_steps: tuple[int, ...] = ()
    dense_steps: tuple[int, ...] = ()
    latents: bool = False

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ValueError(f"BatchSpec.window: expected an integer >= 0, got {self.window}")
        for name in ("sparse_steps", "dense_steps"):
            steps = getattr(self, name)
            if not set(steps) <= {0, 1} or any(step > self.window for step in steps):
                raise ValueError(
                    f"BatchSpec.{name}: expected window positions 0 (u_t) or 1 (u_t+1) within "
                    f"window {self.window}, got {steps!r}"
                )


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

    def tensors(self) -> list[torch.Tensor]:
        """The batch's tensors (the fields it holds)."""
        return [v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)]


class Collate:
    """Streamed examples -> one SparseBatch, in two halves that run in different places.

    ``prepare`` runs once per shard and epoch in the loader's read-ahead threads, vectorised over
    the shard: this epoch's query coordinates, normalised targets and weights (from the decoded
    query sets), normalised fields when a dense loss needs them, float32 latents. ``__call__``
    then copies a batch's windows out of those prepared arrays (joined per group of shards by the
    loader), one copy per batch field, straight into the batch's (pinned, with ``pin_memory``)
    tensors.

    The host work is numpy on purpose: it runs beside the training step, whose launch thread
    needs its core and the interpreter. numpy copies release the interpreter lock and stay on the
    calling thread; torch's CPU ops would start OpenMP teams whose spinning threads take the
    step's cores (docs/benchmarks.md, "The loader").

    What a batch holds is the :class:`BatchSpec`.
    """

    def __init__(
        self,
        spec: BatchSpec,
        *,
        grid: tuple[int, ...],
        norm: NormStats,
        dt: float,
        params: list[float],
        pin_memory: bool = False,
    ):
        self.spec = spec
        self.grid_coords = grid_coordinates(grid)  # (N, d)
        self.mean = np.asarray(norm.mean, dtype=np.float32)  # (C,)
        self.std = np.asarray(norm.std, dtype=np.float32)  # (C,)
        self.dt, self.params, self.pin_memory = dt, list(params), pin_memory
        # batch field <- (prepared array, window positions: one int, or a range for z_next)
        self.outputs: dict[str, tuple[str, int | range]] = {"snapshot_id": ("snapshot_id", 0)}
        for step in spec.sparse_steps:
            suffix = "" if step == 0 else "_next"
            for name in ("coords", "targets", "weights"):
                self.outputs[name + suffix] = (name, step)
        for step in spec.dense_steps:
            self.outputs["fields" if step == 0 else "fields_next"] = ("fields", step)
        if spec.latents:
            self.outputs["z"] = ("latent", 0)
            self.outputs["z_next"] = ("latent", range(1, spec.window + 1))

    @classmethod
    def for_shards(cls, shards: ShardSet, spec: BatchSpec, pin_memory: bool = False) -> Collate:
        """The collate for a shard set: grid, normalisation, dt and parameters from its manifest."""
        data = shards.manifest.data
        return cls(
            spec,
            grid=tuple(data.grid),
            norm=data.norm,
            dt=data.dt,
            params=list(data.params.values()),
            pin_memory=pin_memory,
        )

    def prepare(
        self, block: ShardBlock | SnapshotBlock, queries: QuerySets | None
    ) -> dict[str, np.ndarray]:
        """A shard's arrays as batches hold them, for one epoch (S = snapshots in the shard)."""
        arrays = {"snapshot_id": block.snapshot_id}  # (S,)
        if self.spec.sparse_steps:
            if queries is None:
                raise ValueError("sparse steps need the epoch's query sets")
            arrays["coords"] = np.take(self.grid_coords, queries.indices, axis=0)  # (S, k, d)
            arrays["targets"] = (queries.values - self.mean) / self.std  # (S, k, C)
            arrays["weights"] = queries.weights  # (S, k)
        if self.spec.dense_steps:
            shape = (1, -1) + (1,) * (block.fields.ndim - 2)
            arrays["fields"] = (block.fields - self.mean.reshape(shape)) / self.std.reshape(shape)
        if self.spec.latents:
            if block.latent is None:
                raise ValueError("latent steps need shards with latents (these are field-only)")
            arrays["latent"] = block.latent.astype(np.float32, copy=False)  # (S, T, D)
        return arrays

    def __call__(self, examples: list[dict[str, Any]]) -> SparseBatch:
        """``examples``: dicts with their shards' ``arrays`` (from ``prepare``), the window's
        first ``row`` in them and the ``epoch``. A batch usually draws on one group's arrays, two
        where it spans a group boundary."""
        b = len(examples)
        by_arrays: dict[int, tuple[dict[str, np.ndarray], list[int], list[int]]] = {}
        for position, ex in enumerate(examples):
            _, at, rows = by_arrays.setdefault(id(ex["arrays"]), (ex["arrays"], [], []))
            at.append(position)
            rows.append(ex["row"])
        # (prepared arrays, positions in the batch, first rows there) per group drawn on
        groups = [(a, np.asarray(p), np.asarray(r)) for a, p, r in by_arrays.values()]
        batch: dict[str, Any] = {"epoch": examples[0]["epoch"]}
        for key, (name, steps) in self.outputs.items():
            array = groups[0][0][name]
            shape = (b, len(steps)) if isinstance(steps, range) else (b,)
            batch[key] = torch.empty(
                shape + array.shape[1:],
                dtype=torch.from_numpy(array[:0]).dtype,
                pin_memory=self.pin_memory,
            )
            out = batch[key].numpy()
            for arrays, positions, first in groups:
                if isinstance(steps, range):
                    window_rows = first[:, None] + np.asarray(steps)  # (b_group, h)
                else:
                    window_rows = first + steps  # (b_group,)
                if len(groups) == 1:  # the usual case: one copy, straight into the batch
                    np.take(arrays[name], window_rows, axis=0, out=out)
                else:
                    out[positions] = arrays[name][window_rows]
        batch["dt"] = torch.full((b,), self.dt, dtype=torch.float32)
        batch["params"] = torch.tensor([self.params] * b, dtype=torch.float32).reshape(
            b, len(self.params)
        )
        return SparseBatch(**batch)
