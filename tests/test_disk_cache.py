"""The local disk cache of remote shard sets: a second reader fetches no shard file, a corrupted
cached file is detected and fetched again, the size bound evicts the least recently used, and
nothing the cache did not write is ever deleted."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import serve_hostile

from pipeline.build import BuildConfig, run_build
from pipeline.config import ConfigError, from_dict, load_config
from pipeline.shards import open_shards
from pipeline.storage import DiskCache, RemoteConfig


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, burgers_file: Path) -> Path:
    out = tmp_path_factory.mktemp("cache") / "set"
    args = [f"data.path={burgers_file}", f"out={out}", "device=cpu", "epochs=2", "format=both"]
    run_build(load_config(BuildConfig, None, [*args, "trajectories_per_shard=4", "progress=false"]))
    return out


def read_everything(url: str, fmt: str, remote: RemoteConfig) -> list[np.ndarray]:
    shards = open_shards(url, "train", fmt, remote=remote, layer=None)
    return [shards.read_shard(i, cache=False).fields for i in range(len(shards.shards))]


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_second_reader_fetches_no_shard_file_and_a_corrupt_one_is_fetched_again(
    built, tmp_path, fmt
):
    remote = RemoteConfig(cache_dir=str(tmp_path / "cache"), retries=0)
    with serve_hostile(built) as server:
        url = server.url
        first = read_everything(url, fmt, remote)
        fetched = [p for p in server.requests if p != "/manifest.json"]
        assert fetched, "the first reader fetches the files"
        cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
        assert len(cached) == len(set(fetched)) and all(len(name) == 64 for name in cached)
        server.requests.clear()
        second = read_everything(url, fmt, remote)
        assert [p for p in server.requests if p != "/manifest.json"] == []
        for a, b in zip(first, second, strict=True):
            np.testing.assert_array_equal(a, b)
        # a cached file's bytes change on disk: detected by its sha256, fetched again
        victim = tmp_path / "cache" / cached[0]
        victim.write_bytes(b"x" + victim.read_bytes()[1:])
        server.requests.clear()
        third = read_everything(url, fmt, remote)
        refetched = [p for p in server.requests if p != "/manifest.json"]
        assert len(refetched) == 1
        assert hashlib.sha256(victim.read_bytes()).hexdigest() == cached[0]
        for a, b in zip(first, third, strict=True):
            np.testing.assert_array_equal(a, b)


def test_local_sets_bypass_the_cache(built, tmp_path):
    remote = RemoteConfig(cache_dir=str(tmp_path / "cache"))
    read_everything(str(built), "wds", remote)
    assert not (tmp_path / "cache").exists()


def test_size_bound_evicts_least_recently_used_and_only_cache_files(tmp_path):
    cache = DiskCache(tmp_path, limit_mb=1)
    foreign = tmp_path / "notes.txt"
    foreign.write_text("mine")
    blobs = [os.urandom(400_000) for _ in range(3)]
    names = [hashlib.sha256(b).hexdigest() for b in blobs]
    cache.put(names[0], blobs[0])
    cache.put(names[1], blobs[1])
    os.utime(tmp_path / names[0], (1, 1))  # least recently used
    os.utime(tmp_path / names[1], (2, 2))
    assert cache.get(names[1], len(blobs[1])) == blobs[1]  # used now: the newest
    cache.put(names[2], blobs[2])  # 1.2 MB > 1 MiB: the oldest goes
    assert not (tmp_path / names[0]).exists()
    assert cache.get(names[2], len(blobs[2])) == blobs[2]
    assert foreign.read_text() == "mine"
    assert cache.get(names[0], len(blobs[0])) is None


def test_cache_options_are_range_checked():
    with pytest.raises(ConfigError, match=r"loader\.remote\.cache_mb"):
        from_dict(RemoteConfig, {"cache_mb": 0})
    with pytest.raises(ConfigError, match=r"loader\.remote\.cache_dir"):
        from_dict(RemoteConfig, {"cache_dir": ""})
