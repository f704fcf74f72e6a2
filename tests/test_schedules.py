"""k_e schedules: values per kind, rounding to a multiple of 64, the dense tail, errors."""

from __future__ import annotations

import re

import pytest

from pipeline.config import ConfigError, from_dict
from pipeline.schedules import ScheduleConfig, k_per_epoch, ratio_per_epoch

N = 16384


def test_constant() -> None:
    assert (
        k_per_epoch(ScheduleConfig(start_ratio=0.3), 4, N) == [4928] * 4
    )  # 0.3 N = 4915.2 -> 77 * 64


def test_linear_holds_before_start_epoch_then_ramps_to_the_last_sampled_epoch() -> None:
    cfg = ScheduleConfig(
        kind="linear", start_ratio=0.5, end_ratio=0.1, start_epoch=2, dense_tail_epochs=2
    )
    ratios = ratio_per_epoch(cfg, 12)
    assert ratios[:3] == [0.5, 0.5, 0.5]
    assert ratios[5] == pytest.approx(0.5 - 0.4 * 3 / 7)
    assert ratios[9] == pytest.approx(0.1) and ratios[10:] == [1.0, 1.0]
    ks = k_per_epoch(cfg, 12, N)
    assert ks[0] == 8192 and ks[9] == 1664 and ks[10:] == [N, N]
    assert all(k % 64 == 0 for k in ks)


def test_cosine_starts_slow_and_ends_at_end_ratio() -> None:
    ratios = ratio_per_epoch(ScheduleConfig(kind="cosine", start_ratio=0.5, end_ratio=0.1), 11)
    assert ratios[0] == 0.5 and ratios[5] == pytest.approx(0.3) and ratios[10] == pytest.approx(0.1)
    assert ratios[1] == pytest.approx(0.1 + 0.4 * 0.5 * (1 + 0.9510565163))


def test_step_multiplies_every_step_epochs_and_stops_at_end_ratio() -> None:
    cfg = ScheduleConfig(
        kind="step", start_ratio=0.4, end_ratio=0.08, step_epochs=3, step_factor=0.5
    )
    assert ratio_per_epoch(cfg, 10) == [0.4] * 3 + [0.2] * 3 + [0.1] * 3 + [0.08]
    up = ScheduleConfig(kind="step", start_ratio=0.1, end_ratio=0.3, step_epochs=1, step_factor=2.0)
    assert ratio_per_epoch(up, 4) == [0.1, 0.2, 0.3, 0.3]


def test_rounding_to_a_multiple_never_zero_and_never_n() -> None:
    assert k_per_epoch(ScheduleConfig(start_ratio=0.001), 1, N) == [
        64
    ]  # 16.4 points -> one multiple
    assert k_per_epoch(ScheduleConfig(start_ratio=0.999), 1, N) == [
        N - 64
    ]  # rounds up to N -> below
    assert k_per_epoch(ScheduleConfig(start_ratio=0.3, multiple=1), 1, N) == [4915]
    assert k_per_epoch(ScheduleConfig(start_ratio=0.3), 1, 50) == [15]  # N <= 64: nearest integer
    assert k_per_epoch(ScheduleConfig(start_ratio=0.01), 1, 50) == [1]


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"start_ratio": 1.5}, "schedule.start_ratio"),
        ({"start_ratio": 0.0}, "schedule.start_ratio"),
        ({"kind": "linear", "end_ratio": 1.5}, "schedule.end_ratio"),
        ({"kind": "exponential"}, "schedule.kind"),
        ({"end_ratio": 0.1}, "schedule.end_ratio"),  # constant with a different end
        ({"kind": "step", "end_ratio": 0.5, "step_factor": 0.5}, "schedule.step_factor"),
        ({"multiple": 0}, "schedule.multiple"),
        ({"dense_tail_epochs": -1}, "schedule.dense_tail_epochs"),
    ],
)
def test_bad_config_is_a_clear_error(overrides: dict, option: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(option)):
        from_dict(ScheduleConfig, overrides)


def test_k_at_least_n_outside_the_dense_tail_is_an_error() -> None:
    with pytest.raises(ConfigError, match="sampling must really sample"):
        k_per_epoch(ScheduleConfig(start_ratio=0.97), 3, 10)  # 9.7 of 10 points rounds to 10
    growing = ScheduleConfig(kind="step", start_ratio=0.5, step_epochs=1, step_factor=2.0)
    with pytest.raises(ConfigError, match="epoch 2 has ratio 2"):
        k_per_epoch(growing, 3, N)  # 0.5, then 1.0 (dense), then 2.0
    with pytest.raises(ConfigError, match="dense_tail_epochs"):
        k_per_epoch(ScheduleConfig(dense_tail_epochs=3), 3, N)
    with pytest.raises(ConfigError, match="start_epoch"):
        k_per_epoch(ScheduleConfig(kind="linear", end_ratio=0.1, start_epoch=5), 5, N)


def test_curriculum_from_dense() -> None:
    """The seed's curriculum: cosine from dense (1.0) down to 0.2, then a dense tail."""
    cfg = ScheduleConfig(kind="cosine", start_ratio=1.0, end_ratio=0.2, dense_tail_epochs=2)
    ks = k_per_epoch(cfg, 12, N)
    assert ks[0] == N and ks[-2:] == [N, N]  # dense first epoch, dense tail
    assert ks[1:10] == sorted(ks[1:10], reverse=True) and ks[1] > ks[9]  # falling
    assert ks[9] == 64 * round(0.2 * N / 64) and all(k % 64 == 0 for k in ks[1:10])
    assert k_per_epoch(ScheduleConfig(start_ratio=1.0), 2, N) == [N, N]  # every epoch dense
