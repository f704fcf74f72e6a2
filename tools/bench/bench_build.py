"""Benchmark build_shards end to end: per-stage seconds, snapshot-epochs/s, GPU utilisation and
query-set bytes against the entropy bound, on a synthetic PDEBench-layout data set.

python tools/bench/bench_build.py --pde ns2d --resolution 128 --trajectories 200 --steps 21 \
    --epochs 50 --sampler gradient [--world-sizes 1,2,4] [--root OTHER_CHECKOUT ...]

Each build runs in its own processes, one per rank and GPU (``--world-sizes``), as a distributed
build does; ``--root`` runs the same build with the ``pipeline`` package of another checkout,
for before/after tables measured side by side. The data file is generated once, on the GPU when
there is one. Each finished build is saved to ``--json`` at once, and a rerun with the same
settings keeps those and runs only the rest: a long benchmark (many epochs, several world sizes)
can span several sittings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_common import ROOT, environment_lines, markdown_table, synthetic_data

from pipeline.build import STAGES
from pipeline.storage import write_atomic

# one rank's process; its clock readings (time.time(), comparable across the processes) let the
# report split the wall-clock into the interpreter's start, the imports, run_build and the exit
BUILD_ONE = """
import time
began = time.time()
import json, sys
sys.path.insert(0, sys.argv[1])
from pipeline.build import BuildConfig, run_build
from pipeline.config import load_config
cfg = load_config(BuildConfig, None, json.loads(sys.argv[2]))
imported = time.time()
summary = run_build(cfg)
ended = time.time()
manifest = summary.pop("manifest", None)
out = {"seconds": summary["seconds"], "snapshots": summary["snapshots"],
       "device": summary["device"], "clock": {"began": began, "imported": imported, "ended": ended}}
if manifest is not None:
    out.update(query_bytes=manifest.query_bytes, k_per_epoch=manifest.k_per_epoch)
print(json.dumps(out))
"""


class GpuSampler:
    """Mean utilisation of the first ``gpus`` GPUs over a build, from nvidia-smi sampling every
    200 ms (None without)."""

    def __init__(self, gpus: int):
        self.gpus = gpus

    def __enter__(self) -> GpuSampler:
        self.proc = None
        if torch.cuda.is_available() and shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=index,utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        return self

    def __exit__(self, *exc) -> None:
        self.mean = None
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate()
            values = []
            for line in out.splitlines():
                index, _, util = line.partition(",")
                if index.strip().isdigit() and int(index) < self.gpus and util.strip().isdigit():
                    values.append(float(util))
            self.mean = sum(values) / len(values) if values else None


def checkout(root: Path) -> str:
    """A checkout's path as results record it: relative to this one ("." itself)."""
    return os.path.relpath(root.resolve(), ROOT)


def build(root: Path, args: argparse.Namespace, data: Path, out: Path, world: int) -> dict:
    """One whole build into ``out`` (this benchmark's own directory, emptied first) by ``world``
    rank processes, rank r on GPU r; the wall-clock runs until the last rank has finished."""
    shutil.rmtree(out, ignore_errors=True)
    options = [
        f"data.path={data}",
        f"out={out}",
        f"epochs={args.epochs}",
        f"sampler.kind={args.sampler}",
        "schedule.kind=constant",
        f"schedule.start_ratio={args.ratio}",
        f"format={args.format}",
        f"trajectories_per_shard={args.trajectories_per_shard}",
        f"batch_size={args.batch_size}",
        "progress=false",
    ]
    if args.write_workers is not None and root == ROOT:  # another checkout: its own default
        options.append(f"write_workers={args.write_workers}")
    start, spawned = time.perf_counter(), time.time()
    with GpuSampler(world) as gpu:
        ranks = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    BUILD_ONE,
                    str(root),
                    json.dumps([*options, f"rank={r}", f"world_size={world}"]),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "LOCAL_RANK": str(r)},
            )
            for r in range(world)
        ]
        results = [(proc, *proc.communicate()) for proc in ranks]
        reaped = time.time()
    wall = time.perf_counter() - start
    for proc, _, err in results:
        if proc.returncode != 0:
            raise SystemExit(f"build with {root} on {world} ranks failed:\n{err[-3000:]}")
    outs = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in results]
    run = {
        **outs[0],
        "wall": wall,
        "world_size": world,
        "gpu_util": gpu.mean,
        "root": checkout(root),
    }
    run["snapshots"] = sum(o["snapshots"] for o in outs)
    run["rank_seconds"] = [o["seconds"] for o in outs]
    # where the wall-clock went outside the stages, over the ranks: the latest to reach each point
    clocks = [o["clock"] for o in outs]
    run["outside"] = {
        "interpreter start": max(c["began"] for c in clocks) - spawned,
        "imports": max(c["imported"] - c["began"] for c in clocks),
        "run_build": max(c["ended"] - c["imported"] for c in clocks),
        "exit": reaped - max(c["ended"] for c in clocks),
    }
    return run


def report(runs: list[dict], args: argparse.Namespace) -> list[str]:
    epochs = len(runs[0]["k_per_epoch"])
    header = [
        "pipeline",
        "ranks",
        "snapshots",
        "wall s",
        "snapshot-epochs/s",
        "in the build's stage table",
        "GPU util %",
    ]
    # the stages (overlapping; ``total`` is their wall-clock), then what surrounds them
    stages = list(STAGES)
    stages += ["read wait", "write wait"]  # of the total: the GPU stages waiting
    stages += ["setup", "start", "wait", "finalize"]
    outside = ["interpreter start", "imports", "run_build", "exit"]
    rows, stage_rows, byte_rows, outside_rows = [], [], [], []
    for run in runs:
        name = Path(run["root"]).name if run["root"] != "." else "this checkout"
        rate = run["snapshots"] * epochs / run["wall"]
        util = "-" if run["gpu_util"] is None else f"{run['gpu_util']:.0f}"
        world = run["world_size"]
        busiest = max(seconds["total"] for seconds in run["rank_seconds"])
        own = run["snapshots"] * epochs / busiest
        wall = f"{run['wall']:.1f}"
        rows.append([name, world, run["snapshots"], wall, f"{rate:,.0f}", f"{own:,.0f}", util])
        stage_rows.append([name, world, *[f"{run['seconds'].get(s, 0):.1f}" for s in stages]])
        parts = run.get("outside", {})  # runs saved before it was measured have none
        outside_rows.append(
            [name, world, wall, *[f"{parts[p]:.1f}" if p in parts else "-" for p in outside]]
        )
        q = run["query_bytes"]
        bound = q["entropy_bound"]
        byte_rows.append(
            [
                name,
                f"{bound:,.0f}",
                f"{q['tar']:,.0f} ({q['tar'] / bound:.2f}x)",
                f"{q['zarr']:,.0f} ({q['zarr'] / bound:.2f}x)" if "zarr" in q else "-",
            ]
        )
    n = args.resolution ** (2 if args.pde == "ns2d" else 1)
    return [
        "# build_shards benchmark",
        "",
        *environment_lines(),
        f"- data: {args.pde}, {args.trajectories} trajectories x {args.steps} steps, "
        f"N = {n}; {args.epochs} epochs of {args.sampler} sets at k/N = {args.ratio}, "
        f"format {args.format}, {args.trajectories_per_shard} trajectories per shard, "
        f"write_workers {args.write_workers or 'default'} (this checkout's)",
        "- snapshot-epochs/s = snapshots built x epochs / the wall-clock of the rank processes "
        "(start-up, plan, norm statistics, source hash, every stage, finalize); 'in the build's "
        "stage table': the same over the busiest rank's stage total; stage seconds are the build's own "
        "table, rank 0's (read and write overlap the GPU stages, so they do not add up to the "
        "total; read wait and write wait are the parts of the total the GPU stages' thread waited "
        "for a shard's read and for a free writer)",
        "",
        *markdown_table(header, rows),
        "",
        "Stage seconds:",
        "",
        *markdown_table(["pipeline", "ranks", *stages], stage_rows),
        "",
        "Where the wall-clock goes, the latest rank at each point (run_build holds setup, start, "
        "the stages' total, and rank 0's wait and finalize):",
        "",
        *markdown_table(["pipeline", "ranks", "wall s", *outside], outside_rows),
        "",
        "Query-set bytes per sampled snapshot-epoch:",
        "",
        *markdown_table(["pipeline", "entropy bound", "tars", "zarr"], byte_rows),
    ]


SETTINGS = (  # what a saved run must share to be kept by a rerun
    "pde", "resolution", "trajectories", "steps", "epochs", "ratio", "sampler", "format",
    "trajectories_per_shard", "batch_size", "write_workers",
)  # fmt: skip


def save(args: argparse.Namespace, settings: dict, runs: list[dict]) -> None:
    """The runs so far (a temporary file, then a rename) and their tables."""
    for path, text in (
        (args.json, json.dumps({"settings": settings, "runs": runs}, indent=1) + "\n"),
        (args.out, "\n".join(report(runs, args)) + "\n"),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pde", choices=["ns2d", "burgers1d"], default="ns2d")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--trajectories", type=int, default=200)
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--sampler", default="gradient")
    parser.add_argument("--format", default="both")
    parser.add_argument("--trajectories-per-shard", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--write-workers",
        type=int,
        default=None,
        help="processes writing shards per rank (default: the build's); the faster the query "
        "plan, the more it takes to keep the GPU stages from waiting on the writers",
    )
    parser.add_argument("--work", type=Path, default=Path("bench-build-work"))
    parser.add_argument("--root", type=Path, action="append", default=[], help="other checkouts")
    parser.add_argument("--world-sizes", default="1", help="comma-separated ranks per build")
    parser.add_argument("--out", type=Path, default=Path("docs/bench_build.md"))
    parser.add_argument("--json", type=Path, default=Path("docs/bench/bench_build.json"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    settings = {key: str(value) for key, value in vars(args).items() if key in SETTINGS}
    saved = json.loads(args.json.read_text()) if args.json.exists() else None
    runs = saved["runs"] if isinstance(saved, dict) and saved["settings"] == settings else []
    if saved is not None and not runs:
        print(f"{args.json}: no runs of these settings in it; it is written afresh", flush=True)
    data = synthetic_data(args.work, args.pde, args.resolution, args.trajectories, args.steps)
    worlds = [int(w) for w in args.world_sizes.split(",")]
    for root in [ROOT, *args.root]:
        for world in worlds if root == ROOT else [1]:
            if any(r["root"] == checkout(root) and r["world_size"] == world for r in runs):
                print(f"kept from {args.json}: {root} on {world} rank(s)", flush=True)
                continue
            runs.append(build(root.resolve(), args, data, args.work / f"set-{len(runs)}", world))
            print(json.dumps(runs[-1]), flush=True)
            save(args, settings, runs)  # each build as it finishes
    print("\n".join(report(runs, args)))


if __name__ == "__main__":
    main()
