"""Query-set codec: exact round trips, and bytes against the entropy bound."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.query_codec import (
    bitmask_to_indices,
    decode_index_stack,
    decode_indices,
    encode_index_stack,
    encode_indices,
    entropy_bound_bytes,
    indices_to_bitmask,
)

N = 16384


def random_set(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False)).astype(np.int64)


@pytest.mark.parametrize("k", [0, 1, 2, 100, N // 2, N - 1, N])
def test_round_trip(k: int) -> None:
    idx = random_set(N, k)
    out = decode_indices(encode_indices(idx, N), N)
    assert out.dtype == np.int64 and np.array_equal(out, idx)


@pytest.mark.parametrize("n", [1, 7, 9, 1000])
def test_bitmask_round_trip_for_n_not_a_multiple_of_8(n: int) -> None:
    idx = random_set(n, n // 2 + 1, seed=n)
    mask = indices_to_bitmask(idx, n)
    assert mask.dtype == np.uint8 and mask.shape == ((n + 7) // 8,)
    assert np.array_equal(bitmask_to_indices(mask, n), idx)


def test_stack_round_trip_with_varying_k() -> None:
    sets = [random_set(N, k, seed=k) for k in (64, 4928, 8192, N)]
    assert all(
        np.array_equal(a, b)
        for a, b in zip(decode_index_stack(encode_index_stack(sets, N), N), sets, strict=True)
    )
    square = np.stack([random_set(1000, 300, seed=s) for s in range(5)])  # an (E, k) array
    assert np.array_equal(
        np.stack(decode_index_stack(encode_index_stack(square, 1000), 1000)), square
    )


def test_bytes_within_1_5x_of_the_entropy_bound() -> None:
    for ratio in (0.05, 0.1, 0.3, 0.5):
        k = round(ratio * N)
        size = np.mean([len(encode_indices(random_set(N, k, seed=s), N)) for s in range(3)])
        bound = entropy_bound_bytes(N, k)
        print(f"ratio {ratio}: {size:.0f} bytes, bound {bound:.0f}, {size / bound:.3f}x")
        assert size <= 1.5 * bound


def test_entropy_bound_values() -> None:
    assert entropy_bound_bytes(N, 0) == 0 and entropy_bound_bytes(N, N) == 0
    assert entropy_bound_bytes(8, 4) == pytest.approx(np.log2(70) / 8)
    assert entropy_bound_bytes(N, N // 2) == pytest.approx(
        (N - 0.5 * np.log2(np.pi * N / 2)) / 8, rel=1e-6
    )


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="distinct"):
        indices_to_bitmask([1, 1, 2], 10)
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        indices_to_bitmask([3, 10], 10)
    with pytest.raises(ValueError, match="expected 2 bytes"):
        bitmask_to_indices(np.zeros(3, np.uint8), 10)
    with pytest.raises(ValueError, match="beyond N=10"):
        bitmask_to_indices(np.array([0, 0b00100000], np.uint8), 10)
