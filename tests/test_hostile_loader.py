"""The loader process under hostile conditions: killed, interrupted, failing, closed early.

Each ends in one clear message or in silence: no traceback of the loader process, no
BrokenPipeError or ConnectionResetError, no resource tracker warning of leaked semaphores.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.build import BuildConfig, run_build
from pipeline.config import ConfigError
from pipeline.loader import BatchSpec, LoaderConfig, ShardLoader
from pipeline.loader_process import LoaderError, _portable
from pipeline.records import ShardError
from pipeline.samplers import SamplerConfig
from pipeline.schedules import ScheduleConfig
from pipeline.shards import open_shards
from pipeline.sources.splits import DataConfig

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
SPEC = BatchSpec(window=0, sparse_steps=(0,))


@pytest.fixture(scope="module")
def field_shards(burgers_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "shards"
    run_build(
        BuildConfig(
            data=DataConfig(path=str(burgers_file), val_fraction=0.1, test_fraction=0.1),
            out=str(out),
            encoder=None,
            epochs=EPOCHS,
            sampler=SamplerConfig(kind="uniform"),
            schedule=ScheduleConfig(start_ratio=0.25, multiple=8),
            trajectories_per_shard=2,
            device="cpu",
            progress=False,
        ),
    )
    return out


def make_loader(location: Path, workers: int = 2, fmt: str = "auto") -> ShardLoader:
    cfg = LoaderConfig(workers=workers, prefetch=2, shuffle_shards=2, format=fmt)
    return ShardLoader(open_shards(str(location), "train", fmt), cfg, batch_size=4, spec=SPEC)


@pytest.mark.slow
def test_killed_loader_process_is_one_clear_error_within_seconds(field_shards):
    loader = make_loader(field_shards)
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    time.sleep(0.5)  # the ring fills: batches wait in the pipe, slots go back to a dead child
    os.kill(loader._process._process.pid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(LoaderError) as caught:
        for _ in batches:  # the batches already in the pipe may still arrive
            pass
    assert time.monotonic() - killed < 5
    assert isinstance(caught.value, ShardError) and isinstance(caught.value, RuntimeError)
    assert "the loader process ended without a word: it was killed by SIGKILL" in str(caught.value)
    assert "loader.cache_mb" in str(caught.value)  # what to do if the OOM killer sent it
    delivered = loader.state_dict()["batches"]
    loader.close()
    batch = next(iter(loader))  # a new loader process, after the last delivered batch
    loader.close()
    assert batch.epoch == 0 and loader.state_dict()["batches"] == delivered + 1


class Picky(Exception):
    """An exception that pickles but does not unpickle (its ``__init__`` wants two arguments)."""

    def __init__(self, shard: str, why: str):
        super().__init__(f"{shard}: {why}")


def test_an_error_of_the_loader_process_reaches_the_parent_as_its_message():
    shard_error = ShardError("train-000001.tar: checksum mismatch")
    assert _portable(shard_error) is shard_error  # the tools print it as it is
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(Picky("a.tar", "bad")))
    portable = _portable(Picky("a.tar", "bad"))
    assert isinstance(portable, LoaderError)
    assert str(portable) == "in the loader process: Picky: a.tar: bad"
    pickle.loads(pickle.dumps(portable))


@pytest.mark.parametrize(
    "option, value",
    [
        ("seed", -1),
        ("workers", -1),
        ("prefetch", 0),
        ("shuffle_shards", 0),
        ("read_threads", 0),
        ("read_ahead", -1),
        ("cache_mb", -1),
    ],
)
def test_loader_config_ranges(option, value):
    with pytest.raises(ConfigError, match=rf"option 'loader.{option}': expected an integer >= "):
        LoaderConfig(**{option: value})


# Runs in a fresh interpreter (python -c: the loader process needs no main module), so that what
# the loader process, multiprocessing and its resource tracker print at exit is all in stderr.
SCRIPT = """
import os, signal, sys, time
from pipeline.loader import BatchSpec, LoaderConfig, ShardLoader
from pipeline.loader_process import LoaderError
from pipeline.records import ShardError
from pipeline.shards import open_shards

mode, location, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])

def loader(workers=2, fmt="auto"):
    cfg = LoaderConfig(workers=workers, prefetch=2, shuffle_shards=2, format=fmt)
    spec = BatchSpec(window=0, sparse_steps=(0,))
    return ShardLoader(open_shards(location, "train", fmt), cfg, batch_size=4, spec=spec)

if mode == "clean":
    a = loader()  # every epoch, as training does, then closed
    n = sum(1 for _ in range(epochs) for _ in a)
    a.close()
    b = loader()  # the stream run to its end: the child has sent it and waits
    assert sum(1 for _ in b.batches_from(0, 0)) == n == epochs * b.batches_per_epoch
    b.close()
    c = loader(workers=0)  # closed mid-epoch, with batches in the pipe
    next(iter(c))
    time.sleep(0.5)
    c.close()
    d = loader()  # left open at exit
    next(iter(d))
    time.sleep(0.5)
elif mode == "interrupt":  # Ctrl-C reaches the whole process group
    a = loader()
    stream = a.batches_from(0, 0)  # the child is starting (importing)
    try:
        os.killpg(os.getpgrp(), signal.SIGINT)
        time.sleep(30)
    except KeyboardInterrupt:
        print("interrupted")
    next(stream)  # the child lived through it
    try:
        os.killpg(os.getpgrp(), signal.SIGINT)
        time.sleep(30)
    except KeyboardInterrupt:
        print("interrupted")
        sys.exit(130)  # the loader left open, as an interrupted run leaves it
elif mode == "corrupt":  # as tools/train.py: one line, exit 2, the loader left open
    try:
        for _ in loader(fmt="wds"):
            pass
    except ShardError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
elif mode == "killed":
    a = loader()
    batches = iter(a)
    next(batches)
    time.sleep(0.5)
    os.kill(a._process._process.pid, signal.SIGKILL)
    try:
        for _ in batches:
            pass
    except ShardError as err:
        assert isinstance(err, LoaderError)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
print("done")
"""


def run_script(mode: str, location: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(location), str(EPOCHS)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # its own process group, for the Ctrl-C
    )


def assert_quiet(stderr: str) -> None:
    for noise in ("Traceback", "leaked", "ConnectionResetError", "BrokenPipeError"):
        assert noise not in stderr, stderr


@pytest.mark.slow
def test_normal_early_closed_exhausted_and_unclosed_loaders_exit_in_silence(field_shards):
    done = run_script("clean", field_shards)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
    assert_quiet(done.stderr)


@pytest.mark.slow
def test_ctrl_c_stops_no_loader_process_and_prints_nothing_of_it(field_shards):
    done = run_script("interrupt", field_shards)
    assert done.returncode == 130, done.stderr
    assert done.stdout.split() == ["interrupted", "interrupted"]
    assert_quiet(done.stderr)


@pytest.mark.slow
def test_corrupt_shard_in_the_loader_process_is_one_line(field_shards, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(field_shards), str(copy)], check=True)
    for tar in sorted((copy / "wds").glob("train-*.tar")):
        data = bytearray(tar.read_bytes())
        data[1500] ^= 0xFF
        tar.write_bytes(bytes(data))
    done = run_script("corrupt", copy)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "checksum mismatch" in lines[0]
    assert_quiet(done.stderr)


@pytest.mark.slow
def test_killed_loader_process_prints_one_line(field_shards):
    done = run_script("killed", field_shards)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: the loader process ended without a word: it was killed by SIGKILL (exit code -9);"
        " if the out-of-memory killer sent it, lower loader.cache_mb, loader.prefetch or"
        " loader.read_ahead"
    ]
