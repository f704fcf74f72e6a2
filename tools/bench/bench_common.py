"""What every benchmark shares: the lines its tables carry (command, date, machine, GPU,
versions), the pool that runs a sweep one item per GPU, the synthetic data files the build
benchmarks share, and the field-only shards and run logs the training benchmarks read."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from pipeline.build import BuildConfig, run_build
from pipeline.samplers import SamplerConfig
from pipeline.schedules import ScheduleConfig
from pipeline.sources.generate import generate
from pipeline.sources.splits import DataConfig, NormStats
from ups.models.codec import Codec, CodecConfig, load_encoder, save_codec
from ups.models.decoder import DecoderConfig
from ups.models.encoder import EncoderConfig

ROOT = Path(__file__).resolve().parents[2]  # the repository
Item = TypeVar("Item")
Result = TypeVar("Result")


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work, so that a timer read after it measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def repo_relative(text: str) -> str:
    """``text`` with the repository's absolute path left out of every path inside it, so that
    a result says where a file lies in the project, not on the machine that ran it."""
    return text.replace(f"{ROOT}{os.sep}", "")


def environment_lines() -> list[str]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    versions = [
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"numpy {np.__version__}",
    ]
    for name in ("torchdata", "zarr", "webdataset", "numcodecs"):
        with contextlib.suppress(PackageNotFoundError):
            versions.append(f"{name} {version(name)}")
    return [
        f"- command: `python {repo_relative(shlex.join(sys.argv))}`",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.platform()}, {platform.machine()}, {torch.get_num_threads()} torch CPU threads; GPU: {gpu}",
        f"- versions: {', '.join(versions)}",
    ]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def forever(iterable):
    """Iterate again and again without end: a list of batches, or a loader (one epoch a pass)."""
    while True:
        yield from iterable


def gpu_slots() -> int:
    """One slot per visible GPU; one on a machine without (the CPU)."""
    return max(1, torch.cuda.device_count())


def run_in_slots(
    items: list[Item],
    slots: int,
    run: Callable[[Item, int], Result],
    done: Callable[[Item, Result], None],
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """``run(item, slot)`` for every item, in list order, at most one at a time per slot.

    A slot is a GPU: ``run`` puts its work there (a subprocess with CUDA_VISIBLE_DEVICES=slot),
    so each GPU trains one thing at a time and a free GPU takes the next item at once.
    ``done(item, result)`` is called under one lock as each item finishes: save results there, so a
    sweep killed midway keeps every finished item. Once ``stop()`` is true no further item is
    handed out (a time limit). An exception in ``run`` or ``done`` stops handing out items; the
    running ones end and it is raised again here.
    """
    todo = list(items)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def slot_loop(slot: int) -> None:
        while True:
            with lock:
                if not todo or errors or stop():
                    return
                item = todo.pop(0)
            try:
                result = run(item, slot)
                with lock:
                    done(item, result)
            except BaseException as err:  # re-raised in the caller's thread below
                with lock:
                    errors.append(err)
                return

    threads = [threading.Thread(target=slot_loop, args=(slot,)) for slot in range(slots)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def say(line: str) -> None:
    """Print one line in a single write: print writes the text and the newline separately, so
    two threads printing at once (a study's runs side by side) could join their lines."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_section(sections: dict, name: str, fn: Callable[[], dict]) -> None:
    """One section of a benchmark: ``sections[name]`` is its result or, when it raised, the
    error and traceback (so one broken section does not lose the others), with its seconds."""
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        sections[name] = fn()
    except Exception as err:  # keep going: one broken section must not lose the others
        sections[name] = {
            "error": f"{type(err).__name__}: {err}",
            "trace": traceback.format_exc()[-3000:],
        }
        print(traceback.format_exc(), flush=True)
    if isinstance(sections.setdefault(name, {}), dict):
        sections[name]["section_seconds"] = time.perf_counter() - start


def synthetic_data(
    work: Path, pde: str, resolution: int, trajectories: int, steps: int, device: str | None = None
) -> Path:
    """The generated PDEBench-layout file of these settings under ``work`` (seed 0, made on
    ``device``, by default the GPU when there is one), generated if missing: the benchmarks of
    the same settings share it."""
    data = work / f"{pde}-{resolution}-{trajectories}x{steps}.h5"
    if not data.exists():
        start = time.perf_counter()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        generate(pde, data, trajectories, steps, resolution, seed=0, device=device, progress=False)
        print(f"generated {data} in {time.perf_counter() - start:.0f} s", flush=True)
    return data


def build_field_shards(
    data: Path, out: Path, epochs: int, schedule: ScheduleConfig, device: str
) -> dict:
    """Field-only zarr shards (no encoder) of uniform query sets, what a codec trains on: the
    build's summary."""
    return run_build(
        BuildConfig(
            data=DataConfig(path=str(data)),
            out=str(out),
            format="zarr",
            encoder=None,
            epochs=epochs,
            sampler=SamplerConfig(kind="uniform"),
            schedule=schedule,
            trajectories_per_shard=4,
            progress=False,
            device=device,
        )
    )


def build_latent_shards(
    data: Path, out: Path, epochs: int, ratio: float, trajectories_per_shard: int = 2
) -> Path:
    """Latent shards (both formats) of ``epochs`` gradient query sets of k/N ``ratio``, encoded
    by a small untrained codec saved beside them: an operator-stage set's layout and bytes
    without a codec to train (what the loader and read benchmarks measure)."""
    source, splits = DataConfig(path=str(data)).open()
    norm = NormStats.from_trajectories(source, splits["train"], progress=False)
    cfg = CodecConfig(
        EncoderConfig(patch=8, dim=64, depth=1, num_tokens=64, latent_dim=64),
        DecoderConfig(dim=64, depth=1),
    )
    codec = out.parent / f"{out.name}.codec.pt"
    save_codec(codec, Codec(cfg, source.info), norm)
    build = BuildConfig(
        data=DataConfig(path=str(data)),
        out=str(out),
        encoder=str(codec),
        epochs=epochs,
        sampler=SamplerConfig(kind="gradient"),
        schedule=ScheduleConfig(start_ratio=ratio),
        trajectories_per_shard=trajectories_per_shard,
        progress=False,
    )
    run_build(build, load_encoder=load_encoder)
    return out


def read_jsonl(path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl; a line cut short by a kill is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
