"""Pictures of a shard set: one snapshot's field with its query points per epoch, and its q.

Draws on a plain ``matplotlib.figure.Figure`` with the Agg canvas, so it never touches pyplot's
global backend and works on machines without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.grid import grid_coordinates
from pipeline.samplers import effective_sample_size
from pipeline.shards import ShardSet


def plot_query_sets(
    shards: ShardSet, snapshot: int, epochs: Sequence[int], out: str | Path, channel: int = 0
) -> Path:
    """Write a PNG of snapshot ``snapshot``: its field with each epoch's query points, and q.

    1D: one line plot per epoch with the queried points as markers coloured by weight, then q.
    2D: one image per epoch with the queried points scattered on it, then q as an image.
    """
    record = shards.snapshot(snapshot)
    grid = tuple(shards.grid)
    names = shards.manifest.data.channels
    field = np.asarray(record["fields"][channel], dtype=np.float64)  # (*grid)
    q = np.asarray(record["importance"], dtype=np.float64)  # (N,)
    coords = grid_coordinates(grid)  # (N, d) in [0, 1], C order, x first
    n = q.size
    sets = [(e, *shards.query_set(snapshot, e)) for e in epochs]
    title = (
        f"{shards.split} snapshot {snapshot} (trajectory {record['trajectory']}, "
        f"time {record['time']}), channel {names[channel]!r}, "
        f"sampler {shards.manifest.config['sampler']['kind']}"
    )
    if len(grid) == 1:
        fig = _plot_1d(coords[:, 0], field, q, sets, n, names[channel])
    elif len(grid) == 2:
        fig = _plot_2d(coords, field, q, sets, n, grid)
    else:
        raise ValueError(f"plot: grids of 1 or 2 axes are supported, got {grid}")
    fig.suptitle(title, fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=110)
    return out


def _label(epoch: int, indices: np.ndarray, weights: np.ndarray, n: int) -> str:
    ess = float(effective_sample_size(torch.from_numpy(weights)))
    return f"epoch {epoch}: k={len(indices)} of N={n} ({len(indices) / n:.0%}), ESS {ess:.0f}"


def _plot_1d(x, field, q, sets, n, name) -> Figure:
    fig = Figure(figsize=(8, 1.9 * (len(sets) + 1)), layout="constrained")
    axes = fig.subplots(len(sets) + 1, 1, sharex=True, squeeze=False)[:, 0]
    for ax, (epoch, indices, weights) in zip(axes, sets, strict=False):
        ax.plot(x, field, color="0.35", lw=1, label=name)
        dots = ax.scatter(x[indices], field[indices], c=weights, s=12, cmap="viridis", zorder=3)
        fig.colorbar(dots, ax=ax, label="weight", pad=0.01)
        ax.set_title(_label(epoch, indices, weights, n), fontsize=8, loc="left")
    ax = axes[-1]
    ax.plot(x, q, color="C3", lw=1, label="q (sampling distribution)")
    ax.axhline(1.0 / n, color="0.5", ls="--", lw=0.8, label="uniform 1/N")
    ax.set_xlabel("x")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("importance q", fontsize=8, loc="left")
    return fig


def _plot_2d(coords, field, q, sets, n, grid) -> Figure:
    cols = len(sets) + 1
    fig = Figure(figsize=(3.2 * cols, 3.4), layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)[0]
    hx, hy = 0.5 / (grid[0] - 1), 0.5 / (grid[1] - 1)
    extent = (-hx, 1.0 + hx, -hy, 1.0 + hy)  # pixel centres at the grid coordinates i / (n - 1)
    size = max(0.5, min(8.0, 4000.0 / n))
    for ax, (epoch, indices, weights) in zip(axes, sets, strict=False):
        ax.imshow(field.T, origin="lower", extent=extent, cmap="RdBu_r")  # x horizontal
        ax.scatter(coords[indices, 0], coords[indices, 1], s=size, c="k", linewidths=0)
        ax.set_title(_label(epoch, indices, weights, n), fontsize=7)
    ax = axes[-1]
    image = ax.imshow(q.reshape(grid).T, origin="lower", extent=extent, cmap="magma")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title("importance q", fontsize=8)
    for ax in axes:
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    return fig
