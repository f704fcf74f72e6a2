"""Trajectory-disjoint splits and train-only normalisation statistics."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import check
from pipeline.sources.pdebench import DataError, PDEBenchFile

SPLITS = ("train", "val", "test")
NORM_THREADS = 8  # trajectories summed at once by trajectory_sums


@dataclass
class DataConfig:
    """Which HDF5 file, and how its trajectories are split."""

    path: str = "data/burgers1d.h5"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    # auto: the file's 'boundary' attribute (periodic when absent)
    boundary: Literal["auto", "periodic", "nonperiodic"] = "auto"

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            check(0.0 < value < 0.5, f"data.{name}", "a number in (0, 0.5)", value)

    def open(self) -> tuple[PDEBenchFile, dict[str, list[int]]]:
        """The source file and its trajectory-disjoint splits."""
        source = PDEBenchFile(self.path, boundary=self.boundary)
        return source, split_trajectories(
            len(source), self.val_fraction, self.test_fraction, self.split_seed
        )


def split_trajectories(
    num_trajectories: int, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[int]]:
    """Assign whole trajectories to train/val/test (never snapshots of one trajectory to two splits)."""
    n_val = max(1, round(val_fraction * num_trajectories))
    n_test = max(1, round(test_fraction * num_trajectories))
    if num_trajectories - n_val - n_test < 1:
        raise DataError(
            f"{num_trajectories} trajectories cannot give non-empty train/val/test splits "
            f"(val_fraction={val_fraction}, test_fraction={test_fraction})"
        )
    order = np.random.default_rng(seed).permutation(num_trajectories)
    return {
        "train": sorted(order[n_val + n_test :].tolist()),
        "val": sorted(order[:n_val].tolist()),
        "test": sorted(order[n_val : n_val + n_test].tolist()),
    }


@dataclass(frozen=True)
class NormStats:
    """Per-channel mean and std of the training split, used to normalise model inputs and targets."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_trajectories(
        cls, source: PDEBenchFile, train_ids: list[int], progress: bool = True
    ) -> NormStats:
        """Streamed float64 sums over the training trajectories only."""
        return cls.from_sums(trajectory_sums(source, train_ids, progress))

    @classmethod
    def from_sums(cls, sums: list[TrajectorySums]) -> NormStats:
        """The statistics of trajectories' sums, added in the list's order: the same order gives
        the same bits however the sums were computed (threads, or shares of a build's ranks)."""
        total: np.ndarray | float = 0.0
        total_sq: np.ndarray | float = 0.0
        count = 0
        for s, sq, n in sums:
            total = total + np.asarray(s, dtype=np.float64)
            total_sq = total_sq + np.asarray(sq, dtype=np.float64)
            count += n
        mean = np.asarray(total) / count
        std = np.sqrt(np.maximum(np.asarray(total_sq) / count - mean**2, 0.0))
        std = np.where(std > 1e-12, std, 1.0)  # a constant channel stays unscaled
        return cls(tuple(mean.tolist()), tuple(std.tolist()))

    def _shape(self, x: torch.Tensor, channel_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = [1] * x.ndim
        shape[channel_axis] = -1
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return mean, std

    def normalize(self, x: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
        mean, std = self._shape(x, channel_axis)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor, channel_axis: int = 1) -> torch.Tensor:
        mean, std = self._shape(x, channel_axis)
        return x * std + mean


# one trajectory's per-channel float64 sum and sum of squares, and its values per channel
TrajectorySums = tuple[list[float], list[float], int]


def trajectory_sums(
    source: PDEBenchFile, ids: list[int], progress: bool = True
) -> list[TrajectorySums]:
    """The sums of trajectories ``ids``, in that order.

    A whole PDEBench file takes seconds of arithmetic, which a multi-GPU build's other ranks
    wait for: the file is read here in order while a thread pool (numpy releases the
    interpreter lock) sums each trajectory."""
    threads = min(NORM_THREADS, os.cpu_count() or 1)
    n_ch = len(source.info.channels)
    out: list[TrajectorySums] = []

    def add(sums: Future) -> None:
        s, sq, n = sums.result()
        out.append((s.tolist(), sq.tolist(), n))

    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future] = deque()
        for i in tqdm(ids, desc="norm stats", disable=not progress, leave=False):
            traj = source.trajectory(i)  # (T, C, *grid)
            pending.append(pool.submit(lambda t: (*_channel_sums(t), t.size // n_ch), traj))
            if len(pending) > 2 * threads:  # a bounded number of trajectories in memory
                add(pending.popleft())
        while pending:
            add(pending.popleft())
    return out


def _channel_sums(traj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float64 sum and sum of squares of one trajectory (T, C, *grid) -> (C,), (C,)."""
    values = traj.astype(np.float64)
    axes = (0, *range(2, values.ndim))
    return values.sum(axis=axes), np.square(values).sum(axis=axes)
