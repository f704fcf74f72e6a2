"""GridEncoder: a full grid of fields -> a small set of latent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import ConfigError, check
from pipeline.grid import grid_coordinates
from ups.models.layers import Block, FourierFeatures, locality_bias, token_anchors


@dataclass
class EncoderConfig:
    patch: int = 8  # patch size along every grid axis
    dim: int = 128
    depth: int = 2  # self-attention blocks over patches
    heads: int = 4
    num_tokens: int = 16  # latent tokens T
    latent_dim: int = 64  # latent width D
    num_freqs: int = 8

    def __post_init__(self) -> None:
        for name in ("patch", "dim", "heads", "num_tokens", "latent_dim", "num_freqs"):
            check(
                getattr(self, name) >= 1,
                f"encoder.{name}",
                "a positive integer",
                getattr(self, name),
            )
        check(self.depth >= 0, "encoder.depth", "an integer >= 0", self.depth)
        check(
            self.dim % self.heads == 0,
            "encoder.dim",
            f"a multiple of encoder.heads={self.heads}",
            self.dim,
        )


class GridEncoder(nn.Module):
    """Patch embedding + Fourier position features + self-attention, pooled to ``num_tokens``
    latent tokens by learned-query cross-attention (Perceiver-style; not average pooling, which
    would keep only local means).

    The pooling attention gets a fixed locality prior: token j has an anchor on a regular grid
    of token positions, and its logits are biased by -|x_patch - anchor_j|^2 / (2 s^2), s the
    anchor spacing. Without it every token starts as the same global average (uniform
    attention) and training sits on a long plateau before the tokens specialise.

    Input (B, C, *grid) normalised fields; output (B, T, D) latent tokens.
    """

    patch_coords: torch.Tensor  # buffers
    pool_bias: torch.Tensor

    def __init__(self, cfg: EncoderConfig, channels: int, grid: tuple[int, ...]):
        super().__init__()
        if len(grid) not in (1, 2):
            raise ValueError(f"GridEncoder supports 1D and 2D grids, got grid {grid}")
        bad = [n for n in grid if n % cfg.patch]
        if bad:
            # a ConfigError (a ValueError): the tools print it as one line
            raise ConfigError(f"grid {tuple(grid)} is not divisible by encoder.patch={cfg.patch}")
        self.cfg, self.channels, self.grid = cfg, channels, tuple(grid)
        conv = nn.Conv1d if len(grid) == 1 else nn.Conv2d
        self.patch_embed = conv(channels, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)
        centres = grid_coordinates(tuple(n // cfg.patch for n in grid))  # (P, d) patch centres
        self.register_buffer("patch_coords", torch.from_numpy(centres), persistent=False)
        self.pos = FourierFeatures(len(grid), cfg.num_freqs, max_freq=max(grid) / cfg.patch)
        self.pos_proj = nn.Linear(self.pos.out_dim, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads) for _ in range(cfg.depth))
        self.queries = nn.Parameter(torch.randn(cfg.num_tokens, cfg.dim) * 0.02)
        anchors, spacing = token_anchors(cfg.num_tokens, len(grid))
        self.register_buffer(
            "pool_bias", locality_bias(self.patch_coords, anchors, spacing).T, persistent=False
        )  # (T, P)
        self.pool = Block(cfg.dim, cfg.heads, cross=True)
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.latent_dim)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        if tuple(fields.shape[1:]) != (self.channels, *self.grid):
            raise ValueError(
                f"GridEncoder expects fields (B, {self.channels}, {', '.join(map(str, self.grid))}), got {tuple(fields.shape)}"
            )
        x = self.patch_embed(fields).flatten(2).transpose(1, 2)  # (B, P, dim)
        x = x + self.pos_proj(self.pos(self.patch_coords))
        for block in self.blocks:
            x = block(x)
        tokens = self.pool(
            self.queries.expand(x.shape[0], -1, -1), x, self.pool_bias
        )  # (B, T, dim)
        return self.out(self.norm(tokens))  # (B, T, D)
