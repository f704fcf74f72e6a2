"""Hostile inputs to a build and to a finished set: each gets one clear error and loses nothing.

Real HDF5 files, real zarr stores and tars, the real command line in its own process where the
user's view matters (exit code 2, one ``error:`` line), real locks held by real processes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
from helpers import BUILD, ENV, INSPECT, ROOT, manifest_of, run_tool

from pipeline import build as build_module
from pipeline.build import BuildConfig, run_build
from pipeline.config import ConfigError, load_config
from pipeline.records import ShardError
from pipeline.shards import open_shards
from pipeline.sources.splits import DataConfig


def build(data: Path, out: Path, *extra: str) -> Path:
    """A small field-only build in this process, both formats, parsed as the CLI parses it."""
    args = [f"data.path={data}", f"out={out}", "epochs=2", "device=cpu", "progress=false"]
    run_build(load_config(BuildConfig, None, [*args, *extra]))
    return out


def build_cli(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [f"data.path={data}", f"out={out}", "epochs=2", "device=cpu", "progress=false"]
    return run_tool(BUILD, *args, *extra)


def snapshot_of_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a refused command (exit code 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory, burgers_file: Path) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "burgers.h5"
    shutil.copy(burgers_file, path)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data: Path) -> Path:
    return build(data, tmp_path_factory.mktemp("hostile") / "set")


def edited_copy(finished: Path, tmp_path: Path, edit) -> Path:
    """A copy of the finished set whose manifest.json went through ``edit(dict)``."""
    root = tmp_path / "edited"
    shutil.copytree(finished, root)
    manifest = manifest_of(root)
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return root


# ---------------------------------------------------------------- overwrite loses no user data


def test_overwrite_next_to_data_refuses_and_removes_nothing(data, tmp_path):
    """out= the directory holding the input HDF5, with overwrite=true: refused, nothing deleted."""
    out = tmp_path / "project"
    out.mkdir()
    shutil.copy(data, out / "burgers.h5")
    (out / "notes.txt").write_text("mine")
    before = snapshot_of_files(out)
    cfg = load_config(
        BuildConfig,
        None,
        [f"data.path={out / 'burgers.h5'}", f"out={out}", "epochs=2", "progress=false"],
    )
    with pytest.raises(ShardError, match="holds files of no build"):
        run_build(cfg)
    cfg.overwrite = True
    with pytest.raises(ShardError, match=r"burgers\.h5, notes\.txt.*nothing was removed"):
        run_build(cfg)
    after = snapshot_of_files(out)
    assert {k: v for k, v in after.items() if not k.startswith(".lock")} == before


def test_overwrite_of_a_build_with_a_user_file_inside_removes_nothing(finished, data, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(finished, out)
    (out / "wds" / "README.txt").write_text("my notes about these shards")
    before = snapshot_of_files(out)
    with pytest.raises(ShardError, match=r"wds/README\.txt"):
        build(data, out, "seed=5", "overwrite=true")
    assert snapshot_of_files(out) == before


def test_overwrite_replaces_a_build_that_holds_only_build_files(finished, data, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(finished, out)
    build(data, out, "seed=5", "overwrite=true")
    assert manifest_of(out)["config"]["seed"] == 5
    assert open_shards(out).verify() == []


# ---------------------------------------------------------------- the manifest's meaning is checked


@pytest.mark.parametrize(
    ("key", "edit"),
    [
        ("sample_set_id", lambda m: m["config"]["sampler"].update(beta=0.5)),
        ("sample_set_id", lambda m: m["data"]["norm"]["std"].__setitem__(0, 2.0)),
        ("sample_set_id", lambda m: m.update(sample_set_id="0" * 64)),
        ("build_id", lambda m: m.update(build_id="0" * 64)),
        ("count", lambda m: m["splits"]["train"]["shards"][1].update(count=4)),
        ("num_snapshots", lambda m: m["splits"]["train"].update(num_snapshots=7)),
        ("k_per_epoch", lambda m: m["k_per_epoch"].__setitem__(0, 3)),
        ("epochs", lambda m: m.update(epochs=1)),
        ("data.norm", lambda m: m["data"]["norm"]["std"].__setitem__(0, -1.0)),
        ("tar", lambda m: m["splits"]["train"]["shards"][0].update(tar="wds/train-000001.tar")),
    ],
)
def test_edited_manifest_is_refused_on_open(finished, tmp_path, key, edit):
    """An edit that changes what the set means fails on open, naming the key; inspect agrees."""
    root = edited_copy(finished, tmp_path, edit)
    with pytest.raises(ShardError, match=rf"manifest\.json: .*key '[^']*{key}"):
        open_shards(root)


@pytest.mark.slow
def test_inspect_refuses_an_edited_manifest(finished, tmp_path):
    root = edited_copy(finished, tmp_path, lambda m: m["config"]["sampler"].update(beta=0.5))
    line = one_error_line(run_tool(INSPECT, root))
    assert "key 'sample_set_id'" in line and "manifest.json" in line


def test_a_shard_copied_over_another_is_refused(finished, tmp_path):
    """Copy shard 0's tar over shard 1's and make the manifest list the copy's bytes: every
    checksum verifies, but the shard holds other snapshots than the manifest says."""
    root = tmp_path / "copied"
    shutil.copytree(finished, root)
    manifest = manifest_of(root)
    first, second = (s["tar"] for s in manifest["splits"]["train"]["shards"][:2])
    shutil.copy(root / first, root / second)
    manifest["files"][second] = dict(manifest["files"][first])
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    shards = open_shards(root, "train", "wds")
    assert shards.verify() == []  # the bytes are what the manifest lists ...
    steps = shards.steps
    with pytest.raises(ShardError, match="holds other snapshots than the manifest says"):
        shards.snapshot(4 * steps + 1)  # ... but shard 1 now holds shard 0's trajectories
    shards.snapshot(1)  # shard 0 still reads


# ---------------------------------------------------------------- identity is content


def test_noop_rebuild_changes_no_byte(finished, data, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(finished, root)
    before = snapshot_of_files(root)
    time.sleep(1.1)  # a rewritten manifest would carry another 'created' second
    build(data, root)
    assert snapshot_of_files(root) == before


def test_same_set_elsewhere_has_the_same_identity(finished, data, tmp_path):
    """Built from a copy of the data at another path into another directory, at another time:
    the same sample_set_id, build_id and manifest identity (provenance aside)."""
    moved = tmp_path / "elsewhere" / "copy.h5"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    other = build(moved, tmp_path / "other")
    a, b = open_shards(finished), open_shards(other)
    assert (a.sample_set_id, a.manifest.build_id, a.manifest_id) == (
        b.sample_set_id,
        b.manifest.build_id,
        b.manifest_id,
    )
    assert a.manifest.data.path != b.manifest.data.path


def test_rebuild_does_not_rebless_an_edited_zarr_json(finished, data, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(finished, root)
    meta = root / "zarr" / "train" / "fields" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"] = {"edited": True}
    meta.write_text(json.dumps(doc))
    manifest_before = (root / "manifest.json").read_bytes()
    with pytest.raises(ShardError, match=r"zarr/train/fields/zarr\.json: changed since this build"):
        build(data, root)
    assert (root / "manifest.json").read_bytes() == manifest_before
    with pytest.raises(ShardError, match=r"zarr/train/fields/zarr\.json"):
        open_shards(root, "train", "zarr")


# ---------------------------------------------------------------- bad data, bad options


def test_huge_finite_values_are_named_with_file_and_trajectory(data, tmp_path):
    """A finite 1e38 in one snapshot overflows float32 gradients: one error naming the file,
    the trajectory and the time, no traceback from inside the sampler."""
    bad = tmp_path / "huge.h5"
    shutil.copy(data, bad)
    test_traj = DataConfig(path=str(bad)).open()[1]["test"][0]
    with h5py.File(bad, "r+") as f:
        f["tensor"][test_traj, 4, 10] = 1e38
    with pytest.raises(
        ShardError, match=rf"huge\.h5: trajectory {test_traj}, time 4 \(split test\)"
    ):
        build(bad, tmp_path / "out", "sampler.kind=gradient")


def test_out_that_is_a_file_is_an_option_error(data, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("keep me")
    with pytest.raises(ConfigError, match=r"option 'out'.*is a file"):
        build(data, out)
    assert out.read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_any_work(data, tmp_path):
    with pytest.raises(ConfigError, match=r"option 'device'.*no CUDA device"):
        build(data, tmp_path / "out", "device=cuda")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("override", "option"),
    [
        ("epochs=0", "epochs"),
        ("seed=-1", "seed"),
        ("finalize_timeout=0", "finalize_timeout"),
        ("batch_size=0", "batch_size"),
        ("splits=[]", "splits"),
        ("format=npz", "format"),
    ],
)
def test_out_of_range_build_options_are_refused_before_any_work(data, tmp_path, override, option):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=f"option '{option}'"):
        load_config(BuildConfig, None, [f"data.path={data}", f"out={out}", override])
    assert not out.exists()


# ---------------------------------------------------------------- concurrency and failures


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from pipeline.build import rank_lock
with rank_lock(Path(sys.argv[1]), 0):
    Path(sys.argv[2]).touch()
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
"""


def test_second_build_on_a_locked_out_refuses_at_once(data, tmp_path):
    """A build holds its rank's lock for its whole run; a second build of that rank refuses at
    once (here the first is a real process holding the real lock), then builds once it is free."""
    out, held, release = tmp_path / "out", tmp_path / "held", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, out, held, release], env=ENV)
    try:
        deadline = time.monotonic() + 60
        while not held.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        start = time.monotonic()
        with pytest.raises(ShardError, match="another build is writing it"):
            build(data, out)
        assert time.monotonic() - start < 5  # no plan, no norm statistics: at once
    finally:
        release.touch()
        holder.wait(timeout=60)
    build(data, out)
    assert open_shards(out).verify() == []


def test_rank_zero_names_a_rank_that_died(data, tmp_path, monkeypatch):
    """World size 2 with no rank 1 running: rank 0 does not wait finalize_timeout silently, it
    names rank 1 once rank 1's lock has stayed free for the grace period."""
    monkeypatch.setattr(build_module, "DEAD_RANK_GRACE_S", 1.0)
    start = time.monotonic()
    with pytest.raises(ShardError, match=r"rank\(s\) \[1\] left shards unfinished"):
        build(data, tmp_path / "out", "rank=0", "world_size=2")
    assert time.monotonic() - start < 60


ENOSPC_BUILD = """
import errno, runpy, sys
from pipeline.formats.wds import WdsWriter
write, calls = WdsWriter.write, []
def full_disk(self, *args):
    calls.append(1)
    if len(calls) == 2:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.root / "wds"))
    return write(self, *args)
WdsWriter.write = full_disk
sys.argv = ["build_shards.py", *sys.argv[1:]]
runpy.run_path("tools/build_shards.py", run_name="__main__")
"""


@pytest.mark.slow
def test_full_disk_stops_with_one_line_and_resumes(data, finished, tmp_path):
    """ENOSPC while writing the second shard (a fault-injected writer in a real build process):
    one error line naming the path; the directory says it is unfinished; a rerun finishes it
    to the same set as an undisturbed build."""
    out = tmp_path / "out"
    args = [f"data.path={data}", f"out={out}", "epochs=2", "device=cpu", "progress=false"]
    result = subprocess.run(
        [sys.executable, "-c", ENOSPC_BUILD, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=120,
    )
    line = one_error_line(result)
    assert "No space left on device" in line and str(out / "wds") in line
    assert "rerun the same command" in line
    assert not (out / "manifest.json").exists()
    with pytest.raises(ShardError, match="an unfinished build"):
        open_shards(out)
    rerun = build_cli(data, out)
    assert rerun.returncode == 0, rerun.stderr
    assert open_shards(out).manifest_id == open_shards(finished).manifest_id
    assert manifest_of(out)["files"] == manifest_of(finished)["files"]


@pytest.mark.slow
def test_cli_refusals_are_one_line(data, tmp_path):
    """The user's view of three refusals: exit code 2, one line, the option or file named."""
    out = tmp_path / "file"
    out.write_text("x")
    assert "option 'out'" in one_error_line(build_cli(data, out))
    assert "option 'sampler.beta'" in one_error_line(
        build_cli(data, tmp_path / "o", "sampler.beta=-1")
    )
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    line = one_error_line(build_cli(data, data.parent, "overwrite=true"))
    assert "nothing was removed" in line
    assert hashlib.sha256(data.read_bytes()).hexdigest() == digest


def test_the_data_file_is_read_once_per_output_directory(data, tmp_path, monkeypatch):
    """The source's sha256 and train-split normalisation are recorded with its size and mtime:
    a rerun (and every other rank) reuses them instead of reading the file again; a changed file
    is hashed again."""
    out = build(data, tmp_path / "set")
    record = json.loads((out / "parts" / "source.json").read_text())
    assert record["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert record["norm"]["std"] == list(open_shards(out).manifest.data.norm.std)

    def no_hashing(path):
        raise AssertionError(f"{path} hashed again")

    def no_norm(*args, **kwargs):
        raise AssertionError("norm statistics computed again")

    compute_norm = build_module.trajectory_sums  # what the build sums the norm with
    monkeypatch.setattr(build_module, "file_sha256", no_hashing)
    monkeypatch.setattr(build_module, "trajectory_sums", no_norm)
    build(data, out)  # the rerun reuses the record
    copy = tmp_path / "copy.h5"
    shutil.copy(data, copy)
    # the hash runs beside the norm statistics: let those run, to see the hash refused
    monkeypatch.setattr(build_module, "trajectory_sums", compute_norm)
    with pytest.raises(AssertionError, match="hashed again"):
        build(copy, out)  # another file (path, mtime): hashed, not trusted from the record


def test_a_rank_whose_rank_0_never_comes_sums_each_share_once(data, tmp_path, monkeypatch):
    """Rank 1 of 2, with no rank 0: it writes its share of the norm's sums while it waits for
    rank 0, then (rank 0 gone) computes the statistics itself from that share, not summed a
    second time, and rank 0's; they are one process's, bit for bit."""
    summed: list[list[int]] = []
    compute = build_module.trajectory_sums

    def counting(source, trajectories, progress):
        summed.append(list(trajectories))
        return compute(source, trajectories, progress)

    def facts(out: Path, rank: int, world: int) -> dict:
        args = [f"data.path={data}", f"out={out}", "device=cpu", "progress=false",
                f"rank={rank}", f"world_size={world}"]  # fmt: skip
        cfg = load_config(BuildConfig, None, args)
        source, splits = cfg.data.open()
        return build_module.source_facts(cfg, source, splits["train"], need_norm=True)

    one = facts(tmp_path / "one", 0, 1)
    monkeypatch.setattr(build_module, "trajectory_sums", counting)
    monkeypatch.setattr(build_module, "DEAD_RANK_GRACE_S", 0.5)  # rank 0 gone after 0.5 s
    alone = facts(tmp_path / "two", 1, 2)
    train = one["norm"]["train"]
    assert (tmp_path / "two" / "parts" / "norm-1-of-2.json").exists()  # written while waiting
    assert summed == [train[1::2], train[0::2]]
    assert alone["norm"] == one["norm"]
