"""Where a build's query plan spends its time: stage seconds, torch ops, host syncs, top operations.

Sets the stages up with the build's own code (``make_plan`` + ``Builder``, pipeline/build.py) on a
synthetic PDEBench-layout file (bench_build.py's of the same settings under ``--work``, made if
missing, or ``--data``); nothing is written. After a warm-up shard, ``--shards`` shards of
``--per-shard`` trajectories (ids cycling through the file) go through five passes:

1. timed: read, to device, importance q, query plan, each synchronised with the device;
2. pieces: the plan's host (launching thread) seconds over its pieces -- keys, check of q, capping,
   shared units, draw (random order, mask to indices), encode, the rest (slot copies, the copy to
   host with its wait) -- by wrapping those functions here, each exclusive of the pieces it calls;
3. counted: the ops the plan dispatches, by a ``TorchDispatchMode`` (each aten op once as it reaches
   the backend, views too, an op's inner ops not: the profiler's op events count those as well),
   and those that make the host wait for a GPU: item (``bool(t)``), nonzero, copies between
   devices (``torch.tensor(..., device=...)`` too; on a GPU only: on a CPU nothing is copied; the
   CUDA runtime table counts every stream sync);
4. profiled (``torch.profiler``, CPU + CUDA): top ops by self device time (CPU time on a CPU), the
   pieces' kernel time, CUDA runtime calls, and the share of the plan the device was busy (kernel
   and copy time / the timed median); ``--trace`` saves the chrome trace;
5. ``--build``: a whole build of the file (``run_build``: a reader thread and the write workers
   beside the GPU stages), its stage seconds per shard beside the isolated ones: a plan slower there than
   alone competes for the CPU or the interpreter lock. A plan far above its kernels' time alone is
   launch- or sync-bound.

    python tools/bench/profile_build.py [--resolution 128 --trajectories 16 --epochs 50 \\
        --sampler gradient --ratio 0.1 --shards 4 --per-shard 8 --threads N --build \\
        --trace trace.json] --out docs/bench_profile_build.md   # and the .json beside it
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from bench_common import environment_lines, markdown_table, synchronize, synthetic_data
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

import pipeline.samplers as samplers_module
import pipeline.stages as stages_module
from pipeline.build import BuildConfig, Builder, make_plan, run_build
from pipeline.samplers import SamplerConfig
from pipeline.schedules import ScheduleConfig
from pipeline.sources.splits import DataConfig
from pipeline.stages import StageClock

REST = "rest (slot copies, to host)"  # the query plan outside the pieces
ROWS = 20  # ops listed
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero"}  # item() and nonzero wait for a GPU


class Pieces:
    """While entered, the query plan's pieces wrapped: host seconds (exclusive of the pieces they
    call) and calls per piece, the running piece on top of ``stack``, and with ``ranges`` a
    profiler range per call. A method of the sampler is wrapped on the instance."""

    def __init__(self, sampler, ranges: bool = False):
        self.targets = [
            (stages_module, "epoch_keys", "keys"),
            (samplers_module, "_check_q", "draw: check q"),
            (samplers_module, "_cap", "draw: capping"),
            (sampler, "_shared", "draw: shared units"),
            (sampler, "_draw", "draw: draw"),
            (samplers_module, "_random_order", "draw: random order"),
            (samplers_module, "_mask_to_indices", "draw: mask to indices"),
            (stages_module, "encode_sets", "encode"),
        ]
        self.ranges, self.stack, self.since = ranges, [REST], time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls = Counter[str]()

    def _switch(self, label: str | None) -> None:
        """The seconds since the last switch to the running piece; then ``label`` runs (pushed),
        or the piece under the running one (None)."""
        now = time.perf_counter()
        self.seconds[self.stack[-1]] += now - self.since
        self.since = now
        self.stack.append(label) if label else self.stack.pop()

    @contextmanager
    def piece(self, label: str):
        self._switch(label)
        self.calls[label] += 1
        try:
            with record_function(label) if self.ranges else nullcontext():
                yield
        finally:
            self._switch(None)

    def __enter__(self) -> Pieces:
        def wrap(fn, label):
            def wrapped(*args, **kwargs):
                with self.piece(label):
                    return fn(*args, **kwargs)

            return wrapped

        self.saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in self.targets]
        for owner, name, label in self.targets:
            setattr(owner, name, wrap(getattr(owner, name), label))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, fn in self.saved:
            setattr(owner, name, fn) if fn is not None else delattr(owner, name)

    def run(self, plan, inputs: list, device: torch.device) -> None:
        """The query plan of every shard, the device synchronised after each."""
        for q, ids in inputs:
            with self.piece(REST):
                plan(q, ids)
                synchronize(device)


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched: by name, by the running piece, and the would-be syncs."""

    def __init__(self, pieces: Pieces):
        super().__init__()
        self.pieces = pieces
        self.ops, self.by_piece, self.syncs = Counter[str](), Counter[str](), Counter[str]()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name, piece = func._schema.name, self.pieces.stack[-1]
        self.ops[name] += 1
        self.by_piece[piece] += 1
        devices = {a.device.type for a in (*args, out) if isinstance(a, torch.Tensor)}
        if name == "aten::lift_fresh":  # torch.tensor(data, device=...): its copy is not seen
            devices.add("cpu")
        if name in SYNC_OPS or ("cpu" in devices and "cuda" in devices):
            self.syncs[piece] += 1
        return out


def device_by_piece(prof, labels: set[str]) -> Counter[str]:
    """Kernel microseconds per piece: each op's own kernels, to its innermost piece."""
    out = Counter[str]()
    for event in prof.events():
        if event.device_type == DeviceType.CPU and event.name not in labels:
            parent = event.cpu_parent
            while parent is not None and parent.name not in labels:
                parent = parent.cpu_parent
            out[REST if parent is None else parent.name] += event.self_device_time_total
    return out


def make_config(args: argparse.Namespace, data: Path, out: str) -> BuildConfig:
    return BuildConfig(
        data=DataConfig(path=str(data)),
        out=out,
        epochs=args.epochs,
        sampler=SamplerConfig(kind=args.sampler),
        schedule=ScheduleConfig(kind="constant", start_ratio=args.ratio),
        trajectories_per_shard=args.per_shard,
        batch_size=args.batch_size,
        device=args.device,
        progress=False,
    )


def timed_stages(builder: Builder, shards: list[list[int]], device: torch.device):
    """Seconds of each stage per shard, synchronised (the build's StageClock, one per shard),
    after a warm-up shard; the plan's inputs."""
    clocks, inputs = [], []  # inputs: (q, snapshot ids) per shard
    for trajectories in [shards[0], *shards]:
        clock = StageClock(device)
        read = clock.timed("read", builder.read, trajectories)
        fields = clock.timed("to device", torch.Tensor.to, torch.from_numpy(read["fields"]), device)
        q = clock.timed("importance", builder.importance, fields)
        clock.timed("query plan", builder.query_plan, q, read["snapshot_id"])
        clocks.append(clock.seconds)
        inputs.append((q, read["snapshot_id"]))
    return {stage: [c[stage] for c in clocks[1:]] for stage in clocks[0]}, inputs[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pde", choices=["ns2d", "burgers1d"], default="ns2d")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--trajectories", type=int, default=16, help="in the generated file")
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--data", type=Path, default=None, help="an existing file instead")
    parser.add_argument("--work", type=Path, default=Path("bench-build-work"))
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--ratio", type=float, default=0.1, help="k/N of every epoch")
    parser.add_argument("--sampler", default="gradient")
    parser.add_argument("--batch-size", type=int, default=64, help="importance batch")
    parser.add_argument("--shards", type=int, default=4, help="timed (and profiled) shards")
    parser.add_argument("--per-shard", type=int, default=8, help="trajectories per shard")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--trace", type=Path, default=None, help="chrome trace of the profile")
    parser.add_argument("--build", action="store_true", help="also time a whole build of it")
    parser.add_argument("--out", type=Path, default=Path("docs/bench_profile_build.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = args.data or synthetic_data(
        args.work, args.pde, args.resolution, args.trajectories, args.steps
    )
    with tempfile.TemporaryDirectory() as out:  # the plan only reads its output directory
        builder = Builder(make_plan(make_config(args, data, out)), device)
    count, per = len(builder.read.source), args.per_shard
    shards = [[(i * per + j) % count for j in range(per)] for i in range(args.shards)]
    seconds, inputs = timed_stages(builder, shards, device)  # 1.
    plan = builder.query_plan
    with Pieces(plan.sampler) as pieces:  # 2.
        pieces.run(plan, inputs, device)
    with Pieces(plan.sampler) as counted, OpCounter(counted) as ops:  # 3.
        counted.run(plan, inputs, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with Pieces(plan.sampler, ranges=True) as ranged, profile(activities=activities) as prof:  # 4.
        ranged.run(plan, inputs, device)
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    built = None
    if args.build:  # 5.
        with tempfile.TemporaryDirectory() as out:
            built = run_build(make_config(args, data, out))
    lines, numbers = report(args, data, seconds, len(inputs[0][1]), pieces, ops, prof, built)
    print("\n".join(lines), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(numbers, indent=1) + "\n")


def report(args, data, seconds, snapshots, pieces, ops, prof, built) -> tuple[list[str], dict]:
    """The tables, and the numbers behind them (per shard)."""
    n, gpu = args.shards, args.device.startswith("cuda")
    labels = {label for _, _, label in pieces.targets} | {REST}
    median = {stage: statistics.median(values) for stage, values in seconds.items()}
    plan_s, total_ops, syncs = median["query plan"], ops.ops.total() / n, ops.syncs.total() / n
    device_us = device_by_piece(prof, labels)
    # every kernel once, through the op that launched it (summing the profiler's CUDA events
    # instead counted each kernel about four times on an H100: 0.24 s of kernels in a 0.065 s plan)
    busy = sum(device_us.values()) / 1e6 / n if gpu else None
    # host-side events: the ops (their kernels' time attached) and the CUDA runtime's calls
    averages = [a for a in prof.key_averages() if a.device_type == DeviceType.CPU]
    ops_only = [a for a in averages if a.key not in labels and not a.key.startswith("cu")]
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    top = sorted(ops_only, key=lambda a: -getattr(a, key))
    runtime = sorted((a for a in averages if a.key.startswith("cu")), key=lambda a: -a.count)
    lines = ["# Query plan profile", "", *environment_lines()]
    lines += [
        f"- data: {data.name}; {n} shards of {args.per_shard} trajectories ({snapshots} "
        f"snapshots), {args.epochs} epochs of {args.sampler} sets at k/N = {args.ratio}",
        "",
    ]
    header, rows = ["stage", "median s/shard", "min s", "max s"], []
    for stage, values in seconds.items():
        rows.append([stage, f"{median[stage]:.4f}", f"{min(values):.4f}", f"{max(values):.4f}"])
        if built is not None:  # the build's own stage table, per shard of as many snapshots
            own = built["seconds"].get(stage)
            rows[-1].append("-" if own is None else f"{own * snapshots / built['snapshots']:.4f}")
    if built is not None:
        header.append(f"in a build, s per {snapshots} snapshots")
    lines += [*markdown_table(header, rows), "", "Query plan, per shard:", ""]
    lines += markdown_table(
        ["s", "snapshot-epochs/s", "ops (dispatched)", "us per op", "would-sync ops",
         "profiler op events", "device busy s (share)"],
        [[f"{plan_s:.4f}", f"{snapshots * args.epochs / plan_s:,.0f}", f"{total_ops:,.0f}",
          f"{1e6 * plan_s / total_ops:.1f}", f"{syncs:g}", f"{sum(a.count for a in top) / n:,.0f}",
          "-" if busy is None else f"{busy:.4f} ({busy / plan_s:.0%})"]],
    )  # fmt: skip
    lines += ["", "Its pieces, per shard (host: seconds of the launching thread, exclusive of the "
              "pieces called; a sync's wait counts where it happens; device: the kernels of the "
              "piece's own ops):", ""]  # fmt: skip
    host = sum(pieces.seconds.values())
    ranked = sorted(pieces.seconds.items(), key=lambda item: -item[1])
    lines += markdown_table(
        ["piece", "calls", "host ms", "host share", "device ms", "ops", "would-sync ops"],
        [[p, f"{pieces.calls[p] / n:g}", f"{1e3 * s / n:.1f}", f"{s / host:.0%}",
          f"{device_us[p] / 1e3 / n:.2f}" if gpu else "-", f"{ops.by_piece[p] / n:,.0f}",
          f"{ops.syncs[p] / n:g}"] for p, s in ranked],
    )  # fmt: skip
    lines += ["", f"Top {ROWS} ops by self {'device' if gpu else 'CPU'} time, per shard:", ""]
    lines += markdown_table(
        ["op", "calls", "self CPU ms", "self device ms"],
        [[a.key, f"{a.count / n:g}", f"{a.self_cpu_time_total / 1e3 / n:.2f}",
          f"{a.self_device_time_total / 1e3 / n:.2f}" if gpu else "-"] for a in top[: ROWS]],
    )  # fmt: skip
    lines += ["", "Ops by calls (dispatched), per shard:", ""]
    lines += markdown_table(
        ["op", "calls", "share"],
        [[op, f"{c / n:g}", f"{c / n / total_ops:.0%}"] for op, c in ops.ops.most_common(ROWS)],
    )  # fmt: skip
    if runtime:
        lines += ["", "CUDA runtime calls, per shard:", ""]
        lines += markdown_table(
            ["call", "calls", "CPU ms"],
            [[a.key, f"{a.count / n:g}", f"{a.cpu_time_total / 1e3 / n:.2f}"] for a in runtime],
        )
    numbers = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "snapshots_per_shard": snapshots,
        "seconds": seconds,
        "ops_per_shard": total_ops,
        "would_sync_ops_per_shard": syncs,
        "device_busy_seconds_per_shard": busy,
        "ops_by_name": {op: c / n for op, c in ops.ops.most_common()},
        "pieces": {p: {"calls": pieces.calls[p] / n, "host_s": s / n,
                       "device_s": device_us[p] / 1e6 / n, "ops": ops.by_piece[p] / n,
                       "would_sync_ops": ops.syncs[p] / n} for p, s in pieces.seconds.items()},
        "cuda_runtime_calls": {a.key: a.count / n for a in runtime},
        "build": None if built is None else {k: built[k] for k in ("seconds", "snapshots")},
    }  # fmt: skip
    return lines, numbers


if __name__ == "__main__":
    main()
