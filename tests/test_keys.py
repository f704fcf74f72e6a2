"""Counter-based keys: the torch hash equals a slow pure-Python splitmix64, and keys separate."""

from __future__ import annotations

import pytest
import torch

from pipeline.keys import epoch_keys, random_bits, snapshot_keys, uniform

M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def ref_mix64(x: int) -> int:
    x &= M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def ref_absorb(h: int, value: int) -> int:
    return ref_mix64(ref_mix64(h + GAMMA) ^ (value & M64))


def ref_key(seed: int, snapshot_id: int, epoch: int) -> int:
    return ref_absorb(ref_absorb(ref_absorb(0, seed), snapshot_id), epoch)


def ref_bits(key: int, n: int, stream: int) -> list[int]:
    state = ref_absorb(key, stream)
    return [ref_mix64(state + (i + 1) * GAMMA) >> 1 for i in range(n)]


def as_unsigned(t: torch.Tensor) -> list[int]:
    return [v & M64 for v in t.tolist()]


@pytest.mark.parametrize("seed", [0, 1, 12345, -7, 2**62 + 3])
def test_keys_match_python_reference(seed: int) -> None:
    ids = [0, 1, 2, 999, 2**40 + 5]
    for epoch in (0, 1, 250):
        got = as_unsigned(snapshot_keys(seed, ids, epoch))
        assert got == [ref_key(seed, i, epoch) for i in ids]


def test_epoch_keys_are_each_epochs_snapshot_keys() -> None:
    ids = [0, 1, 5, 2**40, 7]
    epochs = [0, 3, 1, 49, 2**33]
    keys = epoch_keys(11, ids, epochs)
    assert keys.shape == (len(epochs), len(ids)) and keys.dtype == torch.int64
    for row, epoch in zip(keys, epochs, strict=True):
        assert torch.equal(row, snapshot_keys(11, ids, epoch))
    with pytest.raises(ValueError, match="epoch"):
        epoch_keys(11, ids, [0, 2**64])


def test_random_bits_and_uniform_match_python_reference() -> None:
    keys = snapshot_keys(3, [0, 5, 77], epoch=4)
    for stream in (0, 1, 9):
        bits = random_bits(keys, 40, stream)
        for row, key in zip(bits.tolist(), as_unsigned(keys), strict=True):
            assert row == ref_bits(key, 40, stream)
    u = uniform(keys, 40, stream=2)
    expect = [[(b >> 10) * 2.0**-53 for b in ref_bits(key, 40, 2)] for key in as_unsigned(keys)]
    assert u.dtype == torch.float64 and u.tolist() == expect
    assert (u >= 0).all() and (u < 1).all()


def test_keys_separate_seed_snapshot_epoch_and_stream() -> None:
    base = snapshot_keys(0, range(1000), epoch=0)
    assert len(set(base.tolist())) == 1000
    for other in (snapshot_keys(1, range(1000), 0), snapshot_keys(0, range(1000), 1)):
        assert not set(base.tolist()) & set(other.tolist())
    streams = [random_bits(base[:1], 64, s) for s in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not (streams[a] == streams[b]).any()


def test_uniform_is_roughly_uniform() -> None:
    u = uniform(snapshot_keys(0, range(64), 0), 4096).flatten()
    hist = torch.histc(u.float(), bins=16, min=0, max=1)
    expected = u.numel() / 16
    assert ((hist - expected).abs() < 5 * expected**0.5).all()


def test_bad_seed_is_an_error() -> None:
    with pytest.raises(ValueError, match="seed"):
        snapshot_keys(1.5, [0], 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch"):
        snapshot_keys(0, [0], 2**64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bits_equal_cpu_bits() -> None:
    ids = list(range(100))
    cpu = random_bits(snapshot_keys(5, ids, 3), 1000, 2)
    gpu = random_bits(snapshot_keys(5, ids, 3, device="cuda"), 1000, 2)
    assert torch.equal(cpu, gpu.cpu())
