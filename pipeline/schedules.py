"""Per-epoch query counts k_e: how many of a snapshot's N points each epoch's losses see.

The ratio k_e / N follows a schedule from ``start_ratio`` to ``end_ratio`` (held at
``start_ratio`` before ``start_epoch``), the last ``dense_tail_epochs`` epochs are dense
(k_e = N), and k_e is rounded to a multiple of ``multiple`` so compiled kernels see few shapes.
Sampling must really sample: outside the dense tail a k_e >= N is an error, never a silent dense
epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.config import ConfigError, check

# ScheduleConfig.kind is a str checked against these in __post_init__, not a Literal: so a bad
# kind is reported as 'schedule.kind' also by from_dict(ScheduleConfig, ...); --help shows them
# through the field's metadata.
SCHEDULE_KINDS = ("constant", "linear", "cosine", "step")


def _is_ratio(value: float) -> bool:
    """A share of the points in (0, 1]; 1.0 is a dense epoch (every point, weight 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 < value <= 1.0


@dataclass
class ScheduleConfig:
    """The k_e schedule.

    constant: start_ratio throughout. linear / cosine: from start_ratio at start_epoch to end_ratio
    at the last sampled epoch. step: start_ratio * step_factor ** (epochs since start_epoch //
    step_epochs), not past end_ratio when it is set.
    """

    # how k_e / N moves from start_ratio to end_ratio
    kind: str = field(default="constant", metadata={"choices": SCHEDULE_KINDS})
    start_ratio: float = 0.3  # k_e / N at the start, in (0, 1]; 1.0: dense epochs
    end_ratio: float | None = None  # None: the same as start_ratio
    start_epoch: int = 0  # epochs held at start_ratio before the schedule moves
    step_epochs: int = 10  # step: epochs per step
    step_factor: float = 0.5  # step: the ratio's factor per step
    dense_tail_epochs: int = 0  # last epochs with every point (k_e = N)
    multiple: int = 64  # k_e rounded to a multiple of this (N <= multiple: the nearest integer)

    def __post_init__(self) -> None:
        check(
            self.kind in SCHEDULE_KINDS,
            "schedule.kind",
            f"one of {list(SCHEDULE_KINDS)}",
            self.kind,
        )
        check(
            _is_ratio(self.start_ratio),
            "schedule.start_ratio",
            "a number in (0, 1] (1.0: dense)",
            self.start_ratio,
        )
        check(
            self.end_ratio is None or _is_ratio(self.end_ratio),
            "schedule.end_ratio",
            "null or a number in (0, 1] (1.0: dense)",
            self.end_ratio,
        )
        check(
            self.kind != "constant" or self.end_ratio in (None, self.start_ratio),
            "schedule.end_ratio",
            "null (or equal to start_ratio) for a constant schedule",
            self.end_ratio,
        )
        check(self.start_epoch >= 0, "schedule.start_epoch", "an integer >= 0", self.start_epoch)
        check(self.step_epochs >= 1, "schedule.step_epochs", "an integer >= 1", self.step_epochs)
        check(self.step_factor > 0, "schedule.step_factor", "a number > 0", self.step_factor)
        check(
            self.kind != "step"
            or self.end_ratio in (None, self.start_ratio)
            or (self.step_factor < 1) == (self.end_ratio < self.start_ratio),
            "schedule.step_factor",
            "a factor that moves start_ratio towards end_ratio (< 1 to decrease, > 1 to increase)",
            self.step_factor,
        )
        check(
            self.dense_tail_epochs >= 0,
            "schedule.dense_tail_epochs",
            "an integer >= 0",
            self.dense_tail_epochs,
        )
        check(self.multiple >= 1, "schedule.multiple", "an integer >= 1", self.multiple)

    @property
    def target_ratio(self) -> float:
        return self.start_ratio if self.end_ratio is None else self.end_ratio


def _progress(cfg: ScheduleConfig, epoch: int, last: int) -> float:
    """0 up to start_epoch, rising linearly to 1 at the last sampled epoch."""
    return min(1.0, max(0.0, (epoch - cfg.start_epoch) / max(1, last - cfg.start_epoch)))


def _ratio(cfg: ScheduleConfig, epoch: int, last: int) -> float:
    start, end = cfg.start_ratio, cfg.target_ratio
    if cfg.kind == "constant":
        return start
    if cfg.kind == "linear":
        return start + (end - start) * _progress(cfg, epoch, last)
    if cfg.kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * _progress(cfg, epoch, last)))
    steps = max(0, epoch - cfg.start_epoch) // cfg.step_epochs
    ratio = start * cfg.step_factor**steps
    if cfg.end_ratio is None:
        return ratio
    return max(ratio, end) if end <= start else min(ratio, end)


def ratio_per_epoch(cfg: ScheduleConfig, epochs: int) -> list[float]:
    """The scheduled ratio k_e / N of each epoch before rounding; 1.0 in the dense tail."""
    check(isinstance(epochs, int) and epochs >= 1, "epochs", "an integer >= 1", epochs)
    sampled = epochs - cfg.dense_tail_epochs
    check(
        sampled >= 1,
        "schedule.dense_tail_epochs",
        f"fewer than the {epochs} epochs (at least one epoch must sample)",
        cfg.dense_tail_epochs,
    )
    check(
        cfg.kind == "constant" or cfg.start_epoch < sampled,
        "schedule.start_epoch",
        f"an epoch before the dense tail (< {sampled})",
        cfg.start_epoch,
    )
    return [_ratio(cfg, e, sampled - 1) for e in range(sampled)] + [1.0] * cfg.dense_tail_epochs


def _round_k(ratio: float, n_points: int, multiple: int, epoch: int) -> int:
    """k for ratio: N for a ratio of 1.0 (dense); else the nearest multiple of ``multiple`` below N
    (at least one multiple), or, when N <= multiple and no multiple fits, the nearest integer >= 1.
    A ratio above 1, or below 1 with a k that reaches N, is an error."""
    if ratio == 1.0:
        return n_points
    k = max(1, round(ratio * n_points))
    if ratio < 1.0 and n_points > multiple:
        k = max(multiple, multiple * round(k / multiple))
        if k >= n_points:  # rounding up reached N: take the largest multiple below it
            k = multiple * ((n_points - 1) // multiple)
    if k >= n_points:
        raise ConfigError(
            f"schedule: epoch {epoch} has ratio {ratio:.4g} of N={n_points} points, k={k} >= N; "
            "sampling must really sample: lower the ratio, or use schedule.dense_tail_epochs for dense epochs"
        )
    return k


def k_per_epoch(cfg: ScheduleConfig, epochs: int, n_points: int) -> list[int]:
    """k_e for each of the ``epochs`` epochs of a grid of ``n_points`` points (k_e = N in the dense tail)."""
    check(isinstance(n_points, int) and n_points >= 2, "n_points", "an integer >= 2", n_points)
    ratios = ratio_per_epoch(cfg, epochs)
    sampled = epochs - cfg.dense_tail_epochs
    return [
        n_points if epoch >= sampled else _round_k(ratio, n_points, cfg.multiple, epoch)
        for epoch, ratio in enumerate(ratios)
    ]
