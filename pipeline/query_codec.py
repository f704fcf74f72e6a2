"""Compact, exact storage of query index sets: a packed bitmask compressed with zstd.

A set of k of N points carries log2(C(N, k)) bits of information (the entropy bound). The
bitmask is N bits whatever k is, which is already at the bound for k = N/2; zstd's entropy coder
takes a sparse (or dense) mask down to within ~1.2x of the bound for ratios 0.05 to 0.95 at
N = 16384 (measured in docs/bench_samplers.md). Bitmasks also keep the zarr store simple: it
stores the raw masks (``indices_to_bitmask``) and lets zarr's own zstd codec compress them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numcodecs import Zstd

ZSTD_LEVEL = 19  # level 3 is ~1.4x the bound at ratio 0.05, 19 is ~1.15x; ~0.2 ms per 2 KiB mask


def entropy_bound_bytes(n_points: int, k: int) -> float:
    """log2(C(N, k)) / 8: the fewest bytes any exact code of a k-of-N set can average."""
    if not 0 <= k <= n_points:
        raise ValueError(f"entropy bound: expected 0 <= k <= N, got k={k}, N={n_points}")
    log_choose = math.lgamma(n_points + 1) - math.lgamma(k + 1) - math.lgamma(n_points - k + 1)
    return log_choose / math.log(2) / 8


def indices_to_bitmask(indices: np.ndarray | Sequence[int], n_points: int) -> np.ndarray:
    """Distinct indices in [0, N) -> packed bitmask, uint8 (ceil(N / 8),), bit i set for index i."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n_points):
        raise ValueError(
            f"indices: expected values in [0, {n_points}), got [{idx.min()}, {idx.max()}]"
        )
    mask = np.zeros(n_points, dtype=bool)
    mask[idx] = True
    if int(mask.sum()) != idx.size:
        raise ValueError("indices: expected distinct values, found repeats")
    return np.packbits(mask)


def bitmask_to_indices(bitmask: np.ndarray, n_points: int) -> np.ndarray:
    """Packed bitmask (ceil(N / 8),) uint8 -> the set indices, int64 ascending."""
    bitmask = np.asarray(bitmask, dtype=np.uint8).reshape(-1)
    if bitmask.size != (n_points + 7) // 8:
        raise ValueError(
            f"bitmask: expected {(n_points + 7) // 8} bytes for N={n_points}, got {bitmask.size}"
        )
    bits = np.unpackbits(bitmask)
    if bits[n_points:].any():
        raise ValueError(f"bitmask: bits set beyond N={n_points}")
    return np.flatnonzero(bits[:n_points]).astype(np.int64)


def encode_indices(
    indices: np.ndarray | Sequence[int], n_points: int, level: int = ZSTD_LEVEL
) -> bytes:
    """One index set -> zstd-compressed bitmask bytes (decode with ``decode_indices``)."""
    return bytes(Zstd(level=level).encode(indices_to_bitmask(indices, n_points)))


def decode_indices(data: bytes, n_points: int) -> np.ndarray:
    """Inverse of ``encode_indices``: int64 indices, ascending."""
    return bitmask_to_indices(np.frombuffer(Zstd().decode(data), dtype=np.uint8), n_points)


def encode_index_stack(
    sets: Sequence[np.ndarray | Sequence[int]], n_points: int, level: int = ZSTD_LEVEL
) -> bytes:
    """E index sets (an (E, k) array, or E arrays of varying k) -> one compressed blob of E masks."""
    masks = [indices_to_bitmask(s, n_points) for s in sets]
    return bytes(
        Zstd(level=level).encode(np.concatenate(masks) if masks else np.zeros(0, np.uint8))
    )


def decode_index_stack(data: bytes, n_points: int) -> list[np.ndarray]:
    """Inverse of ``encode_index_stack``: a list of E int64 index arrays, each ascending."""
    raw = np.frombuffer(Zstd().decode(data), dtype=np.uint8)
    row = (n_points + 7) // 8
    if raw.size % row:
        raise ValueError(f"index stack: {raw.size} bytes is not a whole number of {row}-byte masks")
    return [bitmask_to_indices(m, n_points) for m in raw.reshape(-1, row)]
