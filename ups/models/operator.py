"""LatentOperator: advance latent tokens by one time step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import check
from ups.models.layers import MLP, Block, FourierFeatures, token_anchors, token_grid


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
    parameters. Each token's position is its anchor (the regular grid of token positions the
    encoder pools around) through fixed sin/cos features and a linear embedding, so tokens are told
    apart, with nearby tokens alike, from the first step; a learned embedding from random init
    had to find that first and trained several times slower. The output projection is
    zero-initialised, so an untrained operator is the identity (persistence) rather than noise.

    ``coord_dim`` is the number of grid dimensions: the anchors lie on the encoder's token grid.
    z (B, T, D), dt (B,), params (B, P) -> z_next (B, T, D).
    """

    def __init__(
        self,
        cfg: OperatorConfig,
        latent_dim: int,
        num_tokens: int,
        num_params: int,
        coord_dim: int,
    ):
        super().__init__()
        self.cfg, self.num_params = cfg, num_params
        self.inp = nn.Linear(latent_dim, cfg.dim)
        anchors, _ = token_anchors(num_tokens, coord_dim)
        self.register_buffer("anchors", anchors, persistent=False)  # (T, d)
        # frequencies up to the token grid's Nyquist
        self.pos = FourierFeatures(
            coord_dim, 8, max_freq=max(1.0, max(token_grid(num_tokens, coord_dim)) / 2)
        )
        self.pos_proj = nn.Linear(self.pos.out_dim, cfg.dim)
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
        pos = self.pos_proj(self.pos(self.anchors))  # (T, dim)
        h = self.inp(z) + pos + self.cond(cond_in)[:, None]  # (B, T, dim)
        for block in self.blocks:
            h = block(h)
        return z + self.out(self.norm(h))
