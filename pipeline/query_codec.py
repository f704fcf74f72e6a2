"""How a query set is stored: k ascending flat indices out of N grid points, in a slot of bytes
whose size depends on N and k only, so a snapshot's E sets sit side by side in one fixed-size
``queries`` row and every slot's offset follows from the manifest's ``k_per_epoch``.

Each epoch's slot uses the smaller of two codes (ties: the bitmask), and none for a dense epoch:

* ``bitmask``: N bits, bit i set <=> point i is queried, first point in the most significant bit
  (numpy's ``packbits`` order).
* ``elias-fano``: each index split into its L low bits and its high part ``index >> L``. The k low
  parts come first, L bits each (most significant first); then the high parts as a bitvector of
  ``k + ((N - 1) >> L) + 1`` bits in which the i-th set bit (from 0) is at position
  ``(index_i >> L) + i``. L minimises the size, about log2(N / k).
* ``dense`` (k = N): 0 bytes, every point.

Above k = N/2 the slot holds the N - k points *not* queried (``complement``), in the same codes:
C(N, k) = C(N, N - k), so a set and its complement cost the same.

A k-of-N set carries log2(C(N, k)) bits (the entropy bound). Elias-Fano stays within ~1.12x of it
for k/N <= 0.1 (and k/N >= 0.9) and the bitmask within 1.2x for k/N in [0.27, 0.73]; the worst
cases, near k/N = 0.25 and 0.75, are ~1.23x (docs/shard-format.md has the table). Both codes are fixed-size, so the tars hold them as
they are and zarr gains nothing from compressing them. Encoding runs where the sets are drawn
(torch, on the GPU during a build); decoding where they are read (numpy, in the loader's threads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch


def entropy_bound_bytes(n_points: int, k: int) -> float:
    """log2(C(N, k)) / 8: the fewest bytes any exact code of a k-of-N set can average."""
    if not 0 <= k <= n_points:
        raise ValueError(f"entropy bound: expected 0 <= k <= N, got k={k}, N={n_points}")
    log_choose = math.lgamma(n_points + 1) - math.lgamma(k + 1) - math.lgamma(n_points - k + 1)
    return log_choose / math.log(2) / 8


@dataclass(frozen=True)
class Slot:
    """Where and how one epoch's set is stored in a snapshot's ``queries`` row."""

    code: Literal["dense", "bitmask", "elias-fano"]
    epoch: int  # the stored epoch whose set it holds
    offset: int  # first byte in the row
    nbytes: int
    low_bits: int = 0  # elias-fano: L
    complement: bool = False  # the slot holds the N - k points not queried

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.nbytes)


def _elias_fano_bits(n: int, k: int, low: int) -> int:
    return k * low + k + ((n - 1) >> low) + 1


def _slot(n: int, k: int, epoch: int, offset: int) -> Slot:
    if not 1 <= k <= n:
        raise ValueError(f"query slot: expected 1 <= k <= N, got k={k}, N={n}")
    if k == n:
        return Slot("dense", epoch, offset, 0)
    complement = k > n // 2
    stored = n - k if complement else k  # points the code holds
    low = min(range(max(1, n.bit_length())), key=lambda bits: _elias_fano_bits(n, stored, bits))
    bits = _elias_fano_bits(n, stored, low)
    if bits < n:
        return Slot("elias-fano", epoch, offset, -(-bits // 8), low, complement)
    return Slot("bitmask", epoch, offset, -(-n // 8), 0, complement)


def query_slots(n_points: int, k_per_epoch: list[int]) -> list[Slot]:
    """The slot of every epoch's set, in epoch order, back to back."""
    slots, offset = [], 0
    for epoch, k in enumerate(k_per_epoch):
        slots.append(_slot(n_points, k, epoch, offset))
        offset += slots[-1].nbytes
    return slots


def row_bytes(n_points: int, k_per_epoch: list[int]) -> int:
    """Bytes of a snapshot's ``queries`` row: all its epochs' slots."""
    return sum(slot.nbytes for slot in query_slots(n_points, k_per_epoch))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., B) bool -> (..., ceil(B/8)) uint8, bit order as numpy.packbits (first bit = MSB)."""
    pad = (-bits.shape[-1]) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    grouped = bits.reshape(*bits.shape[:-1], -1, 8).to(torch.uint8)  # (..., ceil(B/8), 8)
    # 128, 64, ..., 1 made on the device: a tensor copied there would wait for it
    place = (1 << torch.arange(7, -1, -1, device=bits.device)).to(torch.uint8)
    return (grouped * place).sum(-1, dtype=torch.uint8)


def encode_sets(indices: torch.Tensor, n_points: int, slot: Slot) -> torch.Tensor:
    """(S, k) int64 ascending indices -> (S, slot.nbytes) uint8, on the indices' device."""
    s, k = indices.shape
    if slot.code == "dense":
        return torch.zeros((s, 0), dtype=torch.uint8, device=indices.device)
    mask = torch.zeros((s, n_points), dtype=torch.bool, device=indices.device)
    mask.scatter_(1, indices, True)
    if slot.complement:
        mask = ~mask
        k = n_points - k
        indices = mask.nonzero()[:, 1].reshape(s, k)  # row-major: ascending within a row
    if slot.code == "bitmask":
        return pack_bits(mask)
    low = slot.low_bits
    shifts = torch.arange(low - 1, -1, -1, device=indices.device)
    low_bits = ((indices[..., None] >> shifts) & 1).bool().reshape(s, k * low)  # (S, k*L)
    high = torch.zeros(
        (s, k + ((n_points - 1) >> low) + 1), dtype=torch.bool, device=indices.device
    )
    high.scatter_(1, (indices >> low) + torch.arange(k, device=indices.device), True)
    return pack_bits(torch.cat([low_bits, high], dim=1))


def decode_sets(rows: np.ndarray, n_points: int, k: int, slot: Slot, where: str) -> np.ndarray:
    """(S, slot.nbytes) uint8 -> (S, k) int64 ascending indices. A row that does not hold k
    distinct points below N is reported as ValueError naming ``where``, for the caller to wrap."""
    s = len(rows)
    if slot.code == "dense":
        return np.broadcast_to(np.arange(n_points, dtype=np.int64), (s, n_points)).copy()
    if not slot.complement:
        return _decode_stored(rows, n_points, k, slot, where)
    missing = _decode_stored(rows, n_points, n_points - k, slot, where)  # (S, N - k)
    mask = np.ones((s, n_points), dtype=np.uint8)
    np.put_along_axis(mask, missing, 0, axis=1)
    return _positions(mask, k, where, "query sets")


def _decode_stored(rows: np.ndarray, n_points: int, k: int, slot: Slot, where: str) -> np.ndarray:
    """The k points the slot's code holds, (S, k) int64 ascending."""
    s = len(rows)
    if slot.code == "bitmask":
        bits = np.unpackbits(rows, axis=1, count=n_points)  # (S, N)
        return _positions(bits, k, where, "query bitmasks")
    low = slot.low_bits
    bits = np.unpackbits(rows, axis=1, count=_elias_fano_bits(n_points, k, low))
    low_bits = bits[:, : k * low].reshape(s, k, low)
    if low <= 8:  # packbits pads on the right: one byte per index holds its low part << (8 - L)
        lows = (np.packbits(low_bits, axis=-1)[..., 0] >> (8 - low)).astype(np.int64)  # (S, k)
    else:
        lows = low_bits.astype(np.int64) @ (1 << np.arange(low - 1, -1, -1)).astype(np.int64)
    highs = _positions(bits[:, k * low :], k, where, "Elias-Fano high parts") - np.arange(k)
    indices = (highs << low) | lows
    if s and not ((np.diff(indices, axis=1) > 0).all() and indices[:, -1].max() < n_points):
        raise ValueError(f"{where}: Elias-Fano query sets that are not {k} distinct points < N")
    return indices


def _positions(bits: np.ndarray, k: int, where: str, what: str) -> np.ndarray:
    """(S, B) 0/1 rows with k set bits each -> their positions (S, k) int64, ascending."""
    s, width = bits.shape
    flat = np.flatnonzero(bits)  # positions of the set bits, row by row, ascending
    # every row holds exactly k bits iff, cut into rows of k, each row stays in its own row
    exact = flat.size == s * k
    if exact and s:
        positions = flat.reshape(s, k) - (np.arange(s) * width)[:, None]  # (S, k)
        exact = positions[:, 0].min() >= 0 and positions[:, -1].max() < width
    if not exact:
        counts = sorted(set(bits.sum(axis=1).tolist()))
        raise ValueError(f"{where}: {what} hold {counts} points, the manifest says k={k}")
    return positions if s else np.zeros((0, k), dtype=np.int64)
