"""How the streaming loader runs: its order's seed, its threads, read-ahead, cache and mode.

None of these options but ``seed``, ``partitions`` and ``shuffle_shards`` changes the batches:
those three and the (global) batch size decide the sequence of global batches, and the world size
only how each batch is shared among the ranks (docs/design.md, section 7).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import check
from pipeline.storage import RemoteConfig


@dataclass
class LoaderConfig:
    seed: int = 0  # data order (shard permutation, shuffle buffer); independent of the model seed
    workers: int = 2  # threads collating whole batches from the prepared arrays; 0 = inline
    prefetch: int = 4  # batches prepared ahead
    shuffle_shards: int = 4  # shard segments mixed by the shuffle buffer
    # slices of an epoch's examples that each global batch draws from equally; a run resumes on
    # any number of ranks that divides it (each rank streams whole partitions)
    partitions: int = 4
    read_threads: int = 4  # shards read (decompressed, verified) and query sets decoded in parallel
    read_ahead: int = 2  # groups of shards read ahead of the one streaming
    cache_mb: int = 2048  # decoded shards kept in RAM for later epochs (0: read every epoch)
    format: Literal["auto", "zarr", "wds"] = "auto"
    wrap_epochs: bool = False  # reuse the precomputed query sets cyclically beyond their epochs
    process: bool = True  # run the graph in a child process (pipeline/loader_process.py)
    remote: RemoteConfig = field(default_factory=RemoteConfig)  # timeouts, retries of URLs

    def __post_init__(self) -> None:
        # numpy's SeedSequence, which keys the order, takes no negative integer
        check(self.seed >= 0, "loader.seed", "an integer >= 0", self.seed)
        check(self.workers >= 0, "loader.workers", "an integer >= 0", self.workers)
        check(self.read_threads >= 1, "loader.read_threads", "an integer >= 1", self.read_threads)
        check(self.read_ahead >= 0, "loader.read_ahead", "an integer >= 0", self.read_ahead)
        check(self.cache_mb >= 0, "loader.cache_mb", "an integer >= 0", self.cache_mb)
        check(self.prefetch >= 1, "loader.prefetch", "an integer >= 1", self.prefetch)
        check(self.partitions >= 1, "loader.partitions", "an integer >= 1", self.partitions)
        check(
            self.shuffle_shards >= 1,
            "loader.shuffle_shards",
            "an integer >= 1",
            self.shuffle_shards,
        )
