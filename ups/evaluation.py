"""Accuracy in physical space on the dense test grid, next to persistence (u_{t+h} = u_t)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from pipeline.sources.splits import NormStats
from ups.models.codec import Codec


def nrmse(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-sample nRMSE: ||pred - true|| / ||true|| per channel over the grid, averaged over channels.

    pred, true (B, C, *grid) in physical units -> (B,).
    """
    err = (pred - true).flatten(2).norm(dim=-1)  # (B, C)
    ref = true.flatten(2).norm(dim=-1).clamp_min(1e-12)
    return (err / ref).mean(dim=1)


HORIZONS = (1, 4, 16)  # the rollout horizons reported by default (and always by the test)


@torch.no_grad()
def evaluate(
    codec: Codec,
    norm: NormStats,
    trajectories: Iterable[np.ndarray],
    dt: float,
    params: Sequence[float] = (),
    operator: torch.nn.Module | None = None,
    horizons: Sequence[int] = HORIZONS,
    reconstruction: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Dense-grid nRMSE over whole trajectories, each (T, C, *grid) in physical units.

    Reports the codec's reconstruction error (decode(encode(u_t)) vs u_t; ``reconstruction``
    false leaves out its decodes) and, per horizon h,
    persistence (u_t vs u_{t+h}) and -- when an operator is given -- the latent rollout
    (decode(op^h(encode(u_t))) vs u_{t+h}), averaged over all start times with t + h < T.
    Horizons longer than the trajectories are skipped.
    """
    if not horizons or min(horizons) < 1:
        raise ValueError(f"evaluate: horizons must be integers >= 1, got {list(horizons)}")
    was_training = codec.training
    codec.eval()
    if operator is not None:
        operator.eval()
    sums: dict[str, list[float]] = {}
    for trajectory in trajectories:
        true = (
            torch.from_numpy(np.asarray(trajectory)).float().to(device)
        )  # (T, C, *grid), physical
        z = codec.encode(norm.normalize(true))  # (T, tokens, D)
        if reconstruction:
            recon = norm.denormalize(codec.decode_grid(z))
            sums.setdefault("recon_nrmse", []).extend(nrmse(recon, true).tolist())
        steps = true.shape[0]
        step_dt = torch.full((steps,), dt, device=device)
        step_params = torch.tensor([list(params)], dtype=torch.float32, device=device).expand(
            steps, -1
        )
        rolled = z
        for h in range(1, max(horizons) + 1):
            if h >= steps:
                break
            if operator is not None:
                rolled = operator(
                    rolled[: steps - h], step_dt[: steps - h], step_params[: steps - h]
                )
            if h in horizons:
                sums.setdefault(f"persistence_h{h}", []).extend(
                    nrmse(true[: steps - h], true[h:]).tolist()
                )
                if operator is not None:
                    pred = norm.denormalize(codec.decode_grid(rolled))
                    sums.setdefault(f"model_h{h}", []).extend(nrmse(pred, true[h:]).tolist())
    codec.train(was_training)
    if operator is not None:
        operator.train(was_training)
    if not sums:  # no metrics at all would read as an evaluation that passed
        raise ValueError("evaluate: no trajectories to evaluate")
    return {key: float(np.mean(values)) for key, values in sums.items()}


def format_metrics(metrics: dict[str, float]) -> str:
    """A small table: reconstruction, then model vs persistence per horizon."""
    lines = [f"reconstruction nRMSE  {metrics['recon_nrmse']:.4f}"]
    horizons = sorted(int(k.split("_h")[1]) for k in metrics if k.startswith("persistence_h"))
    if horizons:
        lines.append(f"{'horizon':>8} {'model':>10} {'persistence':>12}")
        for h in horizons:
            model = metrics.get(f"model_h{h}")
            lines.append(
                f"{h:>8} {'-' if model is None else f'{model:.4f}':>10} {metrics[f'persistence_h{h}']:>12.4f}"
            )
    return "\n".join(lines)
