"""What a refresh reads of a shard: the whole record (``ShardSet.read_shard``) against its ids,
fields and latent only (``ShardSet.read_fields``, what the error needs), for both formats and
query sets of a few k/N ratios over many epochs, on the CPU.

A shard's query sets of every epoch are most of its bytes once there are many epochs (the
study's sets hold 199), and a refresh reads every train shard each time it runs. Prints a
markdown table and writes it to docs/bench_shard_reads.md (numbers in docs/bench/).

    python tools/bench/bench_shard_reads.py [--epochs 199] [--ratios 0.1 0.3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_common import build_latent_shards, environment_lines, markdown_table, synthetic_data

from pipeline.records import ShardBlock, SnapshotFields
from pipeline.shards import ShardSet, open_shards


def seconds_per_shard(
    shards: ShardSet, read: Callable[[int], ShardBlock | SnapshotFields], repeats: int
) -> tuple[float, int]:
    """(the median over ``repeats`` passes of a pass's seconds per shard, bytes per shard)."""
    passes, nbytes = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        nbytes = sum(read(index).nbytes for index in range(len(shards.shards)))
        passes.append((time.perf_counter() - start) / len(shards.shards))
    return statistics.median(passes), nbytes // len(shards.shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench_shard_reads.md"))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--trajectories", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--trajectories-per-shard", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=199, help="query sets per snapshot")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the shards")
    args = parser.parse_args()
    for name in ("resolution", "trajectories", "steps", "trajectories_per_shard", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not all(0 < r <= 1 for r in args.ratios):
        parser.error(f"--ratios must lie in (0, 1], got {args.ratios}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = synthetic_data(work, "ns2d", args.resolution, args.trajectories, args.steps, "cpu")
        for ratio in args.ratios:
            start = time.perf_counter()
            location = build_latent_shards(
                data, work / f"k{ratio}", args.epochs, ratio, args.trajectories_per_shard
            )
            print(f"built k/N {ratio} in {time.perf_counter() - start:.0f} s", flush=True)
            for fmt in ("zarr", "wds"):
                shards = open_shards(str(location), "train", fmt)
                whole, whole_bytes = seconds_per_shard(
                    shards, lambda i, s=shards: s.read_shard(i, cache=False), args.repeats
                )
                part, part_bytes = seconds_per_shard(shards, shards.read_fields, args.repeats)
                snapshots = len(shards) // len(shards.shards)
                results.append(
                    {
                        "ratio": ratio,
                        "format": fmt,
                        "epochs": args.epochs,
                        "snapshots_per_shard": snapshots,
                        "read_shard_bytes": whole_bytes,
                        "read_fields_bytes": part_bytes,
                        "read_shard_seconds": whole,
                        "read_fields_seconds": part,
                    }
                )
                rows.append(
                    [
                        f"{ratio:g}",
                        fmt,
                        str(snapshots),
                        f"{whole_bytes / 2**20:.1f}",
                        f"{part_bytes / 2**20:.1f}",
                        f"{whole * 1e3:.0f}",
                        f"{part * 1e3:.0f}",
                        f"{whole / part:.1f}x",
                    ]
                )
                print(
                    f"k/N {ratio:g} {fmt}: read_shard {whole * 1e3:.0f} ms, read_fields "
                    f"{part * 1e3:.0f} ms a shard",
                    flush=True,
                )

    header = [
        "k/N",
        "format",
        "snapshots a shard (mean)",
        "read_shard MiB",
        "read_fields MiB",
        "read_shard ms",
        "read_fields ms",
        "faster",
    ]
    lines = [
        "# Shard reads: the whole record against what a refresh needs (CPU)",
        "",
        *environment_lines(),
        f"- data: generated NS 2D {args.resolution}x{args.resolution}, {args.trajectories} "
        f"trajectories x {args.steps} snapshots; latent shards of {args.epochs} epochs of "
        f"gradient query sets, {args.trajectories_per_shard} trajectories a shard, local disk",
        f"- each time: the median over {args.repeats} passes of a pass's seconds per train shard; "
        "MiB: the arrays a read returns, per shard",
        "",
        "`read_shard` returns every array of the record, the query sets of every epoch among "
        "them; `read_fields` returns the ids, fields and latent, what a refresh's error needs "
        "(zarr reads only those arrays' chunk files; a tar is read and checked whole, and only "
        "those members are decoded).",
        "",
        *markdown_table(header, rows),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    numbers = args.out.parent / "bench" / f"{args.out.stem}.json"
    numbers.parent.mkdir(parents=True, exist_ok=True)
    settings = vars(args) | {"out": str(args.out)}
    numbers.write_text(json.dumps({"args": settings, "results": results}, indent=1))
    print(f"wrote {args.out} and {numbers}")


if __name__ == "__main__":
    main()
