"""AnyPointDecoder: latent tokens + query coordinates -> field values at those points."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import check
from ups.models.layers import Block, FourierFeatures, locality_bias, token_anchors


@dataclass
class DecoderConfig:
    dim: int = 128
    depth: int = 3  # cross-attention layers
    heads: int = 4
    num_freqs: int = 16
    max_freq: float = 64.0

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "heads", "num_freqs"):
            check(
                getattr(self, name) >= 1,
                f"decoder.{name}",
                "a positive integer",
                getattr(self, name),
            )
        check(
            math.isfinite(self.max_freq) and self.max_freq >= 1,
            "decoder.max_freq",
            "a finite number >= 1",
            self.max_freq,
        )
        check(
            self.dim % self.heads == 0,
            "decoder.dim",
            f"a multiple of decoder.heads={self.heads}",
            self.dim,
        )


class AnyPointDecoder(nn.Module):
    """Fourier-encoded query coordinates cross-attend to the latent tokens.

    Latent token j summarises the region around its anchor (the encoder pools it with a
    locality prior, ups/models/encoder.py), and the decoder is told where that is, in two ways:
    the anchor's Fourier features, embedded, are added to the token (its keys and values), and
    the attention logits of a query at x get the encoder's locality bias
    -|x - anchor_j|^2 / (2 s^2). A query then reads the tokens near it, and knows its position
    relative to each: what a sharp, local feature (a shock) needs. Both are general (any grid,
    any number of dimensions); without them the decoder learns several times slower.

    There is no attention among queries: every query point is decoded independently, so the
    loss on a random subset of points is an exact, cheaper estimate of the full-grid loss.
    coords (B, Q, d) in [0, 1], z (B, T, D) -> (B, Q, C).
    """

    anchors: torch.Tensor  # buffers
    spacing: torch.Tensor

    def __init__(
        self,
        cfg: DecoderConfig,
        latent_dim: int,
        coord_dim: int,
        out_channels: int,
        num_tokens: int,
    ):
        super().__init__()
        self.cfg = cfg
        self.fourier = FourierFeatures(coord_dim, cfg.num_freqs, cfg.max_freq)
        self.embed = nn.Linear(self.fourier.out_dim, cfg.dim)
        self.context = nn.Linear(latent_dim, cfg.dim)
        anchors, spacing = token_anchors(num_tokens, coord_dim)
        self.register_buffer("anchors", anchors, persistent=False)  # (T, d)
        self.register_buffer("spacing", spacing, persistent=False)  # (d,)
        self.token_pos = nn.Linear(self.fourier.out_dim, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cross=True) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, out_channels)

    def forward(self, z: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.fourier(coords))  # (B, Q, dim)
        context = self.context(z) + self.token_pos(self.fourier(self.anchors))  # (B, T, dim)
        bias = locality_bias(coords, self.anchors, self.spacing)[:, None]  # (B, 1, Q, T)
        for block in self.blocks:
            x = block(x, context, bias)
        return self.out(self.norm(x))  # (B, Q, C)
