"""Losses at sparse query points.

Every physical-space loss takes values at k query points and returns the importance-weighted
estimate of the full-grid mean (docs/design.md, section 5): with weights w_i = k / (N pi_i) the
estimate of (1/N) sum_i l_i is the plain mean over the k points of w_i l_i, and uniform
sampling has w = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError


def weighted_point_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Estimate of the full-grid MSE from k points: pred, target (B, k, C), weight (B, k) or None."""
    err = (pred.float() - target.float()).pow(2).mean(-1)  # (B, k), mean over channels
    return err.mean() if weight is None else (weight * err).mean()


def inverse_encoding_loss(
    decoder: nn.Module,
    z: torch.Tensor,
    coords: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """Decode the latent of u_t at the query points and compare with u_t there."""
    return weighted_point_loss(decoder(z, coords), targets, weights)


def forward_physical_loss(
    decoder: nn.Module,
    z_next_pred: torch.Tensor,
    coords: torch.Tensor,
    targets_next: torch.Tensor,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """Decode the *predicted* next latent at the query points and compare with u_{t+1} there."""
    return weighted_point_loss(decoder(z_next_pred, coords), targets_next, weights)


def latent_one_step_loss(z_next_pred: torch.Tensor, z_next: torch.Tensor) -> torch.Tensor:
    """MSE between the operator's prediction and the encoded next snapshot, (B, T, D)."""
    return F.mse_loss(z_next_pred.float(), z_next.float())


def latent_rollout_loss(
    operator: nn.Module, window: torch.Tensor, dt: torch.Tensor, params: torch.Tensor | None
) -> torch.Tensor:
    """Autoregressive rollout from window[:, 0] over h steps, mean latent MSE: window (B, h+1, T, D)."""
    z, losses = window[:, 0], []
    for step in range(1, window.shape[1]):
        z = operator(z, dt, params)
        losses.append(latent_one_step_loss(z, window[:, step]))
    return torch.stack(losses).mean()


def check_query_sample_ratio(ratio: float, option: str = "loss.query_sample_ratio") -> None:
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(
            f"option '{option}': expected a number in (0, 1] (1.0 = dense), got {ratio!r}"
        )


def sample_in_loss(
    coords: torch.Tensor,
    targets: torch.Tensor,
    ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The simplest baseline: draw a uniform subset of the N points on the fly, inside the loss.

    coords (B, N, d), targets (B, N, C) -> the same at k = floor(ratio * N) points per sample,
    uniform weights. ratio 1.0 returns the inputs unchanged (the dense loss).
    """
    check_query_sample_ratio(ratio)
    if ratio == 1.0:
        return coords, targets
    b, n = targets.shape[:2]
    k = int(ratio * n)
    if not 1 <= k < n:
        raise ConfigError(
            f"option 'loss.query_sample_ratio': ratio {ratio} gives k={k} of N={n} points; need 1 <= k < N"
        )
    scores = torch.rand(b, n, generator=generator, device=generator.device if generator else "cpu")
    idx = scores.argsort(dim=1)[:, :k].to(coords.device)  # (B, k) distinct uniform points
    gather = lambda x: torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    return gather(coords), gather(targets)
