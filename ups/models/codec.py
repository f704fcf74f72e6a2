"""Codec: the GridEncoder and AnyPointDecoder trained together (stage 1), saved with the data
description and normalisation they were trained on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import from_dict, to_dict
from pipeline.grid import grid_coordinates
from pipeline.sources.pdebench import DataInfo
from pipeline.sources.splits import NormStats
from pipeline.storage import file_sha256
from ups.models.checkpoint import CheckpointError, load_checkpoint, require_match, save_checkpoint
from ups.models.decoder import AnyPointDecoder, DecoderConfig
from ups.models.encoder import EncoderConfig, GridEncoder


@dataclass
class CodecConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


def data_signature(info: DataInfo) -> dict[str, Any]:
    """The part of the data description a trained model depends on."""
    return {"channels": list(info.channels), "grid": list(info.grid)}


class Codec(nn.Module):
    grid_coords: torch.Tensor  # a buffer

    def __init__(self, cfg: CodecConfig, info: DataInfo):
        super().__init__()
        self.cfg, self.info = cfg, info
        self.encoder = GridEncoder(cfg.encoder, len(info.channels), info.grid)
        self.decoder = AnyPointDecoder(
            cfg.decoder,
            cfg.encoder.latent_dim,
            len(info.grid),
            len(info.channels),
            cfg.encoder.num_tokens,
        )
        self.register_buffer(
            "grid_coords", torch.from_numpy(grid_coordinates(info.grid)), persistent=False
        )

    def encode(self, fields: torch.Tensor) -> torch.Tensor:
        """(B, C, *grid) normalised -> (B, T, D)."""
        return self.encoder(fields)

    def decode(self, z: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """(B, T, D), (B, Q, d) -> (B, Q, C)."""
        return self.decoder(z, coords)

    def decode_grid(self, z: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Decode every grid point, in chunks of query points: (B, T, D) -> (B, C, *grid)."""
        coords = self.grid_coords.expand(z.shape[0], -1, -1)  # (B, N, d)
        values = torch.cat(
            [self.decoder(z, c) for c in coords.split(chunk, dim=1)], dim=1
        )  # (B, N, C)
        return values.transpose(1, 2).reshape(z.shape[0], -1, *self.info.grid)


def save_codec(
    path: str | Path, codec: Codec, norm: NormStats, extra: dict[str, Any] | None = None
) -> None:
    save_checkpoint(
        path,
        {
            "kind": "codec",
            "config": to_dict(codec.cfg),
            "data": data_signature(codec.info),
            "norm": {"mean": list(norm.mean), "std": list(norm.std)},
            "state_dict": codec.state_dict(),
            **(extra or {}),
        },
    )


def load_codec(
    path: str | Path, info: DataInfo, expected: CodecConfig | None = None
) -> tuple[Codec, NormStats, dict[str, Any]]:
    """Load a codec checkpoint, refusing one trained on other channels/grid or with another config."""
    payload = load_checkpoint(path, "codec")
    require_match(payload["data"], data_signature(info), "the data (channels, grid)", path)
    if expected is not None:
        require_match(payload["config"], to_dict(expected), "the model config", path)
    codec = Codec(from_dict(CodecConfig, payload["config"]), info)
    codec.load_state_dict(payload["state_dict"])
    norm = NormStats(tuple(payload["norm"]["mean"]), tuple(payload["norm"]["std"]))
    return codec, norm, payload


class CodecEncoder:
    """A trained codec's frozen encoder, as a build's ``LatentEncoder`` (pipeline/stages.py)."""

    def __init__(self, codec: Codec, norm: NormStats, path: str | Path):
        self.module = codec.encoder.eval().requires_grad_(False)
        self.norm = norm
        self.identity = {"path": str(path), "sha256": file_sha256(path)}
        enc = codec.cfg.encoder
        self.latent_shape = (enc.num_tokens, enc.latent_dim)

    def to(self, device: torch.device) -> CodecEncoder:
        self.module.to(device)
        return self

    def encode(self, fields: torch.Tensor) -> torch.Tensor:
        """(B, C, *grid) normalised -> (B, T, D)."""
        return self.module(fields)


def load_encoder(path: str, info: DataInfo, splits: dict[str, list[int]]) -> CodecEncoder:
    """The build's encoder loader: the codec at ``path``, refused when trained on other data or
    on another train split than the build's."""
    codec, norm, payload = load_codec(path, info)
    trained_on = payload.get("splits")
    if trained_on is not None and trained_on["train"] != splits["train"]:
        raise CheckpointError(
            f"checkpoint {path}: the encoder was trained on another train split than data.* gives; "
            "use the same data.val_fraction, data.test_fraction and data.split_seed"
        )
    return CodecEncoder(codec, norm, path)
