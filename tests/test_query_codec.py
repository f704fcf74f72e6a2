"""Query-set storage: every code round-trips exactly, bad rows are named, and the stored bytes stay
near the entropy bound without compression."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.query_codec import (
    decode_sets,
    encode_sets,
    entropy_bound_bytes,
    pack_bits,
    query_slots,
    row_bytes,
)

N = 16384


def random_sets(n: int, k: int, rows: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(n, k, replace=False)) for _ in range(rows)]).astype(
        np.int64
    )


def round_trip(idx: np.ndarray, n: int) -> np.ndarray:
    slot = query_slots(n, [idx.shape[1]])[0]
    coded = encode_sets(torch.from_numpy(idx), n, slot).numpy()
    assert coded.dtype == np.uint8 and coded.shape == (len(idx), slot.nbytes)
    return decode_sets(coded, n, idx.shape[1], slot, "test")


@pytest.mark.parametrize("n", [1, 2, 7, 9, 64, 1000, N])
@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.1, 0.2, 0.25, 0.3, 0.5, 0.6, 0.9, 0.99, 1.0])
def test_every_code_round_trips(n: int, ratio: float) -> None:
    k = min(n, max(1, round(ratio * n)))
    idx = random_sets(n, k, seed=n + k)
    out = round_trip(idx, n)
    assert out.dtype == np.int64 and np.array_equal(out, idx)


def test_codes_by_ratio() -> None:
    """Elias-Fano for sparse sets, the bitmask in the middle, the complement above N/2, none
    for a dense epoch."""
    ks = [164, 1638, 4096, 8192, 12288, 14746, N]
    codes = [(s.code, s.complement) for s in query_slots(N, ks)]
    assert codes == [
        ("elias-fano", False),
        ("elias-fano", False),
        ("bitmask", False),
        ("bitmask", False),
        ("bitmask", True),
        ("elias-fano", True),
        ("dense", False),
    ]
    slots = query_slots(N, ks)
    assert [s.offset for s in slots] == list(np.cumsum([0] + [s.nbytes for s in slots[:-1]]))
    assert [s.epoch for s in slots] == list(range(len(ks)))
    assert row_bytes(N, ks) == sum(s.nbytes for s in slots)
    assert slots[-1].nbytes == 0


@pytest.mark.parametrize("n", [1, 7, 9, 1000])
def test_packing_is_numpys(n: int) -> None:
    bits = torch.from_numpy(np.random.default_rng(n).random((3, n)) < 0.5)
    assert np.array_equal(pack_bits(bits).numpy(), np.packbits(bits.numpy(), axis=1))


@pytest.mark.parametrize("k", [30, 300, 700])  # Elias-Fano, bitmask, bitmask of the complement
def test_a_wrong_count_is_named(k: int) -> None:
    n = 1000
    slot = query_slots(n, [k])[0]
    coded = encode_sets(torch.from_numpy(random_sets(n, k)), n, slot).numpy()
    wrong = query_slots(n, [k + 1])[0]
    if wrong.nbytes == slot.nbytes and wrong.code == slot.code:
        with pytest.raises(ValueError, match=r"shard 3: .* hold \[\d+\] points.*k="):
            decode_sets(coded, n, k + 1, wrong, "shard 3")
    bits = np.unpackbits(coded, axis=1)
    last = np.flatnonzero(bits[0])[-1]
    bits[0, last] = 0  # row 0 loses its last set bit
    with pytest.raises(ValueError, match="shard 3: "):
        decode_sets(np.packbits(bits, axis=1), n, k, slot, "shard 3")


def test_elias_fano_rows_that_are_not_sets_are_refused() -> None:
    """Low bits that make two indices equal decode to no set of k distinct points."""
    n, k = 1000, 30
    slot = query_slots(n, [k])[0]
    assert slot.code == "elias-fano"
    idx = random_sets(n, k, rows=1)
    idx[0, 1] = idx[0, 0]  # a duplicate: encodable bits, not a set
    coded = encode_sets(torch.from_numpy(idx), n, slot).numpy()
    with pytest.raises(ValueError, match="not 30 distinct points"):
        decode_sets(coded, n, k, slot, "shard 0")


@pytest.mark.parametrize("n", [4096, N])
def test_stored_bytes_near_the_entropy_bound(n: int) -> None:
    """Fixed-size codes, no compression: <= 1.13x the bound at k/N = 0.1 (and 0.9), <= 1.25x at
    every ratio (the worst near 0.25 and 0.75)."""
    for ratio in (0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.75, 0.9, 0.99):
        k = round(ratio * n)
        size = query_slots(n, [k])[0].nbytes
        limit = 1.13 if ratio in (0.1, 0.9) else 1.25
        assert size <= limit * entropy_bound_bytes(n, k), (ratio, size)


def test_entropy_bound_values() -> None:
    assert entropy_bound_bytes(N, 0) == 0 and entropy_bound_bytes(N, N) == 0
    assert entropy_bound_bytes(8, 4) == pytest.approx(np.log2(70) / 8)
    assert entropy_bound_bytes(N, N // 2) == pytest.approx(
        (N - 0.5 * np.log2(np.pi * N / 2)) / 8, rel=1e-6
    )
    with pytest.raises(ValueError, match="0 <= k <= N"):
        entropy_bound_bytes(10, 11)
