"""Counter-based deterministic randomness: every random draw is a pure function of a key.

A key is derived from (seed, snapshot id, epoch) only -- never from global RNG state, worker id,
rank or the composition of a batch -- so the same config and data give byte-identical query sets
on any machine and with any number of workers.

The hash is splitmix64 (Steele, Lea & Flood 2014) written in torch int64 ops: multiplication wraps
modulo 2^64 and xor/and/shift are exact on both CPU and CUDA, so the streams are bit-identical on
every device. torch's ``>>`` on int64 is arithmetic, so logical shifts mask off the sign bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``value``."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


GOLDEN_GAMMA = _signed(0x9E3779B97F4A7C15)  # splitmix64's increment: 2^64 / golden ratio
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 ``x``: the arithmetic shift with the copied sign bits masked off."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection of 64-bit values with good avalanche (int64 in, int64 out)."""
    return _mix64_(x.clone())


def _mix64_(x: torch.Tensor) -> torch.Tensor:
    """:func:`mix64` in place, with one scratch tensor: the random streams of a build are
    (snapshots x grid points) large, and each out-of-place step would allocate another."""
    scratch = torch.empty_like(x)
    for shift, multiplier in ((30, _MUL1), (27, _MUL2), (31, None)):
        torch.bitwise_right_shift(x, shift, out=scratch)
        scratch &= (1 << (64 - shift)) - 1  # a logical shift: the copied sign bits masked off
        x ^= scratch
        if multiplier is not None:
            x *= multiplier
    return x


def _absorb(h: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """Fold ``value`` into hash state ``h``: step and mix the state, xor the value, mix again.

    Injective in ``value`` for a fixed ``h``, and the order of folded values matters.
    """
    return mix64(mix64(h + GOLDEN_GAMMA) ^ value)


def _check_int64(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not -(1 << 63) <= value < 1 << 63:
        raise ValueError(f"{name}: expected a 64-bit signed integer, got {value!r}")


def snapshot_keys(
    seed: int,
    snapshot_ids: torch.Tensor | Sequence[int],
    epoch: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One int64 key per snapshot, a pure function of (seed, snapshot id, epoch): (B,) int64."""
    return epoch_keys(seed, snapshot_ids, [epoch], device)[0]


def epoch_keys(
    seed: int,
    snapshot_ids: torch.Tensor | Sequence[int],
    epochs: Sequence[int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The keys of several epochs at once, (E, B) int64: row e is the snapshots' keys of
    ``epochs[e]``. One pass of elementwise ops over all epochs, where a loop over epochs would
    launch the same small kernels E times (the build plans every epoch of a shard together)."""
    _check_int64("seed", seed)
    for epoch in epochs:
        _check_int64("epoch", epoch)
    ids = torch.as_tensor(snapshot_ids, dtype=torch.int64, device=device).reshape(-1)  # (B,)
    h = _absorb(_absorb(torch.zeros_like(ids), seed), ids)  # (B,)
    column = torch.tensor(list(epochs), dtype=torch.int64, device=ids.device)[:, None]  # (E, 1)
    return _absorb(h.expand(len(column), -1), column)  # (E, B)


def random_bits(keys: torch.Tensor, n: int, stream: int = 0) -> torch.Tensor:
    """n independent 63-bit values per key, non-negative int64 (B, n).

    Value i of a row is splitmix64's output number i+1 from the state (key, stream); ``stream``
    separates independent draws made with the same key.
    """
    _check_int64("stream", stream)
    state = _absorb(keys.reshape(-1, 1), stream)  # (B, 1)
    counter = torch.arange(1, n + 1, dtype=torch.int64, device=keys.device)  # (n,)
    bits = _mix64_(counter * GOLDEN_GAMMA + state)  # (B, n), a fresh tensor mixed in place
    bits >>= 1
    return bits.bitwise_and_((1 << 63) - 1)


def uniform(keys: torch.Tensor, n: int, stream: int = 0) -> torch.Tensor:
    """n independent uniforms in [0, 1) per key, float64 (B, n), exact multiples of 2^-53."""
    top53 = random_bits(keys, n, stream) >> 10  # non-negative, so the arithmetic shift is logical
    return top53.to(torch.float64) * 2.0**-53
