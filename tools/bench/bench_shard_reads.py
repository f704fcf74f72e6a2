"""What a refresh and a training epoch read of a shard, for both formats and query sets of a
few k/N ratios over many epochs, on the CPU: the whole record (``ShardSet.read_shard``) against
what each needs. A refresh's error needs the ids, fields and latent (``read_fields``); a
training stream keeps a shard without its query sets (``read_block``, read once while the split
fits its cache) and reads each epoch's coded sets (``read_codes``), apart where the format
stores them apart (zarr chunks them every ``QUERY_CHUNK_BYTES`` of a snapshot's sets).

A shard's query sets of every epoch are most of its bytes once there are many epochs (the
study's sets hold 199). Prints a markdown table and writes it to docs/bench_shard_reads.md
(numbers in docs/bench/).

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

import numpy as np
from bench_common import build_latent_shards, environment_lines, markdown_table, synthetic_data

from pipeline.records import ShardBlock, SnapshotBlock, SnapshotFields
from pipeline.shards import ShardSet, open_shards

Read = Callable[[ShardSet, int], ShardBlock | SnapshotBlock | SnapshotFields | np.ndarray]
# the reads compared: name -> (what it returns, the read of shard i)
READS: dict[str, tuple[str, Read]] = {
    "read_shard": ("the whole record", lambda s, i: s.read_shard(i, cache=False)),
    "read_fields": ("ids, fields, latent (a refresh)", lambda s, i: s.read_fields(i)),
    "read_block": ("all but the query sets (a stream, once)", lambda s, i: s.read_block(i)),
    "read_codes": (
        "one epoch's coded sets (a stream, each epoch)",
        lambda s, i: s.read_codes(i, s.epochs // 2),
    ),
}


def seconds_per_shard(shards: ShardSet, read: Read, repeats: int) -> tuple[float, int]:
    """(the median over ``repeats`` passes of a pass's seconds per shard, bytes per shard)."""
    passes, nbytes = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        nbytes = sum(read(shards, index).nbytes for index in range(len(shards.shards)))
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
                snapshots = len(shards) // len(shards.shards)
                result = {"ratio": ratio, "format": fmt, "epochs": args.epochs}
                result |= {"snapshots_per_shard": snapshots, "codes_epoch": shards.epochs // 2}
                for name, (what, read) in READS.items():
                    seconds, nbytes = seconds_per_shard(shards, read, args.repeats)
                    result |= {f"{name}_bytes": nbytes, f"{name}_seconds": seconds}
                    rows.append(
                        [
                            f"{ratio:g}",
                            fmt,
                            str(snapshots),
                            f"`{name}`",
                            what,
                            f"{nbytes / 2**20:.2f}",
                            f"{seconds * 1e3:.1f}",
                            f"{seconds / result['read_shard_seconds']:.2f}",
                        ]
                    )
                    print(f"k/N {ratio:g} {fmt}: {name} {seconds * 1e3:.1f} ms a shard", flush=True)
                results.append(result)

    header = [
        "k/N",
        "format",
        "snapshots a shard (mean)",
        "read",
        "returns",
        "MiB",
        "ms",
        "of read_shard's time",
    ]
    lines = [
        "# Shard reads: the whole record against what a refresh and an epoch need (CPU)",
        "",
        *environment_lines(),
        f"- data: generated NS 2D {args.resolution}x{args.resolution}, {args.trajectories} "
        f"trajectories x {args.steps} snapshots; latent shards of {args.epochs} epochs of "
        f"gradient query sets, {args.trajectories_per_shard} trajectories a shard, local disk",
        f"- each time: the median over {args.repeats} passes of a pass's seconds per train shard; "
        "MiB: the arrays a read returns, per shard",
        "",
        "`read_shard` returns every array of the record, the query sets of every epoch among "
        "them; `read_fields` the ids, fields and latent, what a refresh's error needs; "
        "`read_block` what a training stream keeps of a shard in its cache (zarr: all but the "
        "query sets; a tar: the whole record, since its file is read whole anyway); "
        "`read_codes` one epoch's coded query sets (the middle epoch's), what a stream reads "
        "each epoch besides (zarr: from the chunks of the query sets' byte axis that hold that "
        "epoch's slot; a tar is read and checked whole, and only that member is decoded). "
        "zarr reads only the chunk files of what it returns.",
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
