"""Where shard sets live: local paths, ``file://``, ``http(s)://`` and other fsspec URLs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import fsspec
import fsspec.asyn

from pipeline.config import check
from pipeline.records import ShardError

T = TypeVar("T")


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def join(root: str | Path, *parts: str) -> str:
    """Join a root (path or URL) and relative parts with '/'."""
    return "/".join([str(root).rstrip("/"), *parts])


@dataclass
class RemoteConfig:
    """How reads from a remote set (http(s)://, s3://, ...) wait and retry.

    A request with no answer for ``timeout_s`` (connecting, or between two reads of the answer)
    is abandoned, and so is an http(s) answer that comes slower than ``min_rate_mb_s`` once its
    first ``timeout_s`` are spent (a server that trickles a byte at a time); a failed read is
    tried again ``retries`` times, ``backoff_s`` apart, doubling; then a ShardError names the
    URL, the attempts and the cause. A missing file (404) and other refusals (403, ...) are not
    retried. Local paths and file:// read directly.
    """

    timeout_s: float = 30.0  # per request: seconds without an answer
    retries: int = 3  # tries after the first (4 attempts in all)
    backoff_s: float = 0.5  # wait before the first retry, doubling for each further one
    # a local directory keeping the remote files read, by sha256, verified on every use and
    # shared by the runs (and processes) of a machine; null: no disk cache
    cache_dir: str | None = None
    cache_mb: int = 20480  # the cache's size bound: least recently used files go first
    min_rate_mb_s: float = 0.1  # the slowest http(s) answer waited for, in 10^6 bytes a second

    def __post_init__(self) -> None:
        check(
            math.isfinite(self.timeout_s) and self.timeout_s > 0,
            "loader.remote.timeout_s",
            "a number of seconds > 0",
            self.timeout_s,
        )
        check(self.retries >= 0, "loader.remote.retries", "an integer >= 0", self.retries)
        check(
            math.isfinite(self.backoff_s) and self.backoff_s >= 0,
            "loader.remote.backoff_s",
            "a number of seconds >= 0",
            self.backoff_s,
        )
        check(
            self.cache_dir is None or bool(self.cache_dir),
            "loader.remote.cache_dir",
            "null or a directory",
            self.cache_dir,
        )
        check(self.cache_mb >= 1, "loader.remote.cache_mb", "an integer >= 1", self.cache_mb)
        check(
            math.isfinite(self.min_rate_mb_s) and self.min_rate_mb_s > 0,
            "loader.remote.min_rate_mb_s",
            "a rate in MB/s > 0",
            self.min_rate_mb_s,
        )

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (counted from 0)."""
        return self.backoff_s * 2**attempt


def storage_options(
    location: str, remote: RemoteConfig, asynchronous: bool = False
) -> dict[str, Any]:
    """fsspec options for ``location`` (``fsspec.url_to_fs``, zarr's ``FsspecStore.from_url``):
    http(s) requests get ``remote.timeout_s`` (aiohttp's default is 5 minutes in all, and none
    between reads); ``asynchronous``: an async filesystem runs on the caller's event loop (zarr's).

    They are the options of the filesystem that fetches, the innermost of a chained URL
    (``simplecache::https://...``), whose own options go under its protocol (top-level ones reach
    the outermost layer only). A cache awaits the layer below it, so that layer must be
    asynchronous too: else its session belongs to fsspec's event loop, and aiohttp refuses to be
    awaited from zarr's ("Timeout context manager should be used inside a task")."""
    *outer, target = location.split("::")
    protocol = fsspec.core.split_protocol(target)[0] or "file"
    options: dict[str, Any] = {}
    if protocol in ("http", "https"):
        timeout = aiohttp.ClientTimeout(
            total=None, connect=remote.timeout_s, sock_read=remote.timeout_s
        )
        options["client_kwargs"] = {"timeout": timeout}
    if asynchronous and fsspec.get_filesystem_class(protocol).async_impl:
        options["asynchronous"] = True
    return {protocol: options} if outer and options else options


_NOT_TRANSIENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
_TRANSIENT_STATUS = (408, 425, 429)


def _transient(err: BaseException) -> bool | None:
    """True for an error worth retrying, False for a refusal (403, permission), None for an
    error that is no remote failure at all (a bug, or a ShardError already naming the file:
    re-raised as it is)."""
    if isinstance(err, ShardError):
        return None
    if isinstance(err, aiohttp.ClientResponseError):
        return err.status >= 500 or err.status in _TRANSIENT_STATUS
    if isinstance(err, _NOT_TRANSIENT):
        return False
    if isinstance(err, aiohttp.ClientError):
        return True
    return isinstance(err, TimeoutError | asyncio.TimeoutError | ConnectionError | OSError)


def _cause(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _refused(url: str, err: BaseException) -> ShardError:
    if isinstance(err, aiohttp.ClientResponseError):
        return ShardError(f"{url}: refused with HTTP {err.status} {err.message}".rstrip())
    return ShardError(f"{url}: refused ({_cause(err)})")


class _TooSlow(ConnectionError):
    """An answer that kept coming, but slower than ``RemoteConfig.min_rate_mb_s``: retried.
    (Not a TimeoutError: fsspec's sync() turns those into its own FSTimeoutError.)"""


def _gave_up(url: str, remote: RemoteConfig, err: BaseException) -> ShardError:
    timed_out = isinstance(err, TimeoutError | asyncio.TimeoutError | aiohttp.ServerTimeoutError)
    what = f"no answer within {remote.timeout_s:g} s" if timed_out else "read failed"
    if isinstance(err, _TooSlow):
        what = f"answer slower than {remote.min_rate_mb_s:g} MB/s"
    attempts = f"{remote.attempts} attempt{'s' if remote.attempts > 1 else ''}"
    return ShardError(f"{url}: {what} after {attempts} ({_cause(err)})")


def _check_attempt(url: str, remote: RemoteConfig, attempt: int, err: Exception) -> None:
    """Called in the ``except`` of a failed attempt: returns to retry it, else raises what the
    failure becomes (the error itself, a refusal, or the last attempt's ShardError)."""
    transient = _transient(err)
    if transient is None or isinstance(err, FileNotFoundError):
        raise err
    if not transient:
        raise _refused(url, err) from None
    if attempt + 1 == remote.attempts:
        raise _gave_up(url, remote, err) from None


def retrying(url: str, remote: RemoteConfig, call: Callable[[], T]) -> T:
    """``call()``, retried on transient errors as ``remote`` says; FileNotFoundError passes
    through (a missing file is no outage), every other remote failure becomes a ShardError."""
    for attempt in range(remote.attempts):
        try:
            return call()
        except Exception as err:
            _check_attempt(url, remote, attempt, err)
        time.sleep(remote.delay(attempt))
    raise AssertionError("unreachable")


async def retrying_async(url: str, remote: RemoteConfig, call: Callable[[], Awaitable[T]]) -> T:
    """:func:`retrying` for a coroutine (zarr's store reads), waiting with asyncio.sleep."""
    for attempt in range(remote.attempts):
        try:
            return await call()
        except Exception as err:
            _check_attempt(url, remote, attempt, err)
        await asyncio.sleep(remote.delay(attempt))
    raise AssertionError("unreachable")


MAX_RECORD_BYTES = 256 << 20  # a manifest, layer record or zarr metadata file: larger is refused


def _too_large(location: str, limit: int) -> ShardError:
    return ShardError(f"{location}: more than the {limit:,} bytes expected; refused")


def read_bytes(
    location: str, remote: RemoteConfig | None = None, limit: int = MAX_RECORD_BYTES
) -> bytes:
    """The whole file at a local path or URL, refused when larger than ``limit`` bytes (a
    manifest's size for a listed file); remote reads time out and retry as ``remote`` says
    (None: the defaults) and end in a ShardError naming the URL. A missing file raises
    FileNotFoundError."""
    if not is_url(location):
        if Path(location).stat().st_size > limit:
            raise _too_large(location, limit)
        return Path(location).read_bytes()
    remote = remote or RemoteConfig()
    fs, path = fsspec.core.url_to_fs(location, **storage_options(location, remote))
    if "file" in _protocols(fs):
        return fs.cat_file(path)
    if streams(fs):
        return retrying(
            location,
            remote,
            lambda: fsspec.asyn.sync(fs.loop, read_capped, fs, path, location, remote, limit),
        )
    return retrying(location, remote, lambda: fs.cat_file(path))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def streams(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether reads from ``fs`` go through :func:`read_capped`: http(s), where a server we
    do not control answers. Object stores (s3, gs) and chained caches read as fsspec does."""
    return bool({"http", "https"} & set(_protocols(fs)))


async def read_capped(
    fs: fsspec.AbstractFileSystem, path: str, location: str, remote: RemoteConfig, limit: int
) -> bytes:
    """One attempt at the file at ``path`` on the http filesystem ``fs``, streamed: an answer
    longer than ``limit`` bytes is refused as it passes the limit (not first held whole), and
    one slower than ``min_rate_mb_s`` once its first ``timeout_s`` are spent is abandoned
    (``_TooSlow``, retried). A pause longer than ``timeout_s`` is the session's timeout."""
    started, data = time.monotonic(), bytearray()
    file = await fs.open_async(path, "rb", size=limit)  # a size given: no HEAD request first
    try:
        while chunk := await file.read(1 << 20):
            data += chunk
            if len(data) > limit:
                raise _too_large(location, limit)
            allowed = remote.timeout_s + len(data) / (remote.min_rate_mb_s * 1e6)
            if time.monotonic() - started > allowed:
                raise _TooSlow(f"{len(data):,} bytes in {time.monotonic() - started:.1f} s")
    finally:
        await file.close()
    return bytes(data)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a local file, read in 1 MiB blocks (source HDF5 files can be tens of GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def zarr_store(location: str, read_only: bool = True, remote: RemoteConfig | None = None):
    """A zarr v3 store for a local path or any fsspec URL (http(s) with ``remote``'s timeout;
    the retries are the reader's, see pipeline/formats/zarr.py)."""
    from zarr.storage import FsspecStore, LocalStore

    if is_url(location) and not location.startswith("file://"):
        options = storage_options(location, remote or RemoteConfig(), asynchronous=True)
        return FsspecStore.from_url(location, storage_options=options, read_only=read_only)
    path = location.removeprefix("file://")
    return LocalStore(path, read_only=read_only)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed into place when the block succeeds,
    so a reader never sees a half-written file. A failed block leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with named_os_errors(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def named_os_errors(path: str | Path) -> Iterator[None]:
    """Re-raise an OSError of writing ``path`` (ENOSPC: a full disk) with the file's name, so the
    tools' one-line message says which file could not be written."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


_CACHED_NAME = re.compile(r"[0-9a-f]{64}")


class DiskCache:
    """Remote files kept on local disk under their sha256, for every run of the machine.

    A file is used only when its bytes still have its sha256 (a corrupted one is deleted and
    fetched again); new files are written to a temporary name and renamed, so processes sharing
    the directory never see half a file; above ``cache_mb`` the least recently used go (only
    files named by a sha256: the cache deletes nothing it did not write)."""

    def __init__(self, directory: str | Path, limit_mb: int):
        self.directory, self.limit = Path(directory), limit_mb * 2**20

    def get(self, sha256: str, size: int) -> bytes | None:
        path = self.directory / sha256
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) != size or sha256_bytes(data) != sha256:
            path.unlink(missing_ok=True)  # corrupted in the cache: fetch it again
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # recently used
        return data

    def put(self, sha256: str, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with named_os_errors(self.directory / sha256), os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, self.directory / sha256)
        finally:
            Path(tmp).unlink(missing_ok=True)
        self._evict()

    def _evict(self) -> None:
        files = []
        for path in self.directory.iterdir():
            if _CACHED_NAME.fullmatch(path.name):
                with contextlib.suppress(FileNotFoundError):  # another process evicted it
                    stat = path.stat()
                    files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.limit:
                break
            path.unlink(missing_ok=True)
            total -= size


def disk_cache(location: str, remote: RemoteConfig | None) -> DiskCache | None:
    """The disk cache for reads of ``location``: only for remote locations with a cache_dir."""
    if remote is None or remote.cache_dir is None or not is_url(location):
        return None
    if location.startswith("file://"):
        return None
    return DiskCache(remote.cache_dir, remote.cache_mb)
