"""Building blocks shared by the encoder, decoder and operator."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.grid import grid_coordinates


class FourierFeatures(nn.Module):
    """Fixed sin/cos features of coordinates in [0, 1] at geometric frequencies 1 .. max_freq."""

    freqs: torch.Tensor  # a buffer

    def __init__(self, in_dim: int, num_freqs: int, max_freq: float):
        super().__init__()
        freqs = (
            torch.logspace(0, math.log10(max_freq), num_freqs) if num_freqs > 1 else torch.ones(1)
        )
        self.register_buffer("freqs", 2 * math.pi * freqs, persistent=False)
        self.out_dim = in_dim * (2 * num_freqs + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., d) -> (..., d * (2F + 1))
        angles = x[..., None] * self.freqs  # (..., d, F)
        feats = torch.cat([x[..., None], angles.sin(), angles.cos()], dim=-1)
        return feats.flatten(-2)


class MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim))


class Attention(nn.Module):
    """Multi-head attention from ``x`` (B, Q, D) to ``context`` (B, T, D) through SDPA.

    Each query row attends independently, so a subset of queries gets exactly the rows it
    would get in the full set.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``bias`` (Q, T), or (B, 1, Q, T) for one per sample, is added to the attention logits."""
        b, q_len, d = x.shape
        h = self.heads
        q = self.q(x).view(b, q_len, h, d // h).transpose(1, 2)  # (B, h, Q, d/h)
        k, v = (
            self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        )  # 2x (B, h, T, d/h)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, Q, d/h)
        return self.out(y.transpose(1, 2).reshape(b, q_len, d))


class Block(nn.Module):
    """Pre-norm transformer block: cross-attention to a context when ``cross``, else self-attention."""

    def __init__(self, dim: int, heads: int, cross: bool = False, mlp_ratio: int = 4):
        super().__init__()
        self.norm_x = nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(dim) if cross else None
        self.attn = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.norm_x(x)
        x = x + self.attn(h, h if self.norm_ctx is None else self.norm_ctx(context), bias)
        return x + self.mlp(self.norm_mlp(x))


def token_grid(num_tokens: int, ndim: int) -> tuple[int, ...]:
    """The most even factorisation of ``num_tokens`` over ``ndim`` axes (16 -> (4, 4), 32 -> (4, 8))."""
    if ndim == 1:
        return (num_tokens,)
    a = max(d for d in range(1, int(num_tokens**0.5) + 1) if num_tokens % d == 0)
    return (a, num_tokens // a)


def token_anchors(num_tokens: int, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each latent token's anchor, on a regular grid of token positions in [0, 1]^d, (T, d), and
    the anchor spacing per axis, (d,)."""
    shape = token_grid(num_tokens, ndim)
    anchors = torch.from_numpy(grid_coordinates(shape))
    return anchors, torch.tensor([1.0 / n for n in shape])


def locality_bias(
    points: torch.Tensor, anchors: torch.Tensor, spacing: torch.Tensor
) -> torch.Tensor:
    """Attention-logit bias -|x - anchor_j|^2 / (2 s^2) from points x (..., N, d) to the token
    anchors (T, d), in units of anchor spacing s: (..., N, T)."""
    d2 = (((points[..., :, None, :] - anchors) / spacing) ** 2).sum(-1)
    return -0.5 * d2
