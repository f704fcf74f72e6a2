"""Accuracy in physical space on the dense test grid, next to persistence (u_{t+h} = u_t)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ups.data.pdebench import PDEBenchFile
from ups.data.splits import NormStats
from ups.models.codec import Codec


def nrmse(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-sample nRMSE: ||pred - true|| / ||true|| per channel over the grid, averaged over channels.

    pred, true (B, C, *grid) in physical units -> (B,).
    """
    err = (pred - true).flatten(2).norm(dim=-1)  # (B, C)
    ref = true.flatten(2).norm(dim=-1).clamp_min(1e-12)
    return (err / ref).mean(dim=1)


@torch.no_grad()
def evaluate(
    codec: Codec,
    norm: NormStats,
    source: PDEBenchFile,
    trajectory_ids: Sequence[int],
    operator: torch.nn.Module | None = None,
    horizons: Sequence[int] = (1, 4, 16),
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Dense-grid nRMSE over whole trajectories.

    Reports the codec's reconstruction error (decode(encode(u_t)) vs u_t) and, per horizon h,
    persistence (u_t vs u_{t+h}) and -- when an operator is given -- the latent rollout
    (decode(op^h(encode(u_t))) vs u_{t+h}), averaged over all start times with t + h < T.
    Horizons longer than the trajectories are skipped.
    """
    codec.eval()
    if operator is not None:
        operator.eval()
    info = source.info
    params = torch.tensor([list(info.params.values())], dtype=torch.float32, device=device)
    sums: dict[str, list[float]] = {}
    for traj_id in trajectory_ids:
        true = torch.from_numpy(source.trajectory(traj_id)).to(device)  # (T, C, *grid), physical
        z = codec.encode(norm.normalize(true))  # (T, tokens, D)
        recon = norm.denormalize(codec.decode_grid(z))
        sums.setdefault("recon_nrmse", []).extend(nrmse(recon, true).tolist())
        steps = true.shape[0]
        rolled, dt = z, torch.full((steps,), info.dt, device=device)
        for h in range(1, max(horizons) + 1):
            if h >= steps:
                break
            if operator is not None:
                rolled = operator(
                    rolled[: steps - h], dt[: steps - h], params.expand(steps - h, -1)
                )
            if h in horizons:
                sums.setdefault(f"persistence_h{h}", []).extend(
                    nrmse(true[: steps - h], true[h:]).tolist()
                )
                if operator is not None:
                    pred = norm.denormalize(codec.decode_grid(rolled))
                    sums.setdefault(f"model_h{h}", []).extend(nrmse(pred, true[h:]).tolist())
    return {key: float(np.mean(values)) for key, values in sums.items()}
