"""The grid convention every part of the pipeline shares: coordinates in [0, 1] per axis, x
first, points flattened in C order (docs/design.md, section 6)."""

from __future__ import annotations

import numpy as np


def grid_coordinates(grid: tuple[int, ...]) -> np.ndarray:
    """Coordinates in [0, 1] per axis (x first) of every point of ``grid``, (N, d) float32, C order."""
    axes = [np.linspace(0.0, 1.0, n, dtype=np.float64) for n in grid]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=-1).astype(np.float32)
