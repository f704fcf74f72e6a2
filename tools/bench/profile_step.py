"""Where a training step's time goes: loader wait, the step, and the step's top operations.

Builds the run that ``tools/train.py`` would build from the same options (config, overrides),
takes ``--warmup`` steps (compilation with ``compile=true``), then times ``--steps`` steps three
ways: free-running as a run takes them (the loader overlapping the step, the device synchronised
at the end only); each split into the wait for its batch and the step itself (loss, backward,
clipping, optimizer), synchronised with the GPU; and profiled with ``torch.profiler``: the
busiest operations by device time (or CPU time on a CPU) and the share of the step the device was
busy. A step well above its kernels' time is launch-bound: the fix is fewer launches, not fewer
FLOPs. A free-running step well above the synchronised one waits on the loader.

    python tools/bench/profile_step.py --steps 50 -- --config ns2d_operator shards=... \\
        codec_checkpoint=... batch_size=32 compile=true out=runs/profile overwrite=true
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench_common import environment_lines, forever, markdown_table, repo_relative, synchronize
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from pipeline.cli import parse_config
from ups.cli import CONFIGS
from ups.training.train import TrainConfig, Trainer


def timed_steps(trainer: Trainer, batches, steps: int) -> tuple[list[float], list[float]]:
    """(batch wait seconds, step seconds) of each of ``steps`` steps, the device synchronised."""
    waits, step_seconds = [], []
    for _ in range(steps):
        tick = time.perf_counter()
        batch = next(batches)
        synchronize(trainer.device)
        tock = time.perf_counter()
        trainer._train_step(batch)
        synchronize(trainer.device)
        waits.append(tock - tick)
        step_seconds.append(time.perf_counter() - tock)
    return waits, step_seconds


def free_running(trainer: Trainer, batches, steps: int) -> tuple[float, float]:
    """(seconds per step, batch wait seconds per step) of ``steps`` steps as training takes them:
    the device synchronised only at the end, so the loader and the step overlap as in a run."""
    synchronize(trainer.device)
    wait, start = 0.0, time.perf_counter()
    for _ in range(steps):
        tick = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - tick
        trainer._train_step(batch)
    synchronize(trainer.device)
    return (time.perf_counter() - start) / steps, wait / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing")
    parser.add_argument("--steps", type=int, default=50, help="timed (and profiled) steps")
    parser.add_argument("--rows", type=int, default=20, help="operations listed")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument(
        "--sort",
        choices=["device", "cpu"],
        default="device",
        help="order the operations by their device time, or by the host's (a launch-bound step)",
    )
    args, train_argv = parser.parse_known_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps: expected integers >= 1")
    train_argv = [a for a in train_argv if a != "--"]
    cfg = parse_config(TrainConfig, train_argv, __doc__, CONFIGS)
    trainer = Trainer(cfg)
    batches = forever(trainer.loader)
    try:
        timed_steps(trainer, batches, args.warmup)
        running, running_wait = free_running(trainer, batches, args.steps)
        waits, steps = timed_steps(trainer, batches, args.steps)
        on_gpu = trainer.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        with profile(activities=activities) as prof:
            timed_steps(trainer, batches, args.steps)
    finally:
        trainer.loader.close()
    averages = prof.key_averages()
    key = "self_device_time_total" if on_gpu and args.sort == "device" else "self_cpu_time_total"
    # device busy time per step: the device's own events (kernels, copies), summed
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy = sum(e.device_time_total for e in kernels) / 1e6 / args.steps if on_gpu else None
    step = statistics.median(steps)
    numbers = {
        "options": [repo_relative(option) for option in train_argv],
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "free_running_ms_per_step": 1e3 * running,
        "free_running_wait_ms_per_step": 1e3 * running_wait,
        "batch_wait_ms_median": 1e3 * statistics.median(waits),
        "step_ms_median": 1e3 * step,
        "step_ms_p90": 1e3 * sorted(steps)[int(0.9 * (len(steps) - 1))],
        "device_busy_ms_per_step": None if busy is None else 1e3 * busy,
        "device_busy_share": None if busy is None else busy / step,
    }
    lines = [*environment_lines(), ""]
    lines += markdown_table(
        [
            "free-running ms/step",
            "of it batch wait",
            "batch wait ms",
            "step ms (median)",
            "step ms (p90)",
            "device busy ms",
            "busy share",
        ],
        [
            [
                f"{1e3 * running:.2f}",
                f"{1e3 * running_wait:.2f}",
                f"{numbers['batch_wait_ms_median']:.2f}",
                f"{numbers['step_ms_median']:.2f}",
                f"{numbers['step_ms_p90']:.2f}",
                "-" if busy is None else f"{1e3 * busy:.2f}",
                "-" if busy is None else f"{busy / step:.0%}",
            ]
        ],
    )
    print("\n".join(lines), flush=True)
    print(averages.table(sort_by=key, row_limit=args.rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
