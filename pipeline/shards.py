"""Reading a finished shard set: ``open_shards(path_or_url)``.

Works on both formats and on local paths, ``file://``, ``http(s)://`` and fsspec URLs. Every
file is checked against the manifest's sha256 when it is read, so a corrupt or edited shard is
reported by name instead of silently training on bad data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch

from pipeline.manifest import read_manifest
from pipeline.query_codec import bitmask_to_indices
from pipeline.records import ShardBlock, ShardError
from pipeline.samplers import weights_from_scale
from pipeline.storage import join, read_bytes, sha256_bytes
from pipeline.wds_format import read_tar
from pipeline.zarr_format import ZarrReader


def query_set(
    bitmask: np.ndarray, importance: np.ndarray, pi_scale: np.ndarray, k: int, beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """One snapshot-epoch's query indices (k,) int64 and weights (k,) float32 from its stored record.

    The weights w_i = (k / (N pi_i))^beta follow from the stored q and k_e (pi = inclusion
    probabilities); ``pi_scale`` caches the two integers of that derivation, so only q at the k
    points is needed.
    """
    n = importance.shape[-1]
    indices = bitmask_to_indices(bitmask, n)
    if len(indices) != k:
        raise ShardError(f"query bitmask holds {len(indices)} points, the manifest says k={k}")
    q_at = torch.from_numpy(np.ascontiguousarray(importance[indices], dtype=np.float32))[None]
    w = weights_from_scale(q_at, n, k, torch.from_numpy(np.asarray(pi_scale))[None], beta)[0]
    return indices, w.numpy()


class ShardSet:
    """One split of a shard set: snapshots by index, whole shards by index, query sets by epoch."""

    def __init__(
        self, location: str, split: str = "train", format: Literal["auto", "zarr", "wds"] = "auto"
    ):
        self.location = str(location).rstrip("/")
        self.manifest, self.manifest_sha256 = read_manifest(self.location)
        splits = self.manifest["splits"]
        if split not in splits:
            raise ShardError(
                f"{self.location}: no split '{split}'; the manifest has {sorted(splits)}"
            )
        available = self.manifest["formats"]
        if format == "auto":
            format = "zarr" if "zarr" in available else "wds"
        if format not in available:
            raise ShardError(f"{self.location}: no '{format}' shards; the manifest has {available}")
        self.split, self.format = split, format
        self.shards: list[dict[str, Any]] = splits[split]["shards"]
        self.grid = tuple(self.manifest["data"]["grid"])
        self.k_per_epoch: list[int] = self.manifest["k_per_epoch"]
        self.beta = float(self.manifest["config"]["sampler"]["beta"])
        self._checksums = {name: entry["sha256"] for name, entry in self.manifest["files"].items()}
        self._zarr = (
            ZarrReader(join(self.location, "zarr"), split, self._checksums)
            if format == "zarr"
            else None
        )
        self._cached: tuple[int, ShardBlock] | None = None

    @property
    def sample_set_id(self) -> str:
        return self.manifest["sample_set_id"]

    @property
    def epochs(self) -> int:
        return len(self.k_per_epoch)

    def __len__(self) -> int:
        return sum(s["count"] for s in self.shards)

    def k_for_epoch(self, epoch: int, wrap: bool = False) -> tuple[int, int]:
        """(query-set index, k) for a training epoch; epochs beyond the precomputed sets need ``wrap``."""
        if epoch >= self.epochs and not wrap:
            raise ShardError(
                f"{self.location}: epoch {epoch} is beyond the {self.epochs} precomputed query sets; "
                "rebuild with more epochs or set wrap_epochs=true to reuse them cyclically"
            )
        stored = epoch % self.epochs
        return stored, self.k_per_epoch[stored]

    def read_shard(self, index: int, cache: bool = True) -> ShardBlock:
        """All snapshots of shard ``index`` of this split, checked against the manifest.

        ``cache`` keeps the last block for repeated ``snapshot``/``query_set`` calls; streaming
        readers pass False (and may then read from several threads).
        """
        if cache and self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        shard = self.shards[index]
        if self.format == "zarr":
            block = self._zarr.read(shard["start"], shard["start"] + shard["count"])
        else:
            block = read_tar(self._read_verified(shard["tar"]), join(self.location, shard["tar"]))
        if len(block) != shard["count"]:
            raise ShardError(
                f"{self.location}: shard {index} of '{self.split}' holds {len(block)} snapshots, manifest says {shard['count']}"
            )
        if cache:
            self._cached = (index, block)
        return block

    def _read_verified(self, name: str) -> bytes:
        location = join(self.location, name)
        try:
            data = read_bytes(location)
        except (FileNotFoundError, OSError) as err:
            raise ShardError(f"{location}: missing shard file ({err})") from None
        entry = self.manifest["files"][name]
        if len(data) != entry["bytes"]:
            raise ShardError(
                f"{location}: {len(data)} bytes, the manifest says {entry['bytes']} (truncated shard file)"
            )
        if sha256_bytes(data) != entry["sha256"]:
            raise ShardError(f"{location}: checksum mismatch (corrupt or edited shard file)")
        return data

    def locate(self, i: int) -> tuple[int, int]:
        """(shard index, row within the shard) of snapshot ``i`` of this split."""
        if not 0 <= i < len(self):
            raise IndexError(f"snapshot {i} out of range [0, {len(self)}) in split '{self.split}'")
        for index, shard in enumerate(self.shards):
            if i < shard["start"] + shard["count"]:
                return index, i - shard["start"]
        raise AssertionError("unreachable")

    def snapshot(self, i: int) -> dict[str, Any]:
        """Snapshot ``i`` of this split: ids and arrays (fields in physical units, latent if any)."""
        index, row = self.locate(i)
        block = self.read_shard(index)
        return {
            name: (value[row].item() if value.ndim == 1 else value[row])
            for name, value in block.arrays().items()
        }

    def query_set(self, i: int, epoch: int, wrap: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(flat C-order indices, weights) of snapshot ``i`` in ``epoch``; uniform sampling gives 1.0."""
        stored, k = self.k_for_epoch(epoch, wrap)
        index, row = self.locate(i)
        block = self.read_shard(index)
        return query_set(
            block.queries[row, stored],
            block.importance[row],
            block.pi_scale[row, stored],
            k,
            self.beta,
        )

    def trajectories(self, limit: int | None = None) -> Iterator[np.ndarray]:
        """Whole trajectories of this split, each (T, C, *grid) in physical units, in stored order."""
        steps = self.manifest["splits"][self.split]["snapshots_per_trajectory"]
        produced = 0
        for index in range(len(self.shards)):
            block = self.read_shard(index)
            for first in range(0, len(block), steps):
                if limit is not None and produced >= limit:
                    return
                yield block.fields[first : first + steps]
                produced += 1

    def verify(self) -> list[str]:
        """Read every file of the set (all splits) and return a message per problem found."""
        problems = []
        for name in sorted(self.manifest["files"]):
            try:
                self._read_verified(name)
            except ShardError as err:
                problems.append(str(err))
        return problems


def open_shards(
    location: str, split: str = "train", format: Literal["auto", "zarr", "wds"] = "auto"
) -> ShardSet:
    """Open one split of a finished shard set at a local path or URL."""
    return ShardSet(str(location), split, format)
