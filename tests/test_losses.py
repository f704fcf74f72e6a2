"""Sparse losses estimate the dense ones; the on-the-fly baseline; the dense inverse-decoding loss."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.sources.pdebench import DataInfo
from ups.models.codec import Codec, CodecConfig
from ups.models.decoder import DecoderConfig
from ups.models.encoder import EncoderConfig
from ups.models.operator import LatentOperator, OperatorConfig
from ups.training.losses import (
    forward_physical_loss,
    inverse_encoding_loss,
    latent_one_step_loss,
    latent_rollout_loss,
    sample_in_loss,
    weighted_point_loss,
)

CFG = CodecConfig(
    EncoderConfig(patch=4, dim=32, depth=1, num_tokens=8, latent_dim=16),
    DecoderConfig(dim=32, depth=2),
)
INFO = DataInfo(
    channels=("u", "v"),
    grid=(16, 16),
    dt=0.1,
    num_steps=4,
    num_trajectories=2,
    periodic=(True, True),
)


def test_uniform_weights_on_the_full_grid_equal_the_dense_loss():
    pred, target = torch.randn(3, 256, 2), torch.randn(3, 256, 2)
    dense = torch.nn.functional.mse_loss(pred, target)
    torch.testing.assert_close(weighted_point_loss(pred, target, torch.ones(3, 256)), dense)
    torch.testing.assert_close(weighted_point_loss(pred, target, None), dense)


def test_decoder_losses_on_the_full_grid_equal_the_dense_loss():
    torch.manual_seed(0)
    codec = Codec(CFG, INFO)
    fields = torch.randn(2, 2, 16, 16)
    z = codec.encode(fields)
    coords = codec.grid_coords.expand(2, -1, -1)
    targets = fields.flatten(2).transpose(1, 2)  # (B, N, C)
    dense = torch.nn.functional.mse_loss(codec.decode_grid(z), fields)
    torch.testing.assert_close(
        inverse_encoding_loss(codec.decoder, z, coords, targets, torch.ones(2, 256)), dense
    )
    torch.testing.assert_close(
        forward_physical_loss(codec.decoder, z, coords, targets, None), dense
    )


def test_query_sample_ratio_one_is_the_dense_loss_and_below_one_really_samples():
    coords, targets = torch.rand(2, 100, 2), torch.randn(2, 100, 3)
    c, t = sample_in_loss(coords, targets, 1.0)
    assert c is coords and t is targets
    gen = torch.Generator().manual_seed(0)
    c, t = sample_in_loss(coords, targets, 0.3, gen)
    assert c.shape == (2, 30, 2) and t.shape == (2, 30, 3)
    for b in range(2):  # the sampled rows are distinct rows of the input, kept together
        rows = [int((coords[b] == c[b, i]).all(-1).nonzero()) for i in range(30)]
        assert len(set(rows)) == 30
        torch.testing.assert_close(targets[b, rows], t[b])


def test_on_the_fly_sampling_is_unbiased():
    pred, target = torch.randn(1, 200, 1), torch.randn(1, 200, 1)
    coords = torch.cat([pred, target], dim=-1)  # carry pred and target through the sampler together
    dense = weighted_point_loss(pred, target)
    gen = torch.Generator().manual_seed(1)
    draws = []
    for _ in range(2000):
        sub, _ = sample_in_loss(coords, target, 0.3, gen)
        draws.append(weighted_point_loss(sub[..., :1], sub[..., 1:]))
    draws = torch.stack(draws)
    stderr = draws.std() / len(draws) ** 0.5
    assert abs(draws.mean() - dense) < 4 * stderr
    assert 4 * stderr < 0.02 * dense


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_query_sample_ratio_outside_range(ratio):
    with pytest.raises(
        ConfigError, match=r"option 'loss.query_sample_ratio': expected a number in \(0, 1\]"
    ):
        sample_in_loss(torch.rand(1, 10, 1), torch.rand(1, 10, 1), ratio)


def test_ratio_that_selects_no_point_is_an_error():
    with pytest.raises(ConfigError, match=r"ratio 0.05 gives k=0 of N=10 points"):
        sample_in_loss(torch.rand(1, 10, 1), torch.rand(1, 10, 1), 0.05)


def test_latent_rollout_loss_averages_the_one_step_losses():
    torch.manual_seed(0)
    op = LatentOperator(
        OperatorConfig(dim=32, depth=1), latent_dim=16, num_tokens=8, num_params=0, coord_dim=1
    )
    window = torch.randn(2, 4, 8, 16)  # (B, h+1, T, D)
    dt = torch.full((2,), 0.1)
    # identity operator at init: rollout loss = mean over steps of ||z_0 - z_s||^2
    expected = torch.stack(
        [latent_one_step_loss(window[:, 0], window[:, s]) for s in (1, 2, 3)]
    ).mean()
    torch.testing.assert_close(latent_rollout_loss(op, window, dt, None), expected)
