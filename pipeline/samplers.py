"""Query-point samplers: which k of a snapshot's N grid points an epoch's losses are evaluated at.

Every sampler splits its work in two (docs/design.md, section 5):

- ``probabilities(fields, periodic)`` -> q (B, N): the per-snapshot, epoch-independent sampling
  distribution. It is stored with the snapshot in the shards.
- ``sample(q, k, keys, grid)`` -> (B, k) distinct sorted flat indices, a pure function of q, k and
  the snapshot's key (``pipeline.keys``), so a batch gives the same sets as one snapshot at a time.

Each draw includes point i with probability exactly ``inclusion_probabilities(q, k)[i]``, so the
weights w_i = k / (N pi_i) follow from the stored q and k_e alone and the estimate of the dense mean
(1/N) sum_i l_i is the plain mean of w * l over the k points, unbiased (Horvitz-Thompson).

Reproducibility: every sum that decides q or a draw is taken in int64 fixed point, which is exact
and so independent of reduction order, batch size, thread count and device; everything else is
integer or elementwise, correctly rounded IEEE arithmetic (the one square root is corrected to the
IEEE result, which torch's vectorised CPU sqrt misses). So the same fields and key give
byte-identical q and sets in any batch and on CPU and CUDA (``test_cuda_equals_cpu`` in
tests/test_samplers.py checks it where a GPU is present; CI has none).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Generic, Literal, NamedTuple, TypeVar

import numpy as np
import torch

from pipeline.config import ConfigError, check
from pipeline.keys import random_bits, snapshot_keys

# Independent random streams of one snapshot key (pipeline.keys.random_bits).
_STREAM_UNIFORM = 0
_STREAM_EXTRA_BLOCKS = 1
_STREAM_WITHIN_BLOCK = 2
_STREAM_PPS_ORDER = 3
_STREAM_PPS_OFFSET = 4
_STREAM_PPS_BLOCKS = 5

# Systematic PPS works in integer units of 2^-32 of a point, so its cumulative sums are exact.
_DRAW_ELEMENTS = 1 << 24  # (epochs x snapshots) x N per drawing pass: ~128 MiB per int64 tensor
_UNIT_BITS = 32
_UNIT = 1 << _UNIT_BITS
# pi within 2^-24 of 1 counts as 1: this keeps every other point's share of units below one unit
# of spacing despite float64 rounding (and is below float32 weight resolution anyway).
_CAP = 1.0 - 2.0**-24
_MAX_K = 1 << 26  # keeps k * _UNIT and the rounding margin of the fixed point within bounds

DEFAULT_BLOCK = {1: (16,), 2: (8, 8), 3: (4, 4, 4)}


# ---------------------------------------------------------------------------------------------
# Inclusion probabilities and weights: shared by every sampler, the loader and the losses.


def _frac_bits(n: int) -> int:
    """F of the fixed point 2^-F: a row of n values in [0, 1] sums without int64 overflow."""
    return 62 - n.bit_length()


def _fixed_point(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Values in [0, 1] as int64 multiples of 2^-F, F chosen so a row of n (default: the last
    dim) sums without overflow; the same F for a full row and for values gathered from it."""
    frac_bits = _frac_bits(x.shape[-1] if n is None else n)
    return torch.round(x.to(torch.float64) * 2.0**frac_bits).to(torch.int64)


class _Capping(NamedTuple):
    pi: torch.Tensor  # (B, N) float64 inclusion probabilities
    capped: torch.Tensor  # (B, N) bool, pi == 1
    mass: torch.Tensor  # (B, N) int64, q in fixed point, 0 where capped
    total: torch.Tensor  # (B,) int64, sum of mass
    remaining: torch.Tensor  # (B,) int64, k minus the number of capped points


def _cap(q: torch.Tensor, k: int) -> _Capping:
    """pi = min(1, k q) with the excess of capped points redistributed over the rest, repeated
    until no point exceeds 1, so that sum(pi) = k."""
    fixed = _fixed_point(q)
    # k == N: every point with q > 0 is certain (shortcut of the iteration below)
    capped = fixed > 0 if k == q.shape[1] else torch.zeros_like(fixed, dtype=torch.bool)
    while True:
        mass = fixed.masked_fill(capped, 0)
        total = mass.sum(1)  # exact: integer
        remaining = k - capped.sum(1)
        pi = remaining[:, None] * mass.double() / total.clamp(min=1)[:, None].double()
        newly = pi >= _CAP
        if not newly.any():
            break
        capped |= newly
    if ((remaining > 0) & (total == 0)).any():
        raise ValueError(
            f"q has fewer than k={k} points with positive probability, so no draw of k distinct "
            "points follows it"
        )
    return _Capping(pi.masked_fill(capped, 1.0), capped, mass, total, remaining)


def _check_q(q: torch.Tensor, k: int) -> None:
    if q.ndim != 2 or not q.is_floating_point():
        raise ValueError(f"q: expected a float tensor (B, N), got {tuple(q.shape)} {q.dtype}")
    n = q.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(n, _MAX_K):
        raise ValueError(f"k: expected an integer in [1, N={n}], got {k!r}")
    sums = q.double().sum(1)  # with no negative entry: finite iff every entry is
    invalid = (q.min() < 0) | ~torch.isfinite(sums).all()
    if bool(invalid | ((sums - 1).abs() > 1e-3).any()):  # one wait for a GPU, not one per check
        if bool(invalid):
            raise ValueError("q: expected finite, non-negative probabilities")
        raise ValueError(
            f"q: each row must sum to 1, got sums in [{sums.min():.6g}, {sums.max():.6g}]"
        )


def inclusion_probabilities(q: torch.Tensor, k: int) -> torch.Tensor:
    """pi (B, N) float64: each point's probability to be among k drawn from q; sum(pi) = k, pi <= 1.

    q is resolved to 2^-(62 - bit_length(N)) absolute in int64 fixed point, so its row sums are
    exact; uniform q gives pi = k/N exactly.
    """
    _check_q(q, k)
    return _cap(q, k).pi


def inclusion_scale(q: torch.Tensor, k: int) -> torch.Tensor:
    """(B, 2) int64 [remaining, total]: the capping's fixed point. The k - remaining capped points
    (pi = 1) are the ones with the largest q, and every other point has
    pi_i = remaining * fixed(q_i) / total. Capping that takes all k points gives remaining = 0:
    every other point then has pi = 0 and is never drawn.

    Two integers per snapshot-epoch: stored beside the query sets, they make a query set's
    weights an O(k) computation from q at its points (:func:`weights_from_scale`), exactly equal
    to (k / N) / pi from :func:`inclusion_probabilities`. Every draw holds all capped points, so
    they are the k - remaining largest q of the set itself.
    """
    _check_q(q, k)
    c = _cap(q, k)
    return torch.stack([c.remaining, c.total], dim=1)


def weights_from_scale(
    q_at: np.ndarray, n_points: int, k: int, scale: np.ndarray, beta: float = 1.0
) -> np.ndarray:
    """Loss weights (S, k) float32 (k / (N pi_i))**beta from q at the drawn points (S, k) and the
    stored scale (S, 2): an O(k) computation, exactly equal to the weights from the full capping.

    A draw holds every capped point, and capped points have larger q than all others, so the
    k - remaining largest q of a set are its capped points (pi = 1); the rest have
    pi = remaining * fixed(q) / total, computed as in the capping itself. This also holds where
    capping takes all k points (remaining = 0) and where the last point was capped just below 1.

    numpy on purpose: the streaming loader computes these beside the training step, and numpy
    stays on the calling thread, while torch's CPU ops start an OpenMP team whose spinning
    threads take the cores the step's launch thread needs."""
    if k == n_points:
        return np.ones(q_at.shape, dtype=np.float32)
    scale = np.asarray(scale)
    if scale.shape != (q_at.shape[0], 2) or q_at.shape[1:] != (k,):
        raise ValueError(
            f"weights: q at the drawn points {q_at.shape} and scale {scale.shape} do not fit k={k}"
        )
    remaining, total = scale[:, :1], scale[:, 1:]
    if ((remaining < 0) | (remaining > k) | (total < 0)).any():
        raise ValueError(f"weights: scale is not a capping's [remaining, total] for k={k}")
    fixed = np.round(q_at.astype(np.float64) * 2.0 ** _frac_bits(n_points)).astype(np.int64)
    pi = (
        remaining.astype(np.float64)
        * fixed.astype(np.float64)
        / np.maximum(total, 1).astype(np.float64)
    )
    capped = np.zeros(fixed.shape, dtype=bool)
    n_capped = k - remaining[:, 0]
    for c in np.unique(n_capped[n_capped > 0]).tolist():  # the c largest q of a row are capped
        rows = np.flatnonzero(n_capped == c)
        threshold = np.partition(fixed[rows], k - c, axis=1)[:, k - c : k - c + 1]
        capped[rows] = fixed[rows] >= threshold
    pi = np.where(capped & (fixed > 0), 1.0, pi)
    if (pi == 0).any():
        raise ValueError("indices include points with zero inclusion probability: not drawn from q")
    return np.power((k / n_points) / pi, beta).astype(np.float32)


def weights(q: torch.Tensor, k: int, indices: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Loss weights (B, k) float32: (k / (N pi_i))**beta at the drawn points.

    beta = 1 is the unbiased Horvitz-Thompson weight; beta = 0 gives w = 1, a deliberate focus on
    the points q favours. Uniform sampling gives w == 1 exactly.
    """
    scale = inclusion_scale(q, k).cpu().numpy()
    q_at = q.gather(1, indices).cpu().numpy()
    return torch.from_numpy(weights_from_scale(q_at, q.shape[1], k, scale, beta)).to(q.device)


def effective_sample_size(w: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / sum w^2 over the last dim: k for equal weights, smaller the more they vary."""
    w = w.double()
    return w.sum(-1) ** 2 / (w * w).sum(-1)


# ---------------------------------------------------------------------------------------------
# Drawing helpers.


def _random_order(keys: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    """A uniformly random permutation of range(n) per key (B, n); ties (p ~ n^2 / 2^64) go by index."""
    return torch.sort(random_bits(keys, n, stream), dim=1, stable=True).indices


def _smallest_k(keys: torch.Tensor, n: int, k: int, stream: int) -> torch.Tensor:
    """The first k points of :func:`_random_order` (B, k), in any order: the k smallest random
    values, by a partial selection instead of a full sort. Rows where the k-th and (k+1)-th
    values tie (p ~ n^2 / 2^64) take the full stable sort, so ties still go by index."""
    bits = random_bits(keys, n, stream)  # (B, n)
    if k == n:
        return torch.arange(n, device=keys.device).expand(len(keys), n).clone()
    values, picked = torch.topk(bits, k + 1, dim=1, largest=False, sorted=True)
    tied = values[:, k - 1] == values[:, k]
    picked = picked[:, :k]
    if bool(tied.any()):
        picked[tied] = torch.sort(bits[tied], dim=1, stable=True).indices[:, :k]
    return picked


def _mask_to_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) bool with k True per row -> their indices (B, k) int64, ascending.

    On a GPU without waiting for it (:func:`_ranked_indices`): nonzero must sync to learn its
    output's size, and a build draws a shard's epochs in several passes, each such wait stalling
    the thread that launches the next pass. On a CPU nonzero is the faster, and waits for
    nothing."""
    if mask.device.type != "cpu":
        return _ranked_indices(mask, k)
    counts = mask.sum(1)
    assert bool((counts == k).all()), f"a draw selected {counts.tolist()} points, not {k}"
    return mask.nonzero()[:, 1].reshape(mask.shape[0], k)  # row-major: sorted per row


def _ranked_indices(mask: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`_mask_to_indices` with no host sync: each True goes to its rank in its row (a
    running count), and the count is checked on the device."""
    b, n = mask.shape
    torch._assert_async((mask.sum(1) == k).all(), f"a draw did not select {k} points in a row")
    rank = mask.cumsum(1) - 1  # (B, N): each True's column in the result
    column = torch.where(mask, rank.clamp(max=k), k)  # the rest to a spare column k, dropped
    out = torch.empty((b, k + 1), dtype=torch.int64, device=mask.device)
    out.scatter_(1, column, torch.arange(n, device=mask.device).expand(b, n))
    return out[:, :k].contiguous()


def _scatter_picks(order: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """Picks given in visiting order (B, N) -> a mask in grid order (B, N)."""
    return torch.zeros_like(picked).scatter_(1, order, picked)


def _check_fields(fields: torch.Tensor, periodic: Sequence[bool]) -> None:
    if fields.ndim < 3 or not fields.is_floating_point():
        raise ValueError(
            f"fields: expected a float tensor (B, C, *grid), got {tuple(fields.shape)}"
        )
    if len(periodic) != fields.ndim - 2:
        raise ValueError(
            f"periodic: expected one flag per grid axis ({fields.ndim - 2}), got {periodic!r}"
        )
    bad = (~torch.isfinite(fields)).flatten(1).any(1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"fields: NaN or Inf in snapshot(s) at batch position(s) {bad[:8]}")


# ---------------------------------------------------------------------------------------------
# Samplers.


Shared = TypeVar("Shared")  # what a sampler's draws of one k share (Sampler._shared)


def epoch_passes(epochs: Sequence[int], rows: int, n: int) -> list[list[int]]:
    """``epochs`` in the groups that one pass over (len(group) x rows, N) handles at once: the
    draws of one k, and their encoding, are bounded by _DRAW_ELEMENTS elements a pass."""
    per_pass = max(1, _DRAW_ELEMENTS // max(1, rows * n))
    return [list(epochs[first : first + per_pass]) for first in range(0, len(epochs), per_pass)]


class EpochDraws(NamedTuple):
    """What :meth:`Sampler.sample_epochs` draws for a shard's epochs."""

    indices: list[torch.Tensor]  # per epoch e, (B, k_e) int64 flat indices, ascending
    scale: torch.Tensor  # (B, E, 2) int64: each epoch's inclusion_scale(q, k_e)


class Sampler(Generic[Shared]):
    """Interface of every sampler: per-snapshot q from fields, then keyed fixed-size draws from q."""

    kind: ClassVar[str]

    def __init__(self, beta: float = 1.0) -> None:
        self.beta = beta

    def probabilities(self, fields: torch.Tensor, periodic: Sequence[bool]) -> torch.Tensor:
        """q (B, N) float32, rows summing to 1, on the device of fields (B, C, *grid)."""
        _check_fields(fields, periodic)
        return self._probabilities(fields, periodic)

    def sample(
        self, q: torch.Tensor, k: int, keys: torch.Tensor, grid: Sequence[int]
    ) -> torch.Tensor:
        """k distinct flat indices per snapshot, ascending (B, k) int64; k == N gives all points."""
        return self.sample_epochs(q, [k], [keys], grid).indices[0]

    def sample_epochs(
        self,
        q: torch.Tensor,
        k_per_epoch: Sequence[int],
        keys_per_epoch: Sequence[torch.Tensor],
        grid: Sequence[int],
    ) -> EpochDraws:
        """``[sample(q, k_e, keys_e, grid) for every epoch e]``, the same bits, with the epochs of
        one k drawn together, and each epoch's :func:`inclusion_scale`: what the epochs of one k
        share (checks, the capping of q) is computed once, and one pass over (epochs x B, N)
        replaces an epoch-by-epoch loop of small kernels."""
        grid = tuple(grid)
        (b, n), out = q.shape, [torch.empty(0)] * len(k_per_epoch)
        scales = [torch.empty(0)] * len(k_per_epoch)
        for k in sorted(set(k_per_epoch)):
            epochs = [e for e, ke in enumerate(k_per_epoch) if ke == k]
            _check_q(q, k)
            capping = _cap(q, k)
            scale = torch.stack([capping.remaining, capping.total], dim=1)  # (B, 2), once per k
            for e in epochs:
                if math.prod(grid) != n or keys_per_epoch[e].shape != (b,):
                    raise ValueError(
                        f"sample: q {tuple(q.shape)}, keys {tuple(keys_per_epoch[e].shape)} and "
                        f"grid {grid} disagree"
                    )
                scales[e] = scale
            if k == n:  # the dense case: every point, weight 1
                for e in epochs:
                    out[e] = torch.arange(k, device=q.device).expand(b, k).clone()
                continue
            shared = self._shared(q, capping, grid)
            for group in epoch_passes(epochs, b, n):
                keys = torch.cat([keys_per_epoch[e] for e in group])  # (len(group) * B,)
                drawn = self._draw(shared, k, keys, grid)  # (len(group) * B, k)
                for i, e in enumerate(group):
                    out[e] = drawn[i * b : (i + 1) * b]
        return EpochDraws(out, torch.stack(scales, dim=1))

    def _probabilities(self, fields: torch.Tensor, periodic: Sequence[bool]) -> torch.Tensor:
        raise NotImplementedError

    def _shared(self, q: torch.Tensor, capping: _Capping, grid: tuple[int, ...]) -> Shared:
        """What every epoch's draw of k points from q shares (B rows), computed once per k from
        q and its capping for that k."""
        raise NotImplementedError

    def _draw(
        self, shared: Shared, k: int, keys: torch.Tensor, grid: tuple[int, ...]
    ) -> torch.Tensor:
        """k ascending indices for each key (R, k); row r of a pass uses row r % B of ``shared``."""
        raise NotImplementedError


def _per_snapshot(q: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
    """A grid-only q (N,) repeated for each snapshot of fields: (B, N)."""
    return q.expand(fields.shape[0], -1).clone()


def _require_q(q: torch.Tensor, expected: torch.Tensor, kind: str) -> None:
    """A grid-only sampler's draw has the inclusion probabilities of its own q only."""
    if not torch.equal(q, expected.expand_as(q)):
        raise ValueError(
            f"{kind}: q is not this sampler's distribution, so weights would not match the draw"
        )


class _GridSampler(Sampler[None]):
    """A sampler whose q depends on the grid only, the same for every snapshot."""

    def grid_q(self, grid: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """q (N,) float32 of every snapshot on ``grid``."""
        raise NotImplementedError

    def _probabilities(self, fields: torch.Tensor, periodic: Sequence[bool]) -> torch.Tensor:
        return _per_snapshot(self.grid_q(tuple(fields.shape[2:]), fields.device), fields)

    def _shared(self, q: torch.Tensor, capping: _Capping, grid: tuple[int, ...]) -> None:
        """Nothing: the draw depends on the keys and the grid only, once q is this sampler's."""
        _require_q(q, self.grid_q(grid, q.device), self.kind)


class UniformSampler(_GridSampler):
    """k distinct points uniformly at random: the k smallest of per-point hash values."""

    kind = "uniform"

    def grid_q(self, grid: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """q = 1/N for every point (N,) float32."""
        n = math.prod(grid)
        return torch.full((n,), 1.0 / n, dtype=torch.float32, device=device)

    def _draw(
        self, shared: None, k: int, keys: torch.Tensor, grid: tuple[int, ...]
    ) -> torch.Tensor:
        return _smallest_k(keys, math.prod(grid), k, _STREAM_UNIFORM).sort(dim=1).values


class _BlockLayout(NamedTuple):
    block_of: torch.Tensor  # (N,) int64, block id of each flat grid index
    sizes: torch.Tensor  # (nblocks,) int64, points per block


def _axis_blocks(n: int, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an axis of n points into max(1, n // b) blocks of near-equal size (>= b when b <= n)."""
    m = max(1, n // b)
    sizes = torch.full((m,), n // m, dtype=torch.int64, device=device)
    sizes[: n % m] += 1
    ends = sizes.cumsum(0)
    block = torch.searchsorted(ends, torch.arange(n, device=device), right=True)  # (n,)
    return block, sizes


def _block_layout(
    grid: tuple[int, ...], block: Sequence[int], device: torch.device
) -> _BlockLayout:
    block_of = torch.zeros((), dtype=torch.int64, device=device)
    sizes = torch.ones((), dtype=torch.int64, device=device)
    for n, b in zip(grid, block, strict=True):  # C order: later axes vary fastest
        axis_block, axis_sizes = _axis_blocks(n, b, device)
        block_of = block_of[..., None] * len(axis_sizes) + axis_block
        sizes = sizes[..., None] * axis_sizes
    return _BlockLayout(block_of.reshape(-1), sizes.reshape(-1))


class StratifiedSampler(_GridSampler):
    """Equal allocation over blocks of the grid, uniform within a block.

    Each block gets floor(k / nblocks) points and the k mod nblocks extra points go to blocks
    chosen uniformly without replacement, so a block expects k / nblocks points and
    pi_i = k / (nblocks * n_block(i)) = k q_i. A grid axis of n points that the block length b does
    not divide is cut into n // b blocks of near-equal size (b or more points each). A k that would
    put more points in a block than it holds is an error.
    """

    kind = "stratified"

    def __init__(self, block: Sequence[int] | None = None, beta: float = 1.0) -> None:
        super().__init__(beta)
        self.block = None if block is None else tuple(block)

    def _layout(self, grid: tuple[int, ...], device: torch.device) -> _BlockLayout:
        block = DEFAULT_BLOCK.get(len(grid)) if self.block is None else self.block
        if block is None or len(block) != len(grid):
            raise ConfigError(
                f"option 'sampler.block': expected {len(grid)} block lengths for grid {grid}, got {block!r}"
            )
        return _block_layout(grid, block, device)

    def grid_q(self, grid: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """q_i = 1 / (nblocks * n_block(i)) (N,) float32: each block holds 1/nblocks of the mass."""
        layout = self._layout(grid, device)
        return (1.0 / (len(layout.sizes) * layout.sizes[layout.block_of].double())).float()

    def _draw(
        self, shared: None, k: int, keys: torch.Tensor, grid: tuple[int, ...]
    ) -> torch.Tensor:
        block_of, sizes = self._layout(grid, keys.device)
        nblocks = len(sizes)
        base, extra = divmod(k, nblocks)
        most = base + (extra > 0)
        if most > int(sizes.min()):
            raise ValueError(
                f"stratified: k={k} over {nblocks} blocks puts {most} points in a block of "
                f"{int(sizes.min())}; use a smaller ratio or larger sampler.block"
            )
        extra_blocks = _random_order(keys, nblocks, _STREAM_EXTRA_BLOCKS)[:, :extra]  # (B, extra)
        count = torch.full((len(keys), nblocks), base, dtype=torch.int64, device=keys.device)
        count.scatter_(1, extra_blocks, base + 1)  # (B, nblocks)
        # Visit the points block by block, in random order within a block: the sort key is the
        # block id in the high bits and random bits below; take the first count[b] of block b.
        block_bits = max(1, (nblocks - 1).bit_length())
        rand = random_bits(keys, len(block_of), _STREAM_WITHIN_BLOCK) >> block_bits
        order = torch.sort((block_of << (63 - block_bits)) | rand, dim=1, stable=True).indices
        block_at = torch.repeat_interleave(torch.arange(nblocks, device=keys.device), sizes)  # (N,)
        rank_in_block = (
            torch.arange(len(block_of), device=keys.device) - (sizes.cumsum(0) - sizes)[block_at]
        )
        picked = rank_in_block < count[:, block_at]  # (B, N) in visiting order
        return _mask_to_indices(_scatter_picks(order, picked), k)


def _derivative(u: torch.Tensor, dim: int, periodic: bool) -> torch.Tensor:
    """du/dx along dim of a grid with coordinates in [0, 1] (spacing 1/n), central differences;
    periodic wraps around, otherwise one-sided at the two boundaries."""
    n = u.shape[dim]
    if periodic:
        return (u.roll(-1, dim) - u.roll(1, dim)) * (0.5 * n)
    return torch.gradient(u, dim=dim, edge_order=1)[0] * n


def _sqrt_rounded(t: torch.Tensor) -> torch.Tensor:
    """sqrt of a float32 tensor, correctly rounded (the IEEE result), the same bits on every device.

    torch's CPU sqrt is vectorised with an approximation that misses the correctly rounded float
    by one unit in about 1 in 6 values (AVX2, torch 2.13), while CUDA rounds correctly. One exact
    correction step fixes the guess: a midpoint m between two adjacent floats has at most 25
    significant bits, so m * m is exact in float64, and t > m^2 decides which side the true root
    lies on (it never equals a midpoint)."""
    y = t.sqrt()  # within one unit of the correctly rounded root
    up = torch.nextafter(y, torch.full_like(y, math.inf))
    down = torch.nextafter(y, torch.zeros_like(y))
    t64, y64 = t.double(), y.double()
    hi = (y64 + up.double()) * 0.5  # exact
    lo = (y64 + down.double()) * 0.5
    y = torch.where(t64 > hi * hi, up, y)
    return torch.where((t64 < lo * lo) & (down < y), down, y)


def gradient_magnitude(fields: torch.Tensor, periodic: Sequence[bool]) -> torch.Tensor:
    """|grad u| (B, N) float32: sqrt of the sum of squared derivatives over channels and axes,
    correctly rounded on every device."""
    grid = fields.shape[2:]
    if min(grid) < 2:
        raise ValueError(f"gradient: every grid axis needs >= 2 points, got grid {tuple(grid)}")
    total = torch.zeros_like(fields[:, 0])  # (B, *grid)
    for axis, wraps in enumerate(periodic):
        d = _derivative(fields, 2 + axis, bool(wraps))  # (B, C, *grid)
        for c in range(fields.shape[1]):  # a fixed summation order: same bits on every device
            total = total + d[:, c] * d[:, c]
    return _sqrt_rounded(total).reshape(fields.shape[0], -1)


def _pps_units(c: _Capping) -> torch.Tensor:
    """pi in integer units of 2^-32 (B, N): exact total k * UNIT, each <= UNIT, within one unit of pi.

    The running share of the uncapped mass (exact int64) is scaled to units and floored; the floor
    of a nondecreasing sequence is nondecreasing and the last value is exactly remaining * UNIT.
    """
    share = c.mass.cumsum(1).double() / c.total.clamp(min=1)[:, None].double()  # (B, N), ends at 1
    ends = torch.floor(share * (c.remaining * _UNIT)[:, None].double()).to(torch.int64)
    units = torch.diff(ends, dim=1, prepend=torch.zeros_like(ends[:, :1]))
    return units.masked_fill(c.capped, _UNIT)


ALPHA_EXPECTED = (
    "a number in (0, 1] ([0.2, 1] is sensible): alpha = 0 gives points with zero gradient no "
    "chance of being drawn, so the weighted loss is biased"
)


def _check_alpha(alpha: object, option: str = "sampler.alpha") -> None:
    """alpha in (0, 1], or one ConfigError naming the option."""
    in_range = isinstance(alpha, int | float) and not isinstance(alpha, bool) and 0.0 < alpha <= 1.0
    check(in_range, option, ALPHA_EXPECTED, alpha)


def _focus(s: torch.Tensor) -> torch.Tensor:
    """A non-negative score (B, N) as a distribution s / sum(s) (B, N) float64, its sum exact in
    fixed point whatever the batch or device; an all-zero row gives uniform."""
    s = s.double()
    peak = s.amax(1, keepdim=True)
    share = torch.where(peak > 0, s / peak.clamp(min=1e-300), 1.0)
    fixed = _fixed_point(share)
    return fixed.double() / fixed.sum(1, keepdim=True).double()


class _PPSSampler(Sampler[torch.Tensor]):
    """Draws a fixed-size set with exact inclusion probabilities from any per-snapshot q.

    Randomised systematic PPS (Hartley & Rao 1962) over pi = inclusion_probabilities(q, k): the
    points are visited in a random order from the key, pi is laid out on a line in integer units,
    and the k points u, u + 1, ..., u + k - 1 (one random offset u) pick the points whose stretch
    they fall in. Each point is picked with probability pi_i (to 2^-32) and exactly k distinct
    points come out. The random order makes sets vary across epochs, where a fixed order would
    only shift one lattice.
    """

    def _shared(self, q: torch.Tensor, capping: _Capping, grid: tuple[int, ...]) -> torch.Tensor:
        """pi in units (B, N) int64, summing to k * _UNIT, each <= _UNIT: from the capping."""
        return _pps_units(capping)

    def _order(self, keys: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """The order the points are laid out in (R, N): random."""
        return _random_order(keys, math.prod(grid), _STREAM_PPS_ORDER)

    def _draw(
        self, shared: torch.Tensor, k: int, keys: torch.Tensor, grid: tuple[int, ...]
    ) -> torch.Tensor:
        units = shared.repeat(len(keys) // len(shared), 1)  # (R, N): the pass's epochs
        order = self._order(keys, grid)
        ends = units.gather(1, order).cumsum(1)  # exact
        # one random offset per snapshot, (B, 1) in [0, UNIT)
        offset = random_bits(keys, 1, _STREAM_PPS_OFFSET) >> (63 - _UNIT_BITS)
        # number of the points offset + j * UNIT (j >= 0) below each end: ceil((end - offset) / UNIT)
        passed = (ends - offset + (_UNIT - 1)) >> _UNIT_BITS
        picked = torch.diff(passed, dim=1, prepend=torch.zeros_like(passed[:, :1])) > 0
        return _mask_to_indices(_scatter_picks(order, picked), k)


class GradientSampler(_PPSSampler):
    """Importance sampling towards sharp features: q = alpha/N + (1 - alpha) |grad u| / sum |grad u|,
    drawn by systematic PPS (:class:`_PPSSampler`).

    alpha in (0, 1] is the uniform share: every point has q >= alpha/N and each weight is at most
    1/alpha. alpha in [0.2, 1] is sensible; alpha = 0 is refused, since it would never draw points
    with zero gradient and so bias the weighted loss. An all-zero gradient gives uniform q.
    """

    kind = "gradient"

    def __init__(self, alpha: float = 0.3, beta: float = 1.0) -> None:
        super().__init__(beta)
        _check_alpha(alpha)
        self.alpha = alpha

    def _probabilities(self, fields: torch.Tensor, periodic: Sequence[bool]) -> torch.Tensor:
        focus = _focus(gradient_magnitude(fields, periodic))  # (B, N)
        n = focus.shape[1]
        return (self.alpha / n + (1.0 - self.alpha) * focus).float()


@dataclass
class ErrorImportance:
    """How a model's per-point error becomes the sampling distribution of an adaptive layer:
    q = alpha/N + (1 - alpha) [(1 - mix) e^power / sum e^power + mix |grad u| / sum |grad u|],
    with e the per-point squared error of the loss being trained."""

    # exponent on the squared error. 0.5: q ~ |residual|, which minimises the variance of the
    # gradient estimate when the residual's parameter gradients are alike across points (the
    # gradient of r^2 is 2 r dr); 1.0 minimises the variance of the loss estimate instead. On
    # NS 2D both gave the same gradient variance from a fresh model and 0.5 the lower one from
    # a model some epochs old, as between refreshes (docs/bench_adaptive.md)
    power: float = 0.5
    alpha: float = 0.3  # uniform share, in (0, 1]: every weight is at most 1/alpha
    mix: float = 0.0  # share of gradient importance (|grad u| of the target) mixed in, in [0, 1]
    # lay the points out block by block (blocks of 16 in 1D, 8x8 in 2D, 4x4x4 in 3D, in random
    # order, random within a block) for the systematic draw: each block then gets its expected
    # number of points to within one, spreading the set over space; false: a random order
    stratify: bool = True

    def __post_init__(self) -> None:
        check(
            isinstance(self.power, int | float) and 0 < self.power <= 4,
            "adaptive.power",
            "a number in (0, 4] (0.5: proportional to the residual)",
            self.power,
        )
        _check_alpha(self.alpha, "adaptive.alpha")
        check(0.0 <= self.mix <= 1.0, "adaptive.mix", "a number in [0, 1]", self.mix)


class ErrorSampler(_PPSSampler):
    """Adaptive sets: q from a model's per-point error (:class:`ErrorImportance`), drawn by
    systematic PPS like the gradient sampler, so the same exact weights w = k / (N pi) apply."""

    kind = "error"

    def __init__(self, importance: ErrorImportance, beta: float = 1.0) -> None:
        super().__init__(beta)
        self.importance = importance

    def error_probabilities(
        self, error: torch.Tensor, fields: torch.Tensor | None, periodic: Sequence[bool]
    ) -> torch.Tensor:
        """q (B, N) float32 from the per-point error (B, N) >= 0 and, when ``mix`` > 0, the
        normalised target fields (B, C, *grid) whose gradient is mixed in."""
        if error.ndim != 2 or not bool(torch.isfinite(error).all()) or bool((error < 0).any()):
            raise ValueError("error: expected finite, non-negative per-point errors (B, N)")
        cfg = self.importance
        focus = _focus(error.double().pow(cfg.power))
        if cfg.mix > 0:
            if fields is None:
                raise ValueError("error importance with mix > 0 needs the target fields")
            _check_fields(fields, periodic)
            focus = (1 - cfg.mix) * focus + cfg.mix * _focus(gradient_magnitude(fields, periodic))
        n = error.shape[1]
        return (cfg.alpha / n + (1.0 - cfg.alpha) * focus).float()

    def _probabilities(self, fields: torch.Tensor, periodic: Sequence[bool]) -> torch.Tensor:
        raise ValueError("error sets are computed from a model's error: use error_probabilities")

    def _order(self, keys: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Block by block (blocks in a random order, points in a random order within a block)
        when ``stratify``: systematic sampling along it is implicitly stratified over the blocks,
        and the inclusion probabilities stay exactly pi, as for any order drawn apart from u."""
        if not self.importance.stratify:
            return super()._order(keys, grid)
        block_of, sizes = _block_layout(grid, DEFAULT_BLOCK[len(grid)], keys.device)
        nblocks = len(sizes)
        rank = torch.argsort(_random_order(keys, nblocks, _STREAM_PPS_BLOCKS), dim=1)  # (R, nb)
        block_bits = max(1, (nblocks - 1).bit_length())
        rand = random_bits(keys, len(block_of), _STREAM_PPS_ORDER) >> block_bits
        return torch.sort(
            (rank[:, block_of] << (63 - block_bits)) | rand, dim=1, stable=True
        ).indices


# ---------------------------------------------------------------------------------------------
# Config, registry and the one call the pipeline makes.

_FACTORIES: dict[str, Callable[[SamplerConfig], Sampler]] = {
    "uniform": lambda cfg: UniformSampler(beta=cfg.beta),
    "stratified": lambda cfg: StratifiedSampler(block=cfg.block, beta=cfg.beta),
    "gradient": lambda cfg: GradientSampler(alpha=cfg.alpha, beta=cfg.beta),
}
SAMPLER_KINDS = tuple(_FACTORIES)


@dataclass
class SamplerConfig:
    """Which sampler draws the query sets. alpha: gradient's uniform share, in (0, 1]; beta: weight
    exponent, in [0, 1]; block: stratified block lengths per grid axis (default 16 in 1D, 8x8 in
    2D, 4x4x4 in 3D)."""

    kind: Literal["uniform", "stratified", "gradient"] = "uniform"
    alpha: float = 0.3
    beta: float = 1.0
    block: list[int] | None = None

    def __post_init__(self) -> None:
        check(self.kind in _FACTORIES, "sampler.kind", f"one of {list(SAMPLER_KINDS)}", self.kind)
        _check_alpha(self.alpha)
        check(
            0.0 <= self.beta <= 1.0, "sampler.beta", "a number in [0, 1] (1 = unbiased)", self.beta
        )
        check(
            self.block is None
            or (len(self.block) > 0 and all(isinstance(b, int) and b >= 1 for b in self.block)),
            "sampler.block",
            "null or a list of positive integers, one per grid axis",
            self.block,
        )


def make_sampler(cfg: SamplerConfig) -> Sampler:
    """The sampler a config names."""
    check(cfg.kind in _FACTORIES, "sampler.kind", f"one of {list(SAMPLER_KINDS)}", cfg.kind)
    return _FACTORIES[cfg.kind](cfg)


def sample_query_sets(
    sampler: Sampler,
    q: torch.Tensor,
    k: int,
    seed: int,
    snapshot_ids: torch.Tensor | Sequence[int],
    epoch: int,
    grid: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's query sets: indices (B, k) int64 ascending and weights (B, k) float32.

    The key of each snapshot is (seed, snapshot id, epoch); k == N gives every point with weight 1.
    """
    keys = snapshot_keys(seed, snapshot_ids, epoch, device=q.device)
    indices = sampler.sample(q, k, keys, grid)
    return indices, weights(q, k, indices, sampler.beta)
