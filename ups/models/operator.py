"""LatentOperator: advance latent tokens by one time step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import check
from ups.models.layers import MLP, Block


@dataclass
class OperatorConfig:
    dim: int = 128
    depth: int = 4
    heads: int = 4

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "heads"):
            check(
                getattr(self, name) >= 1,
                f"operator.{name}",
                "a positive integer",
                getattr(self, name),
            )
        check(
            self.dim % self.heads == 0,
            "operator.dim",
            f"a multiple of operator.heads={self.heads}",
            self.dim,
        )


class LatentOperator(nn.Module):
    """Residual transformer over latent tokens, conditioned on the true time step and the PDE
    parameters. The output projection is zero-initialised, so an untrained operator is the
    identity (persistence) rather than noise.

    z (B, T, D), dt (B,), params (B, P) -> z_next (B, T, D).
    """

    def __init__(self, cfg: OperatorConfig, latent_dim: int, num_tokens: int, num_params: int):
        super().__init__()
        self.cfg, self.num_params = cfg, num_params
        self.inp = nn.Linear(latent_dim, cfg.dim)
        self.token_pos = nn.Parameter(torch.randn(num_tokens, cfg.dim) * 0.02)
        self.cond = MLP(1 + num_params, cfg.dim, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, latent_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, z: torch.Tensor, dt: torch.Tensor, params: torch.Tensor | None = None
    ) -> torch.Tensor:
        b = z.shape[0]
        params = z.new_zeros(b, 0) if params is None else params
        if params.shape != (b, self.num_params):
            raise ValueError(
                f"LatentOperator expects params ({b}, {self.num_params}), got {tuple(params.shape)}"
            )
        cond_in = torch.cat(
            [dt.to(z.dtype).log().view(b, 1), params.to(z.dtype)], dim=1
        )  # (B, 1 + P)
        h = self.inp(z) + self.token_pos + self.cond(cond_in)[:, None]  # (B, T, dim)
        for block in self.blocks:
            h = block(h)
        return z + self.out(self.norm(h))
