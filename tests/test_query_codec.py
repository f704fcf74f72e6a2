"""Query-set storage: packed bitmasks round-trip exactly, and compress near the entropy bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numcodecs import Zstd

from pipeline.formats.zarr import QUERY_ZSTD_LEVEL
from pipeline.query_codec import entropy_bound_bytes, pack_bits, unpack_indices

N = 16384


def random_sets(n: int, k: int, rows: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(n, k, replace=False)) for _ in range(rows)]).astype(
        np.int64
    )


def masks_of(indices: np.ndarray, n: int) -> torch.Tensor:
    mask = torch.zeros(len(indices), n, dtype=torch.bool)
    return mask.scatter_(1, torch.from_numpy(indices), True)


@pytest.mark.parametrize("k", [1, 2, 100, N // 2, N - 1, N])
def test_round_trip(k: int) -> None:
    idx = random_sets(N, k)
    packed = pack_bits(masks_of(idx, N)).numpy()
    assert packed.dtype == np.uint8 and packed.shape == (3, N // 8)
    out = unpack_indices(packed, N, k, "test")
    assert out.dtype == np.int64 and np.array_equal(out, idx)


@pytest.mark.parametrize("n", [1, 7, 9, 1000])
def test_packing_is_numpys_for_n_not_a_multiple_of_8(n: int) -> None:
    k = n // 2 + 1
    idx = random_sets(n, k, seed=n)
    mask = masks_of(idx, n)
    packed = pack_bits(mask).numpy()
    assert np.array_equal(packed, np.packbits(mask.numpy(), axis=1))
    assert np.array_equal(unpack_indices(packed, n, k, "test"), idx)


def test_a_wrong_count_is_named() -> None:
    packed = pack_bits(masks_of(random_sets(1000, 30), 1000)).numpy()
    with pytest.raises(ValueError, match=r"shard 3: query bitmasks hold \[30\] points.*k=31"):
        unpack_indices(packed, 1000, 31, "shard 3")


def test_zarr_bytes_within_1_5x_of_the_entropy_bound() -> None:
    for ratio in (0.05, 0.1, 0.3, 0.5):
        k = round(ratio * N)
        packed = pack_bits(masks_of(random_sets(N, k), N)).numpy()
        size = np.mean([len(Zstd(level=QUERY_ZSTD_LEVEL).encode(row)) for row in packed])
        bound = entropy_bound_bytes(N, k)
        print(f"ratio {ratio}: {size:.0f} bytes, bound {bound:.0f}, {size / bound:.3f}x")
        assert size <= 1.5 * bound


def test_entropy_bound_values() -> None:
    assert entropy_bound_bytes(N, 0) == 0 and entropy_bound_bytes(N, N) == 0
    assert entropy_bound_bytes(8, 4) == pytest.approx(np.log2(70) / 8)
    assert entropy_bound_bytes(N, N // 2) == pytest.approx(
        (N - 0.5 * np.log2(np.pi * N / 2)) / 8, rel=1e-6
    )
    with pytest.raises(ValueError, match="0 <= k <= N"):
        entropy_bound_bytes(10, 11)
