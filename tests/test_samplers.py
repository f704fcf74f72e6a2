"""Samplers: unbiased weighted estimates, exact inclusion probabilities, determinism, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, from_dict
from pipeline.keys import snapshot_keys
from pipeline.samplers import (
    SAMPLER_KINDS,
    ErrorImportance,
    ErrorSampler,
    GradientSampler,
    SamplerConfig,
    StratifiedSampler,
    UniformSampler,
    effective_sample_size,
    gradient_magnitude,
    inclusion_probabilities,
    inclusion_scale,
    make_sampler,
    sample_query_sets,
    weights,
    weights_from_scale,
)

GRIDS = {1: (1000,), 2: (30, 34)}  # blocks do not divide these grids, and N is no power of two


def coords(grid: tuple[int, ...]) -> list[torch.Tensor]:
    axes = [torch.arange(n, dtype=torch.float64) / n for n in grid]
    return list(torch.meshgrid(*axes, indexing="ij"))


def field(name: str, grid: tuple[int, ...]) -> torch.Tensor:
    """A fixed test field (1, 1, *grid) float32: sharp front, smooth wave or white noise."""
    xs = coords(grid)
    slant = xs[0] + (0.3 * xs[1] if len(xs) > 1 else 0.0)
    if name == "front":
        u = torch.tanh(80 * (slant - 0.55))
    elif name == "wave":
        u = 0.5 + torch.sin(2 * math.pi * slant) * torch.cos(2 * math.pi * xs[-1])
    else:
        u = (
            torch.rand(grid, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
            - 1
        )
    return u.float()[None, None]


def estimates(
    sampler, f: torch.Tensor, loss: torch.Tensor, ratio: float, n_keys: int
) -> torch.Tensor:
    """The weighted estimate of mean(loss) for n_keys snapshot keys, (n_keys,) float64."""
    grid = tuple(f.shape[2:])
    q = sampler.probabilities(f, [False] * len(grid)).expand(n_keys, -1)
    k = round(ratio * q.shape[1])
    idx, w = sample_query_sets(
        sampler, q, k, seed=11, snapshot_ids=range(n_keys), epoch=0, grid=grid
    )
    return (w.double() * loss.reshape(-1)[idx]).mean(1)


def samplers() -> list:
    return [UniformSampler(), StratifiedSampler(), GradientSampler(alpha=0.3)]


@pytest.mark.slow
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("name", ["front", "wave", "noise"])
@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.1])
def test_weighted_estimate_is_unbiased(dim: int, name: str, ratio: float) -> None:
    n_keys = 3000
    f = field(name, GRIDS[dim])
    loss = f.double() ** 2  # non-negative, non-constant
    dense = loss.mean().item()
    for sampler in samplers():
        est = estimates(sampler, f, loss, ratio, n_keys)
        tol = 4 * est.std().item() / math.sqrt(n_keys)
        assert tol < 0.01 * dense, (
            f"{sampler.kind}: the test cannot resolve 1 % (tol {tol / dense:.3%})"
        )
        err = abs(est.mean().item() - dense)
        assert err <= max(tol, 1e-6 * dense), (
            f"{sampler.kind}: mean {est.mean():.6f} vs dense {dense:.6f}"
        )


@pytest.mark.slow
def test_gradient_and_stratified_have_lower_variance_on_a_sharp_front() -> None:
    """The loss is the error of a surrogate that smears the front (slope 20 instead of 80)."""
    grid = (48, 48)
    xs = coords(grid)
    slant = xs[0] + 0.3 * xs[1]
    f = torch.tanh(80 * (slant - 0.55)).float()[None, None]
    loss = (torch.tanh(80 * (slant - 0.55)) - torch.tanh(20 * (slant - 0.55))) ** 2
    var = {s.kind: estimates(s, f, loss, 0.1, 1500).var().item() for s in samplers()}
    print("estimator variance at ratio 0.1:", {k: f"{v:.3e}" for k, v in var.items()})
    assert var["gradient"] <= 0.8 * var["uniform"]
    assert var["stratified"] <= 0.8 * var["uniform"]


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_indices_distinct_in_range_sorted(kind: str) -> None:
    grid = (18, 12)
    sampler = make_sampler(SamplerConfig(kind=kind, block=[4, 5]))
    f = field("front", grid).expand(64, -1, -1, -1)
    q = sampler.probabilities(f, [False, True])
    for k in (1, 7, 100, 190):  # stratified fits at most 8 x 24 points in these blocks
        idx = sampler.sample(q, k, snapshot_keys(0, range(64), 3), grid)
        assert idx.shape == (64, k) and idx.dtype == torch.int64
        assert (idx >= 0).all() and (idx < 216).all()
        assert (idx.diff(dim=1) > 0).all()  # sorted and distinct


def test_uniform_coverage_is_flat() -> None:
    """Counts over 2000 epochs of one snapshot: chi-square with N-1 dof, 1e-3 < p < 1 - 1e-3."""
    n, k, epochs = 256, 32, 2000
    keys = torch.cat([snapshot_keys(5, [42], e) for e in range(epochs)])
    q = torch.full((epochs, n), 1.0 / n)
    counts = torch.bincount(
        UniformSampler().sample(q, k, keys, (n,)).flatten(), minlength=n
    ).double()
    expected = epochs * k / n
    chi2 = ((counts - expected) ** 2 / (expected * (1 - k / n))).sum()
    p_value = torch.special.gammaincc(torch.tensor((n - 1) / 2.0), chi2 / 2).item()
    print(f"uniform coverage chi2={chi2:.1f} (dof {n - 1}), p={p_value:.3f}")
    assert 1e-3 < p_value < 1 - 1e-3


@pytest.mark.parametrize(
    ("sampler", "grid"),
    [
        (UniformSampler(), (70,)),
        (StratifiedSampler(), (70,)),  # blocks of 18, 18, 17, 17 points
        (StratifiedSampler(block=[4, 5]), (18, 12)),  # blocks of 30 and 24 points
        (GradientSampler(alpha=0.2), (70,)),
        (GradientSampler(alpha=0.2), (18, 12)),
    ],
)
def test_observed_inclusion_frequencies_match_inclusion_probabilities(sampler, grid) -> None:
    draws, n = 20000, math.prod(grid)
    f = field("front", grid)
    q = sampler.probabilities(f, [False] * len(grid))
    k = n // 4
    pi = inclusion_probabilities(q, k)[0]
    idx = sampler.sample(q.expand(draws, -1), k, snapshot_keys(1, range(draws), 0), grid)
    freq = torch.bincount(idx.flatten(), minlength=n).double() / draws
    assert torch.equal(freq[pi == 1], torch.ones_like(freq[pi == 1]))
    inner = (pi > 0) & (pi < 1)
    z = (freq - pi)[inner] / (pi * (1 - pi) / draws).sqrt()[inner]
    print(f"{sampler.kind} {grid}: max |z| = {z.abs().max():.2f} over {int(inner.sum())} points")
    assert z.abs().max() < 5


def test_gradient_sampler_caps_sharp_points() -> None:
    q = GradientSampler(alpha=0.2).probabilities(field("front", (70,)), [False])
    pi = inclusion_probabilities(q, 17)[0]
    assert (pi == 1).sum() > 0, "the front should saturate some points at this ratio"


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_stored_scale_gives_the_weights(beta: float) -> None:
    """Two integers per snapshot-epoch (the capping's fixed point) and q at the drawn points alone
    give the weights (k / (N pi))**beta of the full capping, capped points and dense epochs
    included."""
    sampler = make_sampler(SamplerConfig(kind="gradient", alpha=0.2))
    q = sampler.probabilities(
        torch.cat([field("front", (30, 34)), field("noise", (30, 34))]), [False, False]
    )
    n = q.shape[1]
    for k in (51, 300, 900):
        idx, _ = sample_query_sets(sampler, q, k, 3, [0, 1], 0, (30, 34))
        scale = inclusion_scale(q, k).numpy()
        w = weights_from_scale(q.gather(1, idx).numpy(), n, k, scale, beta)
        assert w.dtype == np.float32
        pi = inclusion_probabilities(q, k).gather(1, idx).numpy()
        np.testing.assert_allclose(w, ((k / n) / pi) ** beta, rtol=1e-6, atol=0)
    assert (inclusion_probabilities(q, 900) == 1).any(), "the front caps some points at k = 900"
    dense = weights_from_scale(q[:, :5].numpy(), n, n, inclusion_scale(q, n).numpy(), beta)
    assert np.array_equal(dense, np.ones((2, 5), np.float32))


def test_inclusion_probabilities_sum_to_k_and_redistribute_excess() -> None:
    q = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
    pi = inclusion_probabilities(q, 2)
    expect = torch.tensor([[1.0, 0.6, 0.2, 0.2], [1.0, 1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    assert torch.allclose(pi, expect, atol=1e-7)
    q = GradientSampler().probabilities(field("noise", (30, 34)), [True, True])
    for k in (1, 100, 700, 1019, 1020):
        pi = inclusion_probabilities(q, k)
        assert abs(pi.sum().item() - k) < 1e-9 * k and (pi <= 1).all() and (pi > 0).all()
    assert torch.equal(pi, torch.ones_like(pi))  # k == N


def test_uniform_weights_are_exactly_one() -> None:
    q = torch.full((3, 1000), 1e-3)
    for k in (1, 333, 999, 1000):
        idx, w = sample_query_sets(UniformSampler(), q, k, 0, [0, 1, 2], 0, (1000,))
        assert torch.equal(w, torch.ones_like(w))
    assert torch.equal(idx, torch.arange(1000).expand(3, -1))  # k == N: the dense set


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_same_key_same_bytes_and_epochs_differ(kind: str) -> None:
    sampler = make_sampler(SamplerConfig(kind=kind))
    f = torch.cat([field(name, (30, 34)) for name in ("front", "wave", "noise")])
    q = sampler.probabilities(f, [False, False])
    sets = [
        sample_query_sets(sampler, q, 300, 7, [10, 11, 12], epoch, (30, 34))[0]
        for epoch in (0, 0, 1)
    ]
    assert sets[0].numpy().tobytes() == sets[1].numpy().tobytes()
    assert all(not torch.equal(sets[0][i], sets[2][i]) for i in range(3))


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_batched_equals_one_at_a_time(kind: str) -> None:
    sampler = make_sampler(SamplerConfig(kind=kind))
    f = torch.cat([field(name, (30, 34)) for name in ("front", "wave", "noise")])
    q = sampler.probabilities(f, [True, False])
    idx, w = sample_query_sets(sampler, q, 256, 3, [5, 6, 7], 2, (30, 34))
    for i in range(3):
        qi = sampler.probabilities(f[i : i + 1], [True, False])
        assert torch.equal(qi, q[i : i + 1])
        idx_i, w_i = sample_query_sets(sampler, qi, 256, 3, [5 + i], 2, (30, 34))
        assert torch.equal(idx_i[0], idx[i]) and torch.equal(w_i[0], w[i])


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_epochs_drawn_together_equal_epochs_drawn_one_by_one(kind: str, monkeypatch) -> None:
    """sample_epochs (what a build calls) gives each epoch the bytes of its own sample call, for
    a schedule of several k with a dense epoch, also when a pass holds fewer epochs than a k."""
    import pipeline.samplers as samplers_module

    sampler = make_sampler(SamplerConfig(kind=kind))
    f = torch.cat([field(name, (32, 32)) for name in ("front", "wave", "noise")])
    q = sampler.probabilities(f, [True, False])
    ks = [512, 512, 256, 512, 256, 1024, 128]
    keys = [snapshot_keys(3, [5, 6, 7], epoch) for epoch in range(len(ks))]
    alone = [sampler.sample(q, k, key, (32, 32)) for k, key in zip(ks, keys, strict=True)]
    for per_pass in (None, 1024 * 3 * 2):  # default passes, then two epochs per pass
        if per_pass:
            monkeypatch.setattr(samplers_module, "_DRAW_ELEMENTS", per_pass)
        together, scale = sampler.sample_epochs(q, ks, keys, (32, 32))
        assert all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))
        # and each epoch's scale is its k's inclusion_scale, from the one capping per k
        assert scale.shape == (3, len(ks), 2)
        for e, k in enumerate(ks):
            assert torch.equal(scale[:, e], inclusion_scale(q, k))


def test_gradient_weights_bounded_by_one_over_alpha_and_ess_reported() -> None:
    sampler = GradientSampler(alpha=0.25)
    q = sampler.probabilities(field("front", (30, 34)), [False, False]).expand(8, -1)
    _, w = sample_query_sets(sampler, q, 102, 0, range(8), 0, (30, 34))
    assert (w <= 1 / 0.25 + 1e-5).all()
    ess = effective_sample_size(w)
    print(f"gradient sampler ESS at k=102: {ess.mean():.1f}")
    assert (ess <= 102 + 1e-9).all() and (ess > 10).all()
    assert torch.allclose(
        effective_sample_size(torch.ones(2, 50)), torch.full((2,), 50.0, dtype=torch.float64)
    )


def test_beta_zero_gives_unit_weights() -> None:
    sampler = make_sampler(SamplerConfig(kind="gradient", beta=0.0))
    q = sampler.probabilities(field("front", (1000,)), [False])
    _, w = sample_query_sets(sampler, q, 100, 0, [0], 0, (1000,))
    assert torch.equal(w, torch.ones_like(w))


def test_zero_gradient_falls_back_to_uniform() -> None:
    f = torch.full((2, 3, 16, 16), 0.7)
    q = GradientSampler(alpha=0.1).probabilities(f, [False, True])
    assert torch.equal(q, torch.full_like(q, 1 / 256))
    _, w = sample_query_sets(GradientSampler(alpha=0.1), q, 64, 0, [0, 1], 0, (16, 16))
    assert torch.isfinite(w).all() and torch.equal(w, torch.ones_like(w))


@pytest.mark.parametrize("kind", SAMPLER_KINDS)
def test_nan_in_fields_is_a_clear_error(kind: str) -> None:
    f = torch.zeros(4, 1, 8, 8)
    f[2, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf .* \[2\]"):
        make_sampler(SamplerConfig(kind=kind)).probabilities(f, [False, False])


def test_bad_k_alpha_kind_and_blocks() -> None:
    q = torch.full((1, 64), 1 / 64)
    keys = snapshot_keys(0, [0], 0)
    for k in (0, 65, 2.5):
        with pytest.raises(ValueError, match="k: expected an integer"):
            UniformSampler().sample(q, k, keys, (64,))
    for alpha in (-0.1, 0.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"sampler\.alpha"):
            SamplerConfig(kind="gradient", alpha=alpha)
    with pytest.raises(ConfigError, match="'uniform', 'stratified', 'gradient'"):
        from_dict(SamplerConfig, {"kind": "importance"})
    with pytest.raises(ConfigError, match=r"sampler\.block"):
        StratifiedSampler(block=[4, 4]).probabilities(torch.zeros(1, 1, 64), [False])
    strat = StratifiedSampler()
    q70 = strat.probabilities(torch.zeros(1, 1, 70), [False])  # blocks of 18, 18, 17, 17
    with pytest.raises(ValueError, match="puts 18 points in a block of 17"):
        strat.sample(q70, 69, keys, (70,))
    with pytest.raises(ValueError, match="not this sampler's distribution"):
        UniformSampler().sample(q70, 10, keys, (70,))


def test_q_with_too_few_positive_points_is_an_error() -> None:
    q = torch.zeros(1, 64)
    q[0, 29:31] = 0.5  # what alpha = 0 (now refused) made of a step: two positive points
    with pytest.raises(ValueError, match="fewer than k=8 points with positive probability"):
        inclusion_probabilities(q, 8)


def test_weights_reject_indices_outside_the_support() -> None:
    q = torch.zeros(1, 8)
    q[0, :4] = 0.25
    with pytest.raises(ValueError, match="zero inclusion probability"):
        weights(q, 2, torch.tensor([[0, 6]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", SAMPLER_KINDS)
@pytest.mark.parametrize(("grid", "periodic"), [((30, 34), [False, True]), ((1000,), [False])])
def test_cuda_equals_cpu(kind: str, grid: tuple[int, ...], periodic: list[bool]) -> None:
    """The same fields give byte-identical q on either device, and the same q and key give the
    same sets, scales and weights."""
    sampler = make_sampler(SamplerConfig(kind=kind))
    f = torch.cat([field(name, grid) for name in ("front", "wave", "noise")])
    f = torch.cat([f, torch.randn((4, 1, *grid), generator=torch.Generator().manual_seed(1))])
    q = sampler.probabilities(f, periodic)
    q_gpu = sampler.probabilities(f.cuda(), periodic)
    assert q_gpu.device.type == "cuda"
    assert q.numpy().tobytes() == q_gpu.cpu().numpy().tobytes()
    k, ids = math.prod(grid) // 5, range(len(f))
    cpu = sample_query_sets(sampler, q, k, 1, ids, 4, grid)
    gpu = sample_query_sets(sampler, q_gpu, k, 1, ids, 4, grid)
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
    assert torch.equal(inclusion_scale(q, k), inclusion_scale(q_gpu, k).cpu())


def test_gradient_magnitude_is_correctly_rounded() -> None:
    """sqrt is the IEEE one (numpy's), not the CPU's vectorised approximation, so CPU and CUDA agree."""
    f = torch.randn((3, 2, 40, 50), generator=torch.Generator().manual_seed(2)) * 7
    s = gradient_magnitude(f, [True, True])
    d0, d1 = (f.roll(-1, 2) - f.roll(1, 2)) * 20.0, (f.roll(-1, 3) - f.roll(1, 3)) * 25.0
    total = torch.zeros_like(f[:, 0])
    for d in (d0, d1):
        for c in range(2):
            total = total + d[:, c] * d[:, c]
    expected = np.sqrt(total.numpy()).reshape(3, -1)
    assert np.array_equal(s.numpy(), expected)


def test_partial_selection_equals_the_full_stable_order_also_on_ties(monkeypatch):
    """Uniform draws take the k smallest random values by topk; where the k-th and (k+1)-th tie,
    the full stable sort decides, so the set is the first k of the full order in every case."""
    import pipeline.samplers as samplers_module

    bits = torch.tensor([[5, 1, 3, 3, 3, 0], [2, 2, 2, 2, 2, 2], [9, 8, 7, 6, 5, 4]])
    monkeypatch.setattr(samplers_module, "random_bits", lambda keys, n, stream=0: bits)
    keys = torch.zeros(3, dtype=torch.int64)
    for k in range(1, 7):
        full = torch.sort(bits, dim=1, stable=True).indices[:, :k].sort(dim=1).values
        fast = samplers_module._smallest_k(keys, 6, k, 0).sort(dim=1).values
        assert torch.equal(fast, full), k


@pytest.mark.parametrize("kind", ["stratified", "gradient"])
def test_sync_free_indices_give_the_same_draws(kind: str, monkeypatch) -> None:
    """On a GPU a draw's mask becomes indices by ranks (_ranked_indices, no host sync), on a CPU
    by nonzero: both give the same sets, bit for bit; the ranked path checks the count too."""
    import pipeline.samplers as samplers_module

    grid = GRIDS[2]
    sampler = make_sampler(SamplerConfig(kind=kind))
    q = sampler.probabilities(field("front", grid).expand(5, -1, -1, -1), [False, False])
    keys = snapshot_keys(3, range(5), 0)
    for k in (1, 97, q.shape[1] // 2):
        by_nonzero = sampler.sample(q, k, keys, grid)
        monkeypatch.setattr(samplers_module, "_mask_to_indices", samplers_module._ranked_indices)
        by_rank = sampler.sample(q, k, keys, grid)
        monkeypatch.undo()
        assert by_rank.is_contiguous() and torch.equal(by_rank, by_nonzero), k
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, [1, 4]] = mask[1, [0, 2, 9]] = True  # 2 and 3 points where 2 are expected
    with pytest.raises(RuntimeError, match="did not select 2 points"):
        samplers_module._ranked_indices(mask, 2)


@pytest.mark.parametrize("stratify", [True, False])
@pytest.mark.parametrize("grid", [(70,), (18, 12)])
def test_error_sets_include_each_point_with_its_probability(stratify: bool, grid) -> None:
    """Error sets from a fixed error map: the observed inclusion frequencies over 20,000 keys
    match pi, laid out block by block (stratify) or in a random order."""
    draws, n = 20000, math.prod(grid)
    f = field("front", grid)
    error = (f - torch.tanh(f * 0.5)).pow(2).reshape(1, n) + 1e-4  # a smeared front's error
    sampler = ErrorSampler(ErrorImportance(power=0.5, alpha=0.2, stratify=stratify))
    q = sampler.error_probabilities(error, f, [False] * len(grid))
    k = n // 4
    pi = inclusion_probabilities(q, k)[0]
    idx = sampler.sample(q.expand(draws, -1), k, snapshot_keys(1, range(draws), 0), grid)
    freq = torch.bincount(idx.flatten(), minlength=n).double() / draws
    inner = (pi > 0) & (pi < 1)
    z = (freq - pi)[inner] / (pi * (1 - pi) / draws).sqrt()[inner]
    print(f"error stratify={stratify} {grid}: max |z| = {z.abs().max():.2f}")
    assert z.abs().max() < 5
    assert torch.equal(freq[pi == 1], torch.ones_like(freq[pi == 1]))


def test_stratified_error_sets_spread_each_block_to_its_expected_count() -> None:
    """Laid out block by block, each 8x8 block gets floor or ceil of its expected number of
    points (sum of pi over it); a random order does not."""
    grid, k = (32, 32), 102
    f = field("front", grid)
    error = (f - torch.tanh(f * 0.5)).pow(2).reshape(1, -1) + 1e-4
    keys = snapshot_keys(3, range(200), 0)
    spread = {}
    for stratify in (True, False):
        sampler = ErrorSampler(ErrorImportance(stratify=stratify))
        q = sampler.error_probabilities(error, f, [False, False])
        pi = inclusion_probabilities(q, k)[0].reshape(4, 8, 4, 8).sum((1, 3))  # per block
        idx = sampler.sample(q.expand(len(keys), -1), k, keys, grid)
        block = (idx // 32 // 8) * 4 + (idx % 32) // 8  # (draws, k) block of each point
        counts = torch.stack([torch.bincount(row, minlength=16) for row in block]).double()
        spread[stratify] = (counts - pi.flatten()).abs().max().item()
    assert spread[True] < 1 and spread[False] > 2, spread
