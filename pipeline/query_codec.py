"""How a query set is stored: a bitmask over the grid's N points (bit i set <=> flat point i is
queried), packed eight points to a byte, first point in the most significant bit (numpy's
``packbits`` order).

A set of k of N points carries log2(C(N, k)) bits of information (the entropy bound). The packed
mask is N bits whatever k is; the zarr format compresses it with zstd to within ~1.2x of the bound
for ratios 0.05 to 0.95 at N = 16384 (docs/bench_samplers.md), the tars hold it raw
(docs/design.md, section 5). Packing runs where the sets are drawn (torch, on the GPU during a
build); unpacking runs where they are read (numpy, in the loader's threads).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def entropy_bound_bytes(n_points: int, k: int) -> float:
    """log2(C(N, k)) / 8: the fewest bytes any exact code of a k-of-N set can average."""
    if not 0 <= k <= n_points:
        raise ValueError(f"entropy bound: expected 0 <= k <= N, got k={k}, N={n_points}")
    log_choose = math.lgamma(n_points + 1) - math.lgamma(k + 1) - math.lgamma(n_points - k + 1)
    return log_choose / math.log(2) / 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(..., N) bool -> (..., ceil(N/8)) uint8, bit order as numpy.packbits (first point = MSB)."""
    n = mask.shape[-1]
    pad = (-n) % 8
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))
    bits = mask.reshape(*mask.shape[:-1], -1, 8).to(torch.uint8)  # (..., ceil(N/8), 8)
    place = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=mask.device)
    return (bits * place).sum(-1, dtype=torch.uint8)


def unpack_indices(bitmasks: np.ndarray, n_points: int, k: int, where: str) -> np.ndarray:
    """Packed bitmasks (S, ceil(N/8)) uint8 holding k points each -> their indices (S, k) int64,
    ascending per row. A row with another count of points is a ShardError-worthy mismatch: it is
    reported as ValueError naming ``where`` for the caller to wrap."""
    s = len(bitmasks)
    bits = np.unpackbits(bitmasks, axis=1, count=n_points).view(bool)  # (S, N)
    flat = np.flatnonzero(bits)  # positions of the set bits, row by row, ascending
    # every row holds exactly k bits iff, cut into rows of k, each row stays in its own grid row
    exact = flat.size == s * k
    if exact and s:
        indices = flat.reshape(s, k) - (np.arange(s) * n_points)[:, None]  # (S, k)
        exact = indices[:, 0].min() >= 0 and indices[:, -1].max() < n_points
    if not exact:
        counts = sorted(set(bits.sum(axis=1).tolist()))
        raise ValueError(f"{where}: query bitmasks hold {counts} points, the manifest says k={k}")
    return indices if s else np.zeros((0, k), dtype=np.int64)
