"""Hostile sampling inputs: a clear error up front, or weights that match the draw exactly.

The weights of a drawn set follow from q at its k points and the stored scale
(``weights_from_scale``); they must equal (k / (N pi))**beta with pi from the full capping
(``inclusion_probabilities``) in every case: capping that takes all k points, a point capped just
below 1, k == N, q with zeros, beta = 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import BUILD, run_tool

from pipeline.config import ConfigError, from_dict
from pipeline.keys import snapshot_keys
from pipeline.samplers import (
    GradientSampler,
    SamplerConfig,
    StratifiedSampler,
    inclusion_probabilities,
    inclusion_scale,
    sample_query_sets,
    weights,
    weights_from_scale,
)

BETAS = (1.0, 0.5, 0.0)


def expected_weights(q: torch.Tensor, k: int, idx: torch.Tensor, beta: float) -> np.ndarray:
    """(k / (N pi))**beta from the full capping, at the drawn points, float32."""
    pi = inclusion_probabilities(q, k).gather(1, idx).numpy()
    return np.power((k / q.shape[1]) / pi, beta).astype(np.float32)


def draw_and_check(q: torch.Tensor, k: int, beta: float = 1.0) -> tuple[torch.Tensor, np.ndarray]:
    """Draw k points per row with the PPS draw and check the weights of the stored scale."""
    n = q.shape[1]
    idx = GradientSampler().sample(q, k, snapshot_keys(3, range(len(q)), 0), (n,))
    pi = inclusion_probabilities(q, k)
    assert (pi.gather(1, idx) > 0).all(), "a draw holds a point it can never draw"
    assert (pi == 1).sum(1).le(k).all()
    capped_drawn = (pi == 1).gather(1, idx).sum(1)
    assert torch.equal(capped_drawn, (pi == 1).sum(1)), "a draw misses a capped point"
    scale = inclusion_scale(q, k).numpy()
    assert scale.shape == (len(q), 2) and (scale >= 0).all() and (scale[:, 0] <= k).all()
    w = weights_from_scale(q.gather(1, idx).numpy(), n, k, scale, beta)
    assert w.dtype == np.float32 and np.isfinite(w).all()
    np.testing.assert_array_equal(w, expected_weights(q, k, idx, beta))
    assert np.array_equal(weights(q, k, idx, beta).numpy(), w)
    return idx, w


# ---------------------------------------------------------------------------------------------
# alpha = 0 is refused up front.


@pytest.mark.parametrize("alpha", [0, 0.0, -0.0])
def test_alpha_zero_is_refused_with_the_option_named(alpha: float) -> None:
    for make in (
        lambda: SamplerConfig(kind="gradient", alpha=alpha),
        lambda: from_dict(SamplerConfig, {"kind": "gradient", "alpha": alpha}),
        lambda: GradientSampler(alpha=alpha),
    ):
        with pytest.raises(ConfigError) as err:
            make()
        message = str(err.value)
        assert message.startswith("option 'sampler.alpha': expected a number in (0, 1]")
        assert "zero gradient" in message and "biased" in message


@pytest.mark.parametrize("alpha", [True, "0.3", None, float("inf"), float("nan"), 1.0001])
def test_alpha_not_a_number_in_range_is_refused(alpha) -> None:
    with pytest.raises(ConfigError, match=r"option 'sampler\.alpha'"):
        GradientSampler(alpha=alpha)


def test_smallest_alpha_still_works() -> None:
    f = torch.zeros(2, 1, 64)
    f[:, 0, 30:] = 1.0  # a step: nonzero gradient at two points only
    q = GradientSampler(alpha=1e-6).probabilities(f, [False])
    assert (q > 0).all()
    for beta in BETAS:
        draw_and_check(q, 8, beta)


def test_build_cli_refuses_alpha_zero_and_writes_nothing(burgers_file, tmp_path) -> None:
    out = tmp_path / "out"
    args = [f"data.path={burgers_file}", f"out={out}", "device=cpu", "progress=false"]
    proc = run_tool(BUILD, *args, "sampler.kind=gradient", "sampler.alpha=0")
    assert proc.returncode == 2, proc.stderr
    assert "error: option 'sampler.alpha'" in proc.stderr
    assert "(0, 1]" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------------
# Capping that takes all k points, and capped points near the threshold.


def test_capping_that_takes_all_k_points() -> None:
    """Exactly k points with positive q: each is capped (pi = 1), remaining = 0, and the stored
    scale is [0, 0]; the weights are k/N, not an error or a division by zero."""
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.25, 0.25, 0.5]])
    assert inclusion_probabilities(q, 2).tolist() == [[1, 1, 0, 0], [0, 0.5, 0.5, 1]]
    assert inclusion_probabilities(q[1:], 3).tolist() == [[0, 1, 1, 1]]
    assert inclusion_scale(q[:1], 2).tolist() == [[0, 0]]
    assert inclusion_scale(q[1:], 3).tolist() == [[0, 0]]
    for beta in BETAS:
        idx, w = draw_and_check(q[:1], 2, beta)
        assert idx.tolist() == [[0, 1]] and np.array_equal(w, np.float32([[0.5**beta] * 2]))
        idx, w = draw_and_check(q[1:], 3, beta)
        assert idx.tolist() == [[1, 2, 3]] and np.array_equal(w, np.float32([[0.75**beta] * 3]))


def test_capping_that_takes_all_k_points_with_a_tiny_rest() -> None:
    """The rest of q is too small to matter (pi within 2^-24 of 1 counts as 1): remaining = 0 but
    the uncapped mass is positive; those points get pi = 0 and are never drawn."""
    q = torch.tensor([[0.5, 0.5, 1e-9, 1e-9, 0.0]], dtype=torch.float64)
    q = q / q.sum()
    scale = inclusion_scale(q, 2)
    assert scale[0, 0] == 0 and scale[0, 1] > 0
    assert inclusion_probabilities(q, 2)[0].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    for beta in BETAS:
        idx, _ = draw_and_check(q.expand(16, -1), 2, beta)
        assert (idx == torch.tensor([0, 1])).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_point_capped_just_below_one(dtype: torch.dtype) -> None:
    """2 q_0 = 1 - 2^-24 + 2^-40 is capped, and the redistribution lowers the scale so that
    remaining * fixed(q_0) / total falls below the cap again: it must still weigh as pi = 1."""
    a = (1 - 2**-24 + 2**-40) / 2
    q = torch.tensor([[a, (1 - a) / 2, (1 - a) / 2]], dtype=torch.float64).to(dtype)
    assert inclusion_probabilities(q, 2)[0, 0] == 1
    for beta in BETAS:
        draw_and_check(q.expand(64, -1), 2, beta)


def test_many_capped_points_and_zeros_random() -> None:
    """Heavy-tailed q with zeros on many row lengths and every k: weights equal exactly."""
    gen = torch.Generator().manual_seed(0)
    for n in (3, 5, 17, 64):
        raw = torch.rand((32, n), generator=gen, dtype=torch.float64) ** 12
        raw[torch.rand((32, n), generator=gen) < 0.25] = 0
        raw[:, 0] += 1e-3  # at least one positive point per row
        q = (raw / raw.sum(1, keepdim=True)).float().double()
        q = q / q.sum(1, keepdim=True)
        # q below 2^-(F+1) is 0 in the fixed point, so it never counts as positive
        positive = int((inclusion_probabilities(q, 1) > 0).sum(1).min())
        for k in range(1, positive + 1):
            draw_and_check(q, k, 1.0)


def test_stratified_blocks_taken_whole() -> None:
    """k = 68 on 70 points in blocks of 18, 18, 17, 17: the small blocks are taken whole (pi = 1)."""
    sampler = StratifiedSampler()
    q = sampler.probabilities(torch.zeros(4, 1, 70), [False])
    pi = inclusion_probabilities(q, 68)
    assert int((pi == 1).sum(1)[0]) == 34
    idx, w = sample_query_sets(sampler, q, 68, 0, range(4), 0, (70,))
    np.testing.assert_array_equal(w.numpy(), expected_weights(q, 68, idx, 1.0))


# ---------------------------------------------------------------------------------------------
# k == N, q with zeros, beta = 0, a bad scale.


def test_k_equal_n() -> None:
    q = GradientSampler().probabilities(torch.randn(3, 1, 20), [True])
    idx, w = sample_query_sets(GradientSampler(), q, 20, 0, range(3), 0, (20,))
    assert torch.equal(idx, torch.arange(20).expand(3, -1))
    assert torch.equal(w, torch.ones_like(w))
    assert torch.equal(inclusion_probabilities(q, 20), torch.ones(3, 20, dtype=torch.float64))
    zeros = torch.tensor([[0.5, 0.5, 0.0]])
    with pytest.raises(ValueError, match="fewer than k=3 points with positive probability"):
        sample_query_sets(GradientSampler(), zeros, 3, 0, [0], 0, (3,))


def test_q_with_zeros_never_draws_them() -> None:
    q = torch.zeros(200, 10)
    q[:, 1::2] = 0.2
    for k in (1, 2, 4, 5):
        idx, _ = draw_and_check(q, k)
        assert (idx % 2 == 1).all()
    with pytest.raises(ValueError, match="fewer than k=6"):
        GradientSampler().sample(q, 6, snapshot_keys(0, range(200), 0), (10,))


def test_beta_zero_gives_ones_in_every_case() -> None:
    cases = [
        (torch.tensor([[0.5, 0.5, 0.0, 0.0]]), 2),
        (torch.tensor([[0.7, 0.1, 0.1, 0.1]]), 2),
        (torch.full((1, 8), 1 / 8), 8),
    ]
    for q, k in cases:
        _, w = draw_and_check(q, k, 0.0)
        assert np.array_equal(w, np.ones_like(w))


def test_bad_scale_is_a_clear_error() -> None:
    q_at = np.full((1, 2), 0.25, dtype=np.float32)
    for scale in ([[3, 10]], [[-1, 10]], [[1, -5]]):
        with pytest.raises(ValueError, match="scale"):
            weights_from_scale(q_at, 4, 2, np.array(scale, dtype=np.int64))
    with pytest.raises(ValueError, match="do not fit k=3"):
        weights_from_scale(q_at, 4, 3, np.array([[1, 10]], dtype=np.int64))
    assert math.isclose(
        float(weights_from_scale(q_at, 4, 2, inclusion_scale(torch.full((1, 4), 0.25), 2))[0, 0]),
        1.0,
    )
