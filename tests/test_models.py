"""Model shapes, exact subsampling of the decoder, zero-init operator, checkpoints."""

from __future__ import annotations

import pytest
import torch

from pipeline.sources.pdebench import DataInfo
from pipeline.sources.splits import NormStats
from pipeline.storage import file_sha256
from ups.models.checkpoint import CheckpointError
from ups.models.codec import Codec, CodecConfig, load_codec, save_codec
from ups.models.decoder import DecoderConfig
from ups.models.encoder import EncoderConfig, GridEncoder
from ups.models.operator import LatentOperator, OperatorConfig

SMALL = CodecConfig(
    EncoderConfig(patch=4, dim=32, depth=1, num_tokens=8, latent_dim=16),
    DecoderConfig(dim=32, depth=2),
)


def info(grid, channels=("u",)):
    return DataInfo(
        channels=channels,
        grid=grid,
        dt=0.1,
        num_steps=4,
        num_trajectories=2,
        periodic=(True,) * len(grid),
    )


@pytest.mark.parametrize(("grid", "channels"), [((32,), ("u",)), ((16, 8), ("a", "b", "c"))])
def test_codec_shapes_1d_and_2d(grid, channels):
    codec = Codec(SMALL, info(grid, channels))
    fields = torch.randn(3, len(channels), *grid)
    z = codec.encode(fields)
    assert z.shape == (3, 8, 16)
    coords = torch.rand(3, 11, len(grid))
    assert codec.decode(z, coords).shape == (3, 11, len(channels))
    assert codec.decode_grid(z, chunk=7).shape == fields.shape


def test_encoder_pools_with_learned_queries_not_averages():
    enc = GridEncoder(SMALL.encoder, 1, (32,))
    x = torch.randn(2, 1, 32)
    # two inputs with the same patch means must still get different latents
    shuffled = x.view(2, 1, 8, 4).flip(-1).reshape(2, 1, 32)
    assert not torch.allclose(enc(x), enc(shuffled))


def test_grid_not_divisible_by_patch():
    with pytest.raises(ValueError, match=r"grid \(30,\) is not divisible by encoder.patch=4"):
        Codec(SMALL, info((30,)))
    enc = GridEncoder(SMALL.encoder, 1, (32,))
    with pytest.raises(ValueError, match=r"expects fields \(B, 1, 32\), got \(2, 1, 36\)"):
        enc(torch.randn(2, 1, 36))


def test_decoder_on_a_subset_returns_exactly_the_rows_of_the_dense_decode():
    torch.manual_seed(0)
    codec = Codec(SMALL, info((16, 16))).eval()
    z = torch.randn(2, 8, 16)
    dense = codec.decode(z, codec.grid_coords.expand(2, -1, -1))  # (2, 256, 1)
    idx = torch.stack([torch.randperm(256)[:40] for _ in range(2)])  # (2, 40)
    sparse = codec.decode(z, codec.grid_coords[idx])
    torch.testing.assert_close(sparse, torch.gather(dense, 1, idx[..., None]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("coord_dim", [1, 2])  # token anchors on a line or a 2 x 4 grid
def test_operator_is_identity_at_init_and_conditions_on_dt_and_params(coord_dim):
    op = LatentOperator(
        OperatorConfig(dim=32, depth=2),
        latent_dim=16,
        num_tokens=8,
        num_params=1,
        coord_dim=coord_dim,
    )
    assert op.anchors.shape == (8, coord_dim)
    z = torch.randn(4, 8, 16)
    dt, nu = torch.full((4,), 0.1), torch.full((4, 1), 0.01)
    torch.testing.assert_close(op(z, dt, nu), z)
    torch.nn.init.normal_(op.out.weight)
    assert not torch.allclose(op(z, dt, nu), op(z, dt * 2, nu))
    assert not torch.allclose(op(z, dt, nu), op(z, dt, nu * 2))
    with pytest.raises(ValueError, match=r"expects params \(4, 1\), got \(4, 0\)"):
        op(z, dt, None)


def test_checkpoint_round_trip_and_mismatches(tmp_path):
    data = info((32,))
    codec = Codec(SMALL, data)
    norm = NormStats((0.5,), (2.0,))
    path = tmp_path / "codec.pt"
    save_codec(path, codec, norm)
    loaded, loaded_norm, _ = load_codec(path, data, expected=SMALL)
    x = torch.randn(2, 1, 32)
    torch.testing.assert_close(loaded.encode(x), codec.encode(x))
    assert loaded_norm == norm and len(file_sha256(path)) == 64
    with pytest.raises(
        CheckpointError, match=r"the data \(channels, grid\) does not match.*grid: \[32\] != \[64\]"
    ):
        load_codec(path, info((64,)))
    other = CodecConfig(EncoderConfig(patch=8), SMALL.decoder)
    with pytest.raises(
        CheckpointError, match=r"model config does not match.*encoder.patch: 4 != 8"
    ):
        load_codec(path, data, expected=other)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_codec(tmp_path / "missing.pt", data)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not readable"):
        load_codec(tmp_path / "junk.pt", data)
