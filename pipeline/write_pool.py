"""Shard writes in worker processes, beside the device's stages.

A shard's write is mostly Python: tar headers, zarr's chunk bookkeeping, the record. Run in
threads of the building process, it holds the interpreter lock that the device's thread needs
between kernel launches, and a fast query plan slows to the writers' pace (on an H100, 115 ms
a shard beside writer threads against 66 ms beside worker processes: docs/benchmarks.md, the
build goals). Worker processes take it off that lock: each receives a shard's arrays through a
pipe (between the build's own processes only) and writes its files in every format, then the
shard's part record, the file a rerun checks.

The workers are forked from a forkserver that has imported the writers once, so a build starts
them in milliseconds, and they are started in the background while the build plans. Like any
multiprocessing pool started this way (a DataLoader's workers under spawn), they import the
script that started them: a script that builds must do so under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import select
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import to_dict
from pipeline.formats import FORMATS
from pipeline.manifest import file_entry
from pipeline.records import RecordSchema, ShardError, _Record
from pipeline.storage import write_atomic


@dataclass(frozen=True)
class ShardWrite:
    """What a worker needs, besides the records, to write one shard and its part record."""

    root: str  # the set's (or a layer's) directory; every path below is relative to it
    formats: tuple[str, ...]
    schema: RecordSchema
    chunk: int  # snapshots per shard: zarr's chunk length
    split: str
    index: int
    name: str
    record: str  # the part record's path
    record_fields: dict[str, Any]  # what the record holds besides its files ("owner", ...)


def write_shard(job: ShardWrite, block: _Record) -> float:
    """The shard's files in every format, then its part record (written last: a record means
    the files are whole); returns the seconds it took."""
    start = time.perf_counter()
    root = Path(job.root)
    files: list[str] = []
    for fmt in job.formats:
        writer = FORMATS[fmt].writer(root, job.schema, job.chunk)
        files += writer.write(job.split, job.index, job.name, block)
    entries = {name: to_dict(file_entry(root, name, len(block))) for name in files}
    record = {**job.record_fields, "files": entries}
    write_atomic(root / job.record, json.dumps(record, sort_keys=True).encode())
    return time.perf_counter() - start


def _exit_with(build: int) -> None:
    """A worker's first act: a thread that ends the worker as soon as the build process is gone.

    Nothing else would: a worker's parent is the forkserver, not the build, and every worker holds
    both ends of the pool's queues, so a killed build leaves its workers waiting forever (and one
    in the middle of a write racing the rerun). Linux tells a pidfd's reader when the process
    ends; elsewhere the build is polled every second."""

    def watch() -> None:
        try:
            select.select([os.pidfd_open(build)], [], [])
        except (AttributeError, OSError):  # no pidfd here, or the build is already gone
            while _alive(build):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user's
    return True


class WritePool:
    """``workers`` processes writing shards, or threads of this process (``processes=False``: a
    CPU build, whose cores the compute needs, and where a debugger or a profiler sees the
    writes). ``submit`` returns a future of the write's seconds."""

    def __init__(self, workers: int, processes: bool):
        self.workers = workers
        self.executor: Executor
        if not processes:
            self.executor = ThreadPoolExecutor(max_workers=workers)
            return
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        self.executor = ProcessPoolExecutor(
            workers, context, initializer=_exit_with, initargs=(os.getpid(),)
        )
        # starting the server and the workers takes seconds of imports: done while the build plans
        self._started = threading.Thread(target=self._start, daemon=True)
        self._started.start()

    def _start(self) -> None:
        # a pool that cannot start fails again at the build's first submit, which reports it;
        # one shut down before its workers started (a build that failed early) just stops here
        with contextlib.suppress(Exception):
            for future in [self.executor.submit(time.sleep, 0) for _ in range(self.workers)]:
                future.result()

    def submit(self, job: ShardWrite, block: _Record) -> Future[float]:
        try:
            return self.executor.submit(write_shard, job, block)
        except BrokenProcessPool as err:
            raise self._broken() from err

    def wait(self, write: Future[float]) -> float:
        """A submitted write's seconds, once it is done; its error, if it failed."""
        try:
            return write.result()
        except BrokenProcessPool as err:
            raise self._broken() from err

    def _broken(self) -> ShardError:
        return ShardError(
            f"the shard writers ({self.workers} processes) stopped: a worker process died "
            "(killed, out of memory) or could not start. Workers import the script that started "
            "the build, so a script must build under `if __name__ == '__main__':`; "
            "write_in=threads writes in this process instead"
        )

    def __enter__(self) -> WritePool:
        return self

    def __exit__(self, *exc: object) -> None:
        failed = exc[0] is not None  # then the writes in flight are abandoned, not awaited
        self.executor.shutdown(wait=not failed, cancel_futures=failed)
