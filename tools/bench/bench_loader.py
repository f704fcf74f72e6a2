"""Loader throughput on the CPU: our torchdata.nodes loader from local zarr and local tars with
0, 1 and 2 workers, next to a plain torch DataLoader over the same zarr store.

Every loader produces the same operator-stage batches: pairs (u_t, u_{t+1}) with latents and
this epoch's sparse (coords, targets, weights) for both snapshots. Prints a markdown table and
writes it to docs/bench_loader.md.

    python tools/bench/bench_loader.py [--out docs/bench_loader.md] [--resolution 128] [--batches 300]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
import zarr
from bench_common import build_latent_shards, environment_lines, forever, markdown_table

from pipeline.collate import BatchSpec, Collate
from pipeline.loader import LoaderConfig, ShardLoader
from pipeline.records import ShardBlock
from pipeline.shards import gather_queries, open_shards
from pipeline.sources.generate import generate


def build_set(root: Path, resolution: int, trajectories: int, steps: int) -> Path:
    data = generate(
        "ns2d", root / "ns.h5", trajectories, steps, resolution, seed=0, dt=0.5, progress=False
    )
    return build_latent_shards(data, root / "shards", epochs=2, ratio=0.1)


# what every loader here produces: operator-stage pairs with latents and sparse terms for both
PAIRS = BatchSpec(window=1, sparse_steps=(0, 1), latents=True)


def time_batches(batches, count: int, batch_size: int) -> float:
    """Snapshot pairs per second over ``count`` batches after one warm-up batch."""
    iterator = iter(batches)
    next(iterator)
    start = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return count * batch_size / (time.perf_counter() - start)


class ZarrPairs(torch.utils.data.Dataset):
    """The plain way: a map-style dataset reading one pair from the zarr store per item."""

    def __init__(self, location: Path):
        self.shards = open_shards(str(location))
        self.group = zarr.open_group(str(location / "zarr"), mode="r")["train"]
        steps = self.shards.steps
        self.starts = [i for i in range(len(self.shards)) if i % steps != steps - 1]
        self.k = self.shards.k_per_epoch[0]
        self.collate = Collate.for_shards(self.shards, PAIRS)
        self.names = list(self.shards.manifest.record_schema())

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        rows = slice(self.starts[i], self.starts[i] + 2)
        block = ShardBlock(**{name: self.group[name][rows] for name in self.names})
        slot = self.shards.slots[0]
        codes = block.queries[:, slot.rows]  # (2, slot bytes): epoch 0's coded sets
        queries = gather_queries(block, codes, slot, self.k, self.shards.beta)
        return {"arrays": self.collate.prepare(block, queries), "row": 0, "epoch": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench_loader.md"))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--trajectories", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=300, help="timed batches per configuration")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        location = build_set(Path(tmp), args.resolution, args.trajectories, args.steps)
        k = open_shards(str(location)).k_per_epoch[0]
        rows = []
        for process, fmt, workers in itertools.product((True, False), ("zarr", "wds"), (0, 1, 2)):
            shards = open_shards(str(location), "train", fmt)
            cfg = LoaderConfig(workers=workers, format=fmt, wrap_epochs=True, process=process)
            loader = ShardLoader(shards, cfg, batch_size=args.batch_size, spec=PAIRS)
            rate = time_batches(forever(loader), args.batches, args.batch_size)
            loader.close()
            where = "loader process" if process else "threads"
            rows.append([f"ours (torchdata.nodes), {fmt}, {where}", str(workers), f"{rate:,.0f}"])
        dataset = ZarrPairs(location)
        for workers in (0, 2):
            plain = torch.utils.data.DataLoader(
                dataset,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=workers,
                collate_fn=dataset.collate,
                persistent_workers=workers > 0,
            )

            rows.append(
                [
                    "plain DataLoader, zarr item reads",
                    str(workers),
                    f"{time_batches(forever(plain), args.batches, args.batch_size):,.0f}",
                ]
            )
    n = args.resolution**2
    lines = [
        "# Loader benchmark (CPU)",
        "",
        *environment_lines(),
        f"- data: generated NS 2D {args.resolution}x{args.resolution}, operator-stage pairs with latents "
        f"(64 tokens x 64), gradient-importance query sets at ratio 0.1 (k = {k} of {n}), "
        f"batch {args.batch_size}, {args.batches} timed batches after one warm-up",
        "- CPU timings on this machine are for relative comparison only; GPU step times are in docs/benchmarks.md",
        "",
        *markdown_table(["loader", "workers", "snapshot pairs/s"], rows),
        "",
        "Throughput only, batches delivered on the CPU: with a loader process each one is also "
        "copied out of its shared slot here. What the loader costs a training step on a GPU is "
        "measured there, in docs/benchmarks.md.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
