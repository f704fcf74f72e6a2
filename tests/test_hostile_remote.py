"""Trust in what a shard set's files and servers hand us (issue 13): remote reads time out and
retry, then fail by name; zarr over HTTP needs no directory listing; files the manifest does not
list are refused; crafted tars are refused member by member; dead and stalled servers end in a
named error; chained URLs (``simplecache::http://...``) read both formats. Real builds, real
tars, real HTTP servers on 127.0.0.1, no mocks."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import serve_hostile, silent_server
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from pipeline.build import BuildConfig, run_build
from pipeline.config import ConfigError, from_dict, load_config
from pipeline.formats.zarr import _VerifyingStore
from pipeline.loader_config import LoaderConfig
from pipeline.records import ShardError
from pipeline.shards import open_shards
from pipeline.storage import RemoteConfig, zarr_store

# a real build per module: the fast lane (pytest -m "not slow") leaves it out
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
INSPECT = ROOT / "tools" / "inspect_shards.py"
FAST = RemoteConfig(timeout_s=0.5, retries=2, backoff_s=0.05)  # 3 attempts
# the most a read may take before it must have failed: every attempt times out, plus the waits
BOUND = FAST.timeout_s * FAST.attempts + sum(FAST.delay(a) for a in range(FAST.retries))
SLACK = 3.0  # a loaded 2-core machine
TAR = "wds/train-000000.tar"


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, burgers_file: Path) -> Path:
    """Field-only, both formats: train has 3 shards of 4, 4 and 2 trajectories of 20 snapshots."""
    out = tmp_path_factory.mktemp("hostile") / "set"
    args = [
        f"data.path={burgers_file}",
        f"out={out}",
        "device=cpu",
        "epochs=2",
        "trajectories_per_shard=4",
        "progress=false",
    ]
    run_build(load_config(BuildConfig, None, args))
    return out


@pytest.fixture
def copy(built: Path, tmp_path: Path) -> Path:
    """A private copy of the set to damage."""
    return Path(shutil.copytree(built, tmp_path / "set"))


def rewrite_manifest(root: Path, edit) -> None:
    """Edit ``manifest.json``'s JSON in place. Only ``files`` is edited here, which no id in the
    manifest covers, so a manifest checked against its ids on open still opens."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def relist(root: Path, name: str) -> None:
    """Make the manifest's entry for file ``name`` match its (crafted) bytes."""
    data = (root / name).read_bytes()

    def edit(manifest: dict) -> None:
        manifest["files"][name].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    rewrite_manifest(root, edit)


def assert_same_records(a, b) -> None:
    """Every snapshot and query set of two opened splits are equal."""
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a.snapshot(i), b.snapshot(i)
        assert sorted(x) == sorted(y)
        for name in x:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)
        for epoch in range(a.epochs):
            for u, v in zip(a.query_set(i, epoch), b.query_set(i, epoch), strict=True):
                np.testing.assert_array_equal(u, v)


def is_shard_file(path: str) -> bool:
    """A zarr chunk or a tar: a shard file, not the manifest or metadata."""
    return "/c/" in path or path.endswith(".tar")


def run_inspect(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(INSPECT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


FAST_ARGS = ("--timeout-s", "0.5", "--retries", "2", "--backoff-s", "0.05")


# ---------------------------------------------------------------- 1. the options


def test_remote_config_is_range_checked():
    assert RemoteConfig() == RemoteConfig(timeout_s=30.0, retries=3, backoff_s=0.5)
    assert RemoteConfig().attempts == 4 and FAST.delay(2) == pytest.approx(0.2)
    for kwargs, option in [
        ({"timeout_s": 0}, "loader.remote.timeout_s"),
        ({"timeout_s": float("inf")}, "loader.remote.timeout_s"),
        ({"retries": -1}, "loader.remote.retries"),
        ({"backoff_s": -0.5}, "loader.remote.backoff_s"),
        ({"min_rate_mb_s": 0}, "loader.remote.min_rate_mb_s"),
        ({"min_rate_mb_s": float("nan")}, "loader.remote.min_rate_mb_s"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(f"option '{option}'")):
            RemoteConfig(**kwargs)
    loader = from_dict(LoaderConfig, {"remote": {"timeout_s": 5, "retries": 0}})
    assert loader.remote == RemoteConfig(timeout_s=5.0, retries=0)
    assert LoaderConfig().remote == RemoteConfig()
    with pytest.raises(ConfigError, match=r"loader\.remote\.retries"):
        from_dict(LoaderConfig, {"remote": {"retries": -2}})


def test_server_errors_are_retried_and_a_404_is_not(copy):
    """A 503 is retried (and then succeeds); after the last retry the error names the URL, the
    attempts and the status; a missing file (404) is asked for once."""
    answers: dict[str, list[int]] = {"/manifest.json": [503, 503]}

    def fail(path: str) -> int | None:
        pending = answers.get(path)
        return pending.pop(0) if pending else None

    (copy / "wds/train-000001.tar").unlink()
    with serve_hostile(copy, fail=fail) as server:
        shards = open_shards(server.url, "train", "wds", FAST)  # third attempt answers
        assert server.requests.count("/manifest.json") == 3
        answers["/manifest.json"] = [503] * 3
        with pytest.raises(
            ShardError,
            match=rf"^{re.escape(server.url)}/manifest\.json: read failed after 3 attempts \(.*503",
        ):
            open_shards(server.url, "train", "wds", FAST)
        with pytest.raises(ShardError, match=r"wds/train-000001\.tar: missing shard file"):
            shards.read_shard(1)
        assert server.requests.count("/wds/train-000001.tar") == 1


# ---------------------------------------------------------------- 2. no directory listings


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
@pytest.mark.parametrize("refusal", [404, 403])
def test_http_without_directory_listings_reads_the_same_records(built, fmt, refusal):
    """A server refusing every directory URL: the manifest names every file, so open_shards
    reads the local path's snapshots and query sets, and asks for no directory."""
    local = open_shards(built, "train", fmt)
    with serve_hostile(built, refuse_dirs=refusal) as server:
        remote = open_shards(server.url, "train", fmt, FAST)
        assert_same_records(local, remote)
        listed = {"/manifest.json", *(f"/{name}" for name in local.manifest.files)}
        asked = set(server.requests)
    assert asked <= listed, sorted(asked - listed)


# ---------------------------------------------------------------- 3. unlisted files


@pytest.mark.parametrize("how", ["copied", "deleted"])
@pytest.mark.parametrize("where", ["local", "http"])
def test_unlisted_zarr_chunk_is_refused(copy, how, where):
    """Chunk 1 of 'fields' dropped from the manifest's list -- with chunk 0 copied over it (the
    reported case: snapshot 85 would return snapshot 5) or deleted (zarr would read the fill
    value) -- is refused by name; listed chunks still read."""
    name = "zarr/train/fields/c/1/0/0"
    chunk = copy / name
    if how == "copied":
        shutil.copyfile(copy / "zarr/train/fields/c/0/0/0", chunk)
    else:
        chunk.unlink()
    rewrite_manifest(copy, lambda m: m["files"].pop(name))

    def check(location: str) -> None:
        shards = open_shards(location, "train", "zarr", FAST)
        shards.snapshot(5)  # shard 0 is intact
        with pytest.raises(ShardError, match=rf"{re.escape(name)}: not listed in the manifest"):
            shards.snapshot(85)  # shard 1: trajectories 4..7

    if where == "local":
        check(str(copy))
    else:
        with serve_hostile(copy) as server:
            check(server.url)


def test_unlisted_tar_is_refused(copy):
    name = "wds/train-000001.tar"
    rewrite_manifest(copy, lambda m: m["files"].pop(name))
    with pytest.raises(ShardError, match=re.escape(name)):
        open_shards(copy, "train", "wds").read_shard(1)


def test_byte_range_reads_are_verified(copy):
    """zarr's byte-range reads are answered from the whole file, verified; an unlisted key is
    refused; a probe for an absent, unlisted metadata document finds nothing."""
    shards = open_shards(copy, "train", "zarr")
    location = str(copy / "zarr")
    store = _VerifyingStore(zarr_store(location), location, shards.manifest.files, FAST)
    proto = default_buffer_prototype()
    key = "train/fields/c/1/0/0"
    data = (copy / "zarr" / key).read_bytes()
    for byte_range, expected in [
        (RangeByteRequest(2, 10), data[2:10]),
        (OffsetByteRequest(7), data[7:]),
        (SuffixByteRequest(5), data[-5:]),
    ]:
        assert sync(store.get(key, proto, byte_range)).to_bytes() == expected
    [part] = sync(store.get_partial_values(proto, [(key, RangeByteRequest(0, 4))]))
    assert part.to_bytes() == data[:4]
    assert sync(store.get("train/.zarray", proto)) is None

    (copy / "zarr" / key).write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # edit the last byte
    with pytest.raises(ShardError, match=rf"{re.escape(key)}: checksum mismatch"):
        sync(store.get(key, proto, RangeByteRequest(0, 4)))
    with pytest.raises(ShardError, match=rf"{re.escape(key)}: checksum mismatch"):
        sync(store.get_partial_values(proto, [(key, RangeByteRequest(0, 4))]))
    with pytest.raises(ShardError, match=r"train/fields/c/9/0/0: not listed in the manifest"):
        sync(store.get("train/fields/c/9/0/0", proto, RangeByteRequest(0, 4)))


# ---------------------------------------------------------------- 4. crafted tars


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _replace(members: list, name: str, data: bytes) -> list:
    return [(n, data if n == name else d, kind) for n, d, kind in members]


def craft(case: str, members: list) -> list:
    """Damage a tar's member list [(name, bytes, type)] as ``case`` says."""
    if case == "missing member":
        return [m for m in members if m[0] != "000000_000003.importance.npy"]
    if case == "extra member":
        return [*members[:3], ("000000_000000.extra.npy", _npy(np.zeros(3)), tarfile.REGTYPE)]
    if case == "wrong dtype":
        return _replace(members, "000000_000002.fields.npy", _npy(np.zeros((1, 64))))
    if case == "wrong shape":
        return _replace(members, "000000_000002.fields.npy", _npy(np.zeros((1, 32), "f4")))
    if case == "malformed meta.json":
        return _replace(members, "000000_000001.meta.json", b'{"snapshot_id": 1, "traj')
    if case == "meta.json of other ids":
        meta = json.dumps({"snapshot_id": 41, "trajectory": 2, "time": 1}).encode()
        return _replace(members, "000000_000001.meta.json", meta)
    if case == "pickled npy":
        pickled = _npy(np.array([{"a": 1}] * 2, dtype=object), allow_pickle=True)
        return _replace(members, "000000_000004.queries.npy", pickled)
    if case == "symlink member":
        return _replace(
            [
                (n, d, tarfile.SYMTYPE if n == "000000_000000.meta.json" else k)
                for n, d, k in members
            ],
            "000000_000000.meta.json",
            b"",
        )
    if case == "sample out of place":
        return [*members, members[0]]
    raise AssertionError(case)


CRAFTED = {
    "missing member": r"lacks member '000000_000003\.importance\.npy'",
    "extra member": r"member '000000_000000\.extra\.npy': unexpected member",
    "wrong dtype": r"member '000000_000002\.fields\.npy': \(1, 64\) float64, the record schema says \(1, 64\) float32",
    "wrong shape": r"member '000000_000002\.fields\.npy': \(1, 32\) float32, the record schema says \(1, 64\) float32",
    "malformed meta.json": r"member '000000_000001\.meta\.json': not valid JSON",
    "meta.json of other ids": r"member '000000_000001\.meta\.json': trajectory 2, time 1 do not match",
    "pickled npy": r"member '000000_000004\.queries\.npy': not a plain \.npy array",
    "symlink member": r"member '000000_000000\.meta\.json' is not a regular file",
    "sample out of place": r"member '000000_000000\.fields\.npy': out of place",
    "not a tar": r": not a readable tar",
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_tar_is_refused_by_member(copy, case):
    """A tar rewritten with Python's tarfile and relisted with its own size and sha256, so only
    the reader's content checks can catch it: one ShardError naming the tar and the member."""
    path = copy / TAR
    if case == "not a tar":
        path.write_bytes(b"not a tar at all\n" * 100)
    else:
        with tarfile.open(path) as tar:
            members = [(m.name, tar.extractfile(m).read(), m.type) for m in tar.getmembers()]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data, kind in craft(case, members):
                info = tarfile.TarInfo(name)
                info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
                if kind == tarfile.SYMTYPE:
                    info.linkname = "/etc/passwd"
                tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        path.write_bytes(buf.getvalue())
    relist(copy, TAR)
    shards = open_shards(copy, "train", "wds")
    with pytest.raises(
        ShardError,
        match=rf"^{re.escape(str(path))}{'' if case == 'not a tar' else ': '}.*{CRAFTED[case]}",
    ) as err:
        shards.read_shard(0)
    assert "\n" not in str(err.value)
    shards.read_shard(1)  # the other tars still read


# ---------------------------------------------------------------- 5. dead and stalled servers


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_server_dying_mid_run_gives_a_named_error(built, fmt):
    """The server stops after the manifest (and a first shard) are read: the next read fails
    after the retries with a ShardError naming the URL, not an aiohttp traceback."""
    with serve_hostile(built) as server:
        shards = open_shards(server.url, "train", fmt, FAST)
        shards.read_shard(0)
        server.stop()
        start = time.monotonic()
        with pytest.raises(
            ShardError,
            match=rf"^{re.escape(server.url)}/(zarr|wds)/train\S*: read failed after 3 attempts \(",
        ):
            shards.read_shard(1)
        assert time.monotonic() - start < BOUND + SLACK


def test_silent_server_fails_open_within_the_timeout():
    """A server that accepts connections and never answers: open_shards gives up after
    timeout_s x attempts (plus the backoff), naming the manifest's URL."""
    with silent_server() as url:
        start = time.monotonic()
        with pytest.raises(
            ShardError,
            match=rf"^{re.escape(url)}/manifest\.json: no answer within 0\.5 s after 3 attempts",
        ):
            open_shards(url, "train", "zarr", FAST)
        elapsed = time.monotonic() - start
    assert FAST.timeout_s * FAST.attempts * 0.9 < elapsed < BOUND + SLACK


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_server_stalling_on_shards_gives_a_named_error(built, fmt):
    """Manifest and metadata answer, shard files never do: reading a shard fails within
    timeout_s x attempts, naming a shard file."""
    with serve_hostile(built, stall=is_shard_file) as server:
        shards = open_shards(server.url, "train", fmt, FAST)
        start = time.monotonic()
        with pytest.raises(
            ShardError,
            match=rf"^{re.escape(server.url)}/(zarr|wds)/train\S*: no answer within 0\.5 s after 3 attempts",
        ):
            shards.read_shard(0)
        assert time.monotonic() - start < BOUND + SLACK


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_an_answer_longer_than_listed_is_refused_as_it_comes(built, fmt):
    """A server answers each shard file with its bytes and then 200 MiB more: the read stops as
    the answer passes the manifest's size, with one error naming the file, not retried, and the
    rest is never fetched (before, all of it was held in memory, then found too long)."""

    def longer(path: str):
        if not is_shard_file(path):
            return None
        real = (built / path.lstrip("/")).read_bytes()
        return itertools.chain([real], itertools.repeat(bytes(1 << 20), 200))

    with serve_hostile(built, body=longer) as server:
        shards = open_shards(server.url, "train", fmt, FAST)
        with pytest.raises(
            ShardError,
            match=rf"^{re.escape(server.url)}/(zarr|wds)/train\S*: more than the [\d,]+ bytes expected; refused$",
        ):
            shards.read_shard(0)
    asked = [path for path in server.requests if is_shard_file(path)]
    assert asked and len(asked) == len(set(asked))  # each file asked for once: no retry
    assert server.sent < len(asked) * (16 << 20)  # its size, a MiB read ahead, socket buffers


def test_a_trickling_server_is_abandoned_by_its_rate(built):
    """A server that sends the manifest a byte every 20 ms never pauses long enough for a
    timeout: the read is abandoned once it falls behind loader.remote.min_rate_mb_s after its
    first timeout_s, and after the retries one error names the URL and the rate."""

    def trickle(path: str):
        if path != "/manifest.json":
            return None
        data = (built / "manifest.json").read_bytes()

        def slowly():
            for byte in data:
                time.sleep(0.02)
                yield bytes([byte])

        return slowly()

    with serve_hostile(built, body=trickle) as server:
        start = time.monotonic()
        with pytest.raises(
            ShardError,
            match=rf"^{re.escape(server.url)}/manifest\.json: answer slower than 0\.1 MB/s after 3 attempts",
        ):
            open_shards(server.url, "train", "zarr", FAST)
        elapsed = time.monotonic() - start
    assert len(server.requests) == FAST.attempts
    assert elapsed < BOUND + FAST.attempts * 0.1 + SLACK  # each attempt: timeout_s and a byte


def test_inspect_shards_gives_up_on_a_silent_server():
    """inspect_shards used to hang on such a server: now one 'error: ...' line and exit 2."""
    with silent_server() as url:
        start = time.monotonic()
        result = run_inspect(url, *FAST_ARGS)
        elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {url}/manifest.json: no answer"), lines
    assert elapsed < BOUND + 30  # the interpreter's start and imports included


def test_inspect_shards_turns_shard_errors_into_exit_2(copy, tmp_path):
    """No manifest, a dead server: one 'error: ...' line, exit 2; so is a bad --timeout-s."""
    with serve_hostile(copy) as server:
        pass  # stopped: nothing listens there any more
    for args in [(tmp_path / "nothing",), (server.url, *FAST_ARGS)]:
        result = run_inspect(*args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
    bad = run_inspect(copy, "--timeout-s", "0")
    assert bad.returncode == 2 and "--timeout-s" in bad.stderr


# ---------------------------------------------------------------- 6. chained fsspec URLs

V2_METADATA = (".zgroup", ".zarray", ".zattrs", ".zmetadata")


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_simplecache_over_http_reads_the_same_records(built, fmt):
    """``simplecache::http://...`` (fsspec's local file cache in front of http) reads the local
    path's snapshots and query sets in both formats, a second read of a shard comes from the
    cache, and zarr asks for no zarr v2 metadata. zarr used to fail here: its event loop awaited
    an http filesystem made for fsspec's ("Timeout context manager should be used inside a
    task")."""
    local = open_shards(built, "train", fmt)
    with serve_hostile(built) as server:
        remote = open_shards(f"simplecache::{server.url}", "train", fmt, FAST)
        assert_same_records(local, remote)
        asked = set(server.requests)
        server.requests.clear()
        np.testing.assert_array_equal(
            remote.read_shard(0, cache=False).fields, local.read_shard(0).fields
        )
        assert server.requests == []
    listed = {"/manifest.json", *(f"/{name}" for name in local.manifest.files)}
    assert asked <= listed, sorted(asked - listed)
    assert not [path for path in asked if path.endswith(V2_METADATA)]
