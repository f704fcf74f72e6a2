"""Pictures of a shard set: one snapshot's field with its query points per epoch, and its q; and,
for the train split's layers of adaptive sets, the model error and the q drawn from it.

Draws on a plain ``matplotlib.figure.Figure`` with the Agg canvas, so it never touches pyplot's
global backend and works on machines without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, SubFigure

from pipeline.grid import grid_coordinates
from pipeline.layers import LayerReader
from pipeline.samplers import GradientSampler, effective_sample_size
from pipeline.shards import ShardSet

# inches: a 1D panel row's height, a 2D panel's width and height
_ROW_1D, _COL_2D, _ROW_2D = 1.9, 3.2, 3.4


def plot_query_sets(
    shards: ShardSet,
    snapshot: int,
    epochs: Sequence[int],
    out: str | Path,
    channel: int = 0,
    layers: bool = True,
) -> Path:
    """Write a PNG of snapshot ``snapshot``: its field with each epoch's query points, and q.

    1D: one line plot per epoch with the queried points as markers coloured by weight, then q.
    2D: one image per epoch with the queried points scattered on it, then q as an image.
    Each epoch's sets are its effective ones (:meth:`ShardSet.query_set`): an epoch read from a
    layer of adaptive sets is labelled with the layer's id. With ``layers``, every layer that
    gives the sets of one of ``epochs`` adds a row below (:func:`plot_layer`'s panels).
    """
    plan = _Snapshot(shards, snapshot, channel)
    sets = [(e, *shards.query_set(snapshot, e), _source(shards, e)) for e in epochs]
    rows = layer_epochs(shards, epochs) if layers else []
    one_d = len(plan.grid) == 1
    main = (8.0, _ROW_1D * (len(sets) + 1)) if one_d else (_COL_2D * (len(sets) + 1), _ROW_2D)
    row = (8.0, _ROW_1D * 3) if one_d else (_COL_2D * 4, _ROW_2D)
    width = max(main[0], row[0] if rows else 0.0)
    fig = Figure(figsize=(width, main[1] + row[1] * len(rows)), layout="constrained")
    top: Figure | SubFigure = fig
    below: list[SubFigure] = []  # one per layer row
    if rows:
        heights = [main[1]] + [row[1]] * len(rows)
        top, *below = fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    if one_d:
        _plot_1d(top, plan.coords[:, 0], plan.field, plan.q, sets, plan.n, plan.name)
    else:
        _plot_2d(top, plan.coords, plan.field, plan.q, sets, plan.n, plan.grid)
    for sub, (layer, epoch) in zip(below, rows, strict=True):
        _draw_layer(sub, plan, layer, epoch)
    fig.suptitle(plan.title, fontsize=9)
    return _save(fig, out)


def plot_layer(
    shards: ShardSet, snapshot: int, epoch: int, out: str | Path, channel: int = 0
) -> Path:
    """Write a PNG of the layer that gives ``epoch``'s sets (:meth:`ShardSet.layer_of`) for
    snapshot ``snapshot``: the model's per-point error, the layer's q (``importance``, drawn
    from the error) next to the gradient sampler's q of the same alpha on the normalised fields,
    and the points drawn for ``epoch``. 1D: line plots; 2D: images, the points scattered on the
    field. Refused (ValueError) where no layer gives the epoch's sets."""
    layer = shards.layer_of(shards.k_for_epoch(epoch)[0])
    if layer is None:
        raise ValueError(
            f"plot_layer: epoch {epoch} of '{shards.split}' reads the base set's query sets, "
            f"not a layer's (layers: {[i[:12] for i in shards.layer_ids]})"
        )
    plan = _Snapshot(shards, snapshot, channel)
    size = (8.0, _ROW_1D * 3) if len(plan.grid) == 1 else (_COL_2D * 4, _ROW_2D)
    fig = Figure(figsize=size, layout="constrained")
    _draw_layer(fig, plan, layer, epoch)
    fig.suptitle(plan.title, fontsize=9)
    return _save(fig, out)


def layer_epochs(shards: ShardSet, epochs: Sequence[int]) -> list[tuple[LayerReader, int]]:
    """(layer, the first of ``epochs`` whose sets it gives), for every layer that gives some of
    their sets, oldest first: what :func:`plot_query_sets` adds a row for."""
    found: dict[str, tuple[LayerReader, int]] = {}
    for epoch in epochs:
        layer = shards.layer_of(shards.k_for_epoch(epoch)[0])
        if layer is not None and layer.record.id not in found:
            found[layer.record.id] = (layer, epoch)
    order = shards.layer_ids
    return sorted(found.values(), key=lambda item: order.index(item[0].record.id))


class _Snapshot:
    """What every panel of one snapshot needs: its field, the base set's q, coordinates, title."""

    def __init__(self, shards: ShardSet, snapshot: int, channel: int):
        record = shards.snapshot(snapshot)
        names = shards.manifest.data.channels
        self.shards, self.snapshot, self.channel = shards, snapshot, channel
        self.grid = tuple(shards.grid)
        if len(self.grid) not in (1, 2):
            raise ValueError(f"plot: grids of 1 or 2 axes are supported, got {self.grid}")
        self.fields = np.asarray(record["fields"], dtype=np.float32)  # (C, *grid)
        self.field = self.fields[channel].astype(np.float64)  # (*grid)
        self.q = np.asarray(record["importance"], dtype=np.float64)  # (N,)
        self.coords = grid_coordinates(self.grid)  # (N, d) in [0, 1], C order, x first
        self.n = self.q.size
        self.name = names[channel]
        self.title = (
            f"{shards.split} snapshot {snapshot} (trajectory {record['trajectory']}, "
            f"time {record['time']}), channel {names[channel]!r}, "
            f"sampler {shards.manifest.config['sampler']['kind']}"
        )


def _save(fig: Figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=110)
    return out


def _source(shards: ShardSet, epoch: int) -> str:
    layer = shards.layer_of(shards.k_for_epoch(epoch)[0])
    return "" if layer is None else f"layer {layer.record.id[:8]}"


def _label(epoch: int, indices: np.ndarray, weights: np.ndarray, n: int, source: str = "") -> str:
    ess = float(effective_sample_size(torch.from_numpy(weights)))
    text = f"epoch {epoch}: k={len(indices)} of N={n} ({len(indices) / n:.0%}), ESS {ess:.0f}"
    return f"{text}\n{source}" if source else text


def _plot_1d(fig: Figure | SubFigure, x, field, q, sets, n, name) -> None:
    axes = fig.subplots(len(sets) + 1, 1, sharex=True, squeeze=False)[:, 0]
    for ax, (epoch, indices, weights, source) in zip(axes, sets, strict=False):
        ax.plot(x, field, color="0.35", lw=1, label=name)
        dots = ax.scatter(x[indices], field[indices], c=weights, s=12, cmap="viridis", zorder=3)
        fig.colorbar(dots, ax=ax, label="weight", pad=0.01)
        title = _label(epoch, indices, weights, n)
        ax.set_title(f"{title} ({source})" if source else title, fontsize=8, loc="left")
    ax = axes[-1]
    ax.plot(x, q, color="C3", lw=1, label="q (sampling distribution)")
    ax.axhline(1.0 / n, color="0.5", ls="--", lw=0.8, label="uniform 1/N")
    ax.set_xlabel("x")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("importance q (the set's own)", fontsize=8, loc="left")


def _extent(grid: tuple[int, ...]) -> tuple[float, float, float, float]:
    hx, hy = 0.5 / (grid[0] - 1), 0.5 / (grid[1] - 1)
    return (-hx, 1.0 + hx, -hy, 1.0 + hy)  # pixel centres at the grid coordinates i / (n - 1)


def _plot_2d(fig: Figure | SubFigure, coords, field, q, sets, n, grid) -> None:
    cols = len(sets) + 1
    axes = fig.subplots(1, cols, squeeze=False)[0]
    extent = _extent(grid)
    size = max(0.5, min(8.0, 4000.0 / n))
    for ax, (epoch, indices, weights, source) in zip(axes, sets, strict=False):
        ax.imshow(field.T, origin="lower", extent=extent, cmap="RdBu_r")  # x horizontal
        ax.scatter(coords[indices, 0], coords[indices, 1], s=size, c="k", linewidths=0)
        ax.set_title(_label(epoch, indices, weights, n, source), fontsize=7)
    ax = axes[-1]
    image = ax.imshow(q.reshape(grid).T, origin="lower", extent=extent, cmap="magma")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title("importance q (the set's own)", fontsize=8)
    for ax in axes:
        ax.set_xlabel("x")
        ax.set_ylabel("y")


def _draw_layer(fig: Figure | SubFigure, plan: _Snapshot, layer: LayerReader, epoch: int) -> None:
    """One layer's panels for one snapshot: error, q_error and q_gradient, ``epoch``'s points."""
    shards, record = plan.shards, layer.record
    index, row = shards.locate(plan.snapshot)
    block = shards.read_layer(layer, index)
    error = np.asarray(block.error[row], dtype=np.float64)  # (N,)
    q_error = np.asarray(block.importance[row], dtype=np.float64)  # (N,)
    q_gradient = gradient_q(shards, plan.fields, record.importance.alpha)
    indices, weights = shards.query_set(plan.snapshot, epoch)
    opts = record.importance
    kind = record.error.get("kind", "?")
    source = f"layer {record.id[:8]}"
    q_name = f"q_error (power {opts.power:g}, alpha {opts.alpha:g}, mix {opts.mix:g})"
    g_name = f"q_gradient (alpha {opts.alpha:g})"
    model = record.model
    fig.suptitle(
        f"layer {record.id[:16]}: epochs [{record.epochs[0]}, {record.epochs[1]}), model "
        f"{model.get('stage')} step {model.get('step')}, error {kind}",
        fontsize=8,
    )
    if len(plan.grid) == 1:
        x = plan.coords[:, 0]
        axes = fig.subplots(3, 1, sharex=True, squeeze=False)[:, 0]
        axes[0].plot(x, error, color="C1", lw=1)
        if (error > 0).all():
            axes[0].set_yscale("log")
        axes[0].set_title(f"per-point error ({kind})", fontsize=8, loc="left")
        axes[1].plot(x, q_error, color="C3", lw=1, label=q_name)
        axes[1].plot(x, q_gradient, color="C0", lw=1, ls="-.", label=g_name)
        axes[1].axhline(1.0 / plan.n, color="0.5", ls="--", lw=0.8, label="uniform 1/N")
        axes[1].legend(fontsize=7, loc="best", framealpha=0.6)
        axes[1].set_title("the layer's q against the gradient sampler's", fontsize=8, loc="left")
        ax = axes[2]
        ax.plot(x, plan.field, color="0.35", lw=1)
        dots = ax.scatter(x[indices], plan.field[indices], c=weights, s=12, cmap="viridis")
        fig.colorbar(dots, ax=ax, label="weight", pad=0.01)
        ax.set_title(
            f"{_label(epoch, indices, weights, plan.n)} ({source})", fontsize=8, loc="left"
        )
        ax.set_xlabel("x")
        return
    grid, extent = plan.grid, _extent(plan.grid)
    axes = fig.subplots(1, 4, squeeze=False)[0]
    panels = (
        (error, "inferno", f"per-point error ({kind})"),
        (q_error, "magma", q_name),
        (q_gradient, "magma", g_name),
    )
    for ax, (values, cmap, title) in zip(axes, panels, strict=False):
        image = ax.imshow(values.reshape(grid).T, origin="lower", extent=extent, cmap=cmap)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(title, fontsize=7)
    ax = axes[3]
    size = max(0.5, min(8.0, 4000.0 / plan.n))
    ax.imshow(plan.field.T, origin="lower", extent=extent, cmap="RdBu_r")
    ax.scatter(plan.coords[indices, 0], plan.coords[indices, 1], s=size, c="k", linewidths=0)
    ax.set_title(_label(epoch, indices, weights, plan.n, source), fontsize=7)
    for ax in axes:
        ax.set_xlabel("x")
        ax.set_ylabel("y")


def gradient_q(shards: ShardSet, fields: np.ndarray, alpha: float) -> np.ndarray:
    """The gradient sampler's q (N,) float64 for one snapshot's ``fields`` (C, *grid) in
    physical units, on the set's normalised fields with its periodic axes: the q a gradient
    build of this alpha would have drawn from, to compare with a layer's."""
    data = shards.manifest.data
    normalised = data.norm.normalize(torch.from_numpy(np.asarray(fields, np.float32))[None])
    q = GradientSampler(alpha=alpha).probabilities(normalised, data.periodic)
    return q[0].double().numpy()
