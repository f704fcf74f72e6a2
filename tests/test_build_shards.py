"""build_shards end to end: generated HDF5 data, a tiny codec checkpoint, real zarr stores and
tars, real subprocesses (several ranks, a SIGKILL, bad input), http and file:// URLs, and the
inspect tool."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from helpers import (
    BUILD,
    ENV,
    INSPECT,
    ROOT,
    manifest_of,
    run_tool,
    serve_directory,
    tiny_codec_checkpoint,
)

import pipeline.formats.zarr as zarr_format
from pipeline.build import BuildConfig, run_build
from pipeline.config import load_config
from pipeline.loader import BatchSpec, LoaderConfig, ShardLoader
from pipeline.records import ShardError
from pipeline.schedules import k_per_epoch
from pipeline.shards import open_shards
from pipeline.sources.generate import generate
from pipeline.sources.splits import DataConfig
from ups.models.codec import load_codec, load_encoder

# real builds, many through the command line: the fast lane (pytest -m "not slow") leaves them out
pytestmark = pytest.mark.slow

RECORD = (
    "snapshot_id",
    "trajectory",
    "time",
    "fields",
    "importance",
    "queries",
    "pi_scale",
    "latent",
)
MEMBERS = ("fields.npy", "importance.npy", "latent.npy", "meta.json", "pi_scale.npy", "queries.npy")
STEPS = 10
EPOCHS = 4


# ---------------------------------------------------------------- helpers


def build_args(data: Path, out: Path, *extra: str, encoder: Path | None = None) -> list[str]:
    """The key=value arguments of one build (the same for the CLI and in-process builds).

    Builds run on the CPU even where a GPU is present: latents are compared bit for bit with a
    fresh CPU encode (the GPU build has its own test)."""
    args = [
        f"data.path={data}",
        f"out={out}",
        "device=cpu",
        f"epochs={EPOCHS}",
        "trajectories_per_shard=4",
        "progress=false",
    ]
    return args + ([f"encoder={encoder}"] if encoder else []) + list(extra)


def build_here(args: list[str]) -> Path:
    """Build in this process, parsing the arguments exactly as the CLI does."""
    cfg = load_config(BuildConfig, None, args)
    run_build(cfg, load_encoder=load_encoder)
    return Path(cfg.out)


def start_tool(script: Path, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=ENV, **kwargs)


def assert_same_files(a: Path, b: Path) -> None:
    """Same manifest file entries and byte-identical files, and the same zarr array values."""
    ma, mb = manifest_of(a), manifest_of(b)
    assert ma["sample_set_id"] == mb["sample_set_id"]
    assert ma["files"] == mb["files"]
    for name in ma["files"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    if "zarr" in ma["formats"]:
        za, zb = (
            zarr.open_group(str(a / "zarr"), mode="r"),
            zarr.open_group(str(b / "zarr"), mode="r"),
        )
        for split in ma["splits"]:
            names = sorted(za[split].array_keys())
            assert names == sorted(zb[split].array_keys())
            for name in names:
                np.testing.assert_array_equal(
                    za[split][name][...], zb[split][name][...], err_msg=f"{split}/{name}"
                )


def documented_indices(row: np.ndarray, n: int, k: int, slot: dict) -> np.ndarray:
    """One epoch's query set from a snapshot's ``queries`` row, decoded as docs/shard-format.md
    describes, independently of pipeline.query_codec (plain Python over the bits)."""
    if slot["code"] == "dense":
        return np.arange(n)
    bits = np.unpackbits(row[slot["offset"] : slot["offset"] + slot["nbytes"]]).tolist()
    held = n - k if slot["complement"] else k
    if slot["code"] == "bitmask":
        points = [i for i in range(n) if bits[i]]
    else:
        low = slot["low_bits"]
        lows = [
            int("".join(map(str, bits[i * low : (i + 1) * low])) or "0", 2) for i in range(held)
        ]
        ones = [p for p, bit in enumerate(bits[held * low :]) if bit][:held]
        points = [((ones[i] - i) << low) | lows[i] for i in range(held)]
    if slot["complement"]:
        points = sorted(set(range(n)) - set(points))
    return np.asarray(points, dtype=np.int64)


def documented_weights(q: np.ndarray, k: int, indices: np.ndarray, beta: float) -> np.ndarray:
    """w = (k / (N pi))^beta with pi = min(1, k q) and the excess of capped points redistributed,
    implemented from docs/shard-format.md, independently of pipeline.samplers."""
    q = q.astype(np.float64)
    capped = np.zeros(q.shape, dtype=bool)
    while True:
        free = np.where(capped, 0.0, q)
        pi = np.where(capped, 1.0, (k - capped.sum()) * free / free.sum())
        newly = (pi >= 1.0) & ~capped
        if not newly.any():
            break
        capped |= newly
    return (k / (q.size * pi[indices])) ** beta


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This module's in-process builds and encodes run on one thread, like its subprocesses."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("build_shards")


@pytest.fixture(scope="module")
def burgers(work: Path) -> Path:
    """Burgers 1D, grid 64, 12 trajectories of 10 snapshots."""
    return generate(
        "burgers1d",
        work / "burgers.h5",
        trajectories=12,
        steps=STEPS,
        resolution=64,
        seed=0,
        progress=False,
    )


@pytest.fixture(scope="module")
def codec(work: Path, burgers: Path) -> Path:
    return tiny_codec_checkpoint(burgers, work / "codec.pt")


@pytest.fixture(scope="module")
def built(work: Path, burgers: Path, codec: Path) -> Path:
    """Both formats, with latents, uniform sampler."""
    return build_here(build_args(burgers, work / "uniform", encoder=codec))


@pytest.fixture(scope="module")
def built_gradient(work: Path, burgers: Path, codec: Path) -> Path:
    """Both formats, with latents, gradient sampler and a k_e that shrinks over the epochs."""
    extra = (
        "sampler.kind=gradient",
        "sampler.alpha=0.3",
        "schedule.kind=linear",
        "schedule.start_ratio=0.5",
        "schedule.end_ratio=0.2",
    )
    return build_here(build_args(burgers, work / "gradient", *extra, encoder=codec))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_build_matches_cpu_build(work: Path, built: Path, burgers: Path, codec: Path) -> None:
    """A CUDA build (bf16 autocast encode, GPU importance and query plan) stores latents equal to
    the fp32 CPU build's up to bf16 rounding, and the very same uniform query sets."""
    gpu = build_here(build_args(burgers, work / "gpu", "device=cuda", encoder=codec))
    for split in manifest_of(built)["splits"]:
        cpu_set, gpu_set = open_shards(built, split, "zarr"), open_shards(gpu, split, "zarr")
        for j in range(len(cpu_set.shards)):
            a, b = cpu_set.read_shard(j).arrays(), gpu_set.read_shard(j).arrays()
            scale = np.abs(a["latent"]).max()
            np.testing.assert_allclose(b["latent"], a["latent"], rtol=0, atol=0.05 * scale)
            for name in ("snapshot_id", "fields", "queries", "pi_scale"):
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture
def http_url(built: Path):
    """The uniform shard set served over http on 127.0.0.1."""
    with serve_directory(built) as url:
        yield url


# ---------------------------------------------------------------- 1. end to end


@pytest.mark.parametrize("kind", ["uniform", "gradient"])
def test_both_formats_hold_the_same_records(kind, built, built_gradient, burgers, codec):
    """Every snapshot and epoch: zarr == tars; latents == a fresh encode; fields == the HDF5 file;
    query sets of k_e distinct in-range points with the documented weights (1 for uniform)."""
    root = built if kind == "uniform" else built_gradient
    manifest = manifest_of(root)
    ks = manifest["k_per_epoch"]
    assert len(ks) == EPOCHS
    if kind == "gradient":
        assert ks[0] > ks[-1]  # the schedule really shrinks k_e
    source, _ = DataConfig(path=str(burgers)).open()
    model, norm, _ = load_codec(codec, source.info)
    n = source.info.num_points
    with h5py.File(burgers, "r") as f:
        tensor = f["tensor"][...]  # (trajectories, steps, X)
    for split, entry in manifest["splits"].items():
        zs, ws = open_shards(root, split, "zarr"), open_shards(root, split, "wds")
        assert len(zs) == len(ws) == entry["num_snapshots"] == len(entry["trajectories"]) * STEPS
        seen = set()
        for j in range(len(entry["shards"])):
            zb, wb = zs.read_shard(j).arrays(), ws.read_shard(j).arrays()
            assert sorted(zb) == sorted(wb) == sorted(RECORD)
            for name in zb:
                assert zb[name].dtype == wb[name].dtype, name
                np.testing.assert_array_equal(zb[name], wb[name], err_msg=name)
            traj, t = zb["trajectory"], zb["time"]
            seen |= set(traj.tolist())
            np.testing.assert_array_equal(zb["snapshot_id"], traj * STEPS + t)
            np.testing.assert_array_equal(zb["fields"], tensor[traj, t][:, None])
            with torch.no_grad():  # one shard is one encode batch in the build, so bits match
                fresh = model.encode(
                    norm.normalize(torch.from_numpy(tensor[traj, t][:, None]))
                ).numpy()
            assert zb["latent"].dtype == np.float32
            np.testing.assert_array_equal(zb["latent"], fresh)
        assert sorted(seen) == entry["trajectories"]
        for i in range(len(zs)):
            q = zs.snapshot(i)["importance"]
            for epoch in range(EPOCHS):
                iz, wz = zs.query_set(i, epoch)
                iw, ww = ws.query_set(i, epoch)
                np.testing.assert_array_equal(iz, iw)
                np.testing.assert_array_equal(wz, ww)
                assert len(iz) == ks[epoch] and len(np.unique(iz)) == len(iz)
                assert iz.min() >= 0 and iz.max() < n and np.all(np.diff(iz) > 0)
                if kind == "uniform":
                    assert np.all(wz == 1.0)
                else:
                    np.testing.assert_allclose(
                        wz, documented_weights(q, ks[epoch], iz, 1.0), rtol=1e-5
                    )
    if kind == "gradient":  # importance sampling really is non-uniform here
        assert not np.all(open_shards(root).query_set(0, 0)[1] == 1.0)


def test_a_set_whose_every_epoch_is_dense_builds_and_reads(burgers, tmp_path):
    """start_ratio 1.0 and no decay: every query set is the whole grid, so the stored query
    sets are empty (zarr keeps no chunk file for them); both formats build, verify and read."""
    root = build_here(build_args(burgers, tmp_path / "dense", "schedule.start_ratio=1.0"))
    manifest = manifest_of(root)
    n = 64  # the grid
    assert manifest["k_per_epoch"] == [n] * EPOCHS
    assert not any("/queries/c/" in name for name in manifest["files"])  # no empty chunk listed
    zs, ws = open_shards(root, "train", "zarr"), open_shards(root, "train", "wds")
    assert zs.verify() == [] and ws.verify() == []
    for i in (0, len(zs) - 1):
        for epoch in range(EPOCHS):
            (iz, wz), (iw, ww) = zs.query_set(i, epoch), ws.query_set(i, epoch)
            np.testing.assert_array_equal(iz, np.arange(n))
            np.testing.assert_array_equal(iw, np.arange(n))
            assert np.all(wz == 1.0) and np.all(ww == 1.0)


def test_an_epoch_reads_only_the_chunks_of_its_query_sets(burgers, tmp_path, monkeypatch):
    """zarr cuts the query sets' byte axis into chunks of their own (QUERY_CHUNK_BYTES, made
    small here so that this small grid's 12 epochs span several, slots straddling chunk edges):
    the manifest lists every chunk, an epoch's coded sets read apart are the whole record's slot
    in both formats, and a read of one epoch does not touch another epoch's chunk, which a
    missing chunk file shows; a stream reading them gives the batches a stream over the tars
    gives."""
    monkeypatch.setattr(zarr_format, "QUERY_CHUNK_BYTES", 16)
    args = build_args(burgers, tmp_path / "chunked", encoder=None)
    args = [a for a in args if not a.startswith("epochs=")]
    args += ["epochs=12", "sampler.kind=gradient", "schedule.kind=linear"]
    args += ["schedule.start_ratio=0.5", "schedule.end_ratio=0.2"]
    root = build_here(args)
    zs, ws = open_shards(root, "train", "zarr"), open_shards(root, "train", "wds")
    assert zs.sets_apart and not ws.sets_apart
    row = zs.manifest.record_schema()["queries"][0][0]  # bytes of a snapshot's 12 sets
    chunks = -(-row // 16)
    assert chunks > 3
    files = manifest_of(root)["files"]
    for index in range(len(zs.shards)):
        listed = {n for n in files if n.startswith(f"zarr/train/queries/c/{index}/")}
        assert listed == {f"zarr/train/queries/c/{index}/{j}" for j in range(chunks)}
    for index in range(len(zs.shards)):
        whole = zs.read_shard(index, cache=False).queries
        for epoch, slot in enumerate(zs.slots):
            np.testing.assert_array_equal(zs.read_codes(index, epoch), whole[:, slot.rows])
            np.testing.assert_array_equal(ws.read_codes(index, epoch), whole[:, slot.rows])
    # a stream over those chunks gives the batches a stream over the tars gives, every epoch
    streams = []
    for fmt in ("zarr", "wds"):
        cfg = LoaderConfig(format=fmt, partitions=2, shuffle_shards=2, process=False)
        spec = BatchSpec(window=0, sparse_steps=(0,), latents=False)
        loader = ShardLoader(open_shards(root, "train", fmt), cfg, batch_size=4, spec=spec)
        batches = [(b.snapshot_id, b.coords, b.targets) for _ in range(12) for b in loader]
        loader.close()
        streams.append(batches)
    assert len(streams[0]) == len(streams[1]) > 12
    for one, other in zip(*streams, strict=True):
        for x, y in zip(one, other, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    first, last = zs.slots[0], zs.slots[-1]
    assert (last.offset + last.nbytes - 1) // 16 == chunks - 1 and first.nbytes <= 16
    (root / f"zarr/train/queries/c/0/{chunks - 1}").unlink()
    zs = open_shards(root, "train", "zarr")
    zs.read_codes(0, 0)  # epoch 0's slot lies in the first chunk
    with pytest.raises(ShardError, match=rf"queries/c/0/{chunks - 1}: missing shard file"):
        zs.read_codes(0, len(zs.slots) - 1)


# ---------------------------------------------------------------- 2. determinism


def test_rebuild_is_byte_identical(built, burgers, codec, work):
    """The same config built twice: identical sample_set_id, tars, zarr chunk bytes and values;
    the second time with the writes in worker processes (as on CUDA) instead of threads."""
    args = build_args(burgers, work / "uniform-again", "write_in=processes", encoder=codec)
    assert_same_files(built, build_here(args))


def build_two_ranks(args: list[str]) -> list[str]:
    """Build with two concurrent rank processes of the CLI; their standard outputs."""
    procs = [
        start_tool(
            BUILD,
            *args,
            "--rank",
            str(r),
            "--world-size",
            "2",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (_, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr
    return [stdout for stdout, _ in outputs]


def test_two_ranks_match_one_rank(built, burgers, codec, tmp_path):
    """Two concurrent rank processes write the same files and manifest entries as one process."""
    out = tmp_path / "two-ranks"
    stdout = build_two_ranks(build_args(burgers, out, encoder=codec))
    assert "rank 1/2" in stdout[1] and "sample_set_id" in stdout[0]
    assert_same_files(built, out)


def test_two_ranks_share_the_norm_statistics_bit_for_bit(burgers, tmp_path):
    """A field-only set's normalisation comes from the train split's sums, which two ranks split
    between them (each sums half the trajectories, rank 0 adds them in order): the same norm,
    bit for bit, and so the same sample set and files as one process."""
    one = build_here(build_args(burgers, tmp_path / "one-rank", "format=zarr"))
    out = tmp_path / "two-ranks"
    build_two_ranks(build_args(burgers, out, "format=zarr"))
    share = json.loads((out / "parts" / "norm-1-of-2.json").read_text())
    assert share["trajectories"] == manifest_of(one)["splits"]["train"]["trajectories"][1::2]
    assert manifest_of(out)["data"]["norm"] == manifest_of(one)["data"]["norm"]
    assert_same_files(one, out)


# ---------------------------------------------------------------- 3. readable without our code


def test_zarr_store_readable_with_plain_zarr(built):
    """zarr.open_group sees the documented arrays, shapes, dtypes and chunking, and query sets
    that, decoded as docs/shard-format.md says, give the same indices as open_shards."""
    manifest = manifest_of(built)
    train = zarr.open_group(str(built / "zarr"), mode="r")["train"]
    s, n = manifest["splits"]["train"]["num_snapshots"], 64
    expected = {  # name: (shape, dtype), in RECORD order
        "snapshot_id": ((s,), "int64"),
        "trajectory": ((s,), "int64"),
        "time": ((s,), "int64"),
        "fields": ((s, 1, n), "float32"),
        "importance": ((s, n), "float32"),
        "queries": ((s, sum(slot["nbytes"] for slot in manifest["query_slots"])), "uint8"),
        "pi_scale": ((s, EPOCHS, 2), "int64"),
        "latent": ((s, 8, 16), "float32"),
    }
    assert list(expected) == list(RECORD)
    assert sorted(train.array_keys()) == sorted(RECORD)
    chunk = 4 * STEPS  # trajectories_per_shard x snapshots per trajectory
    for name, (shape, dtype) in expected.items():
        array = train[name]
        assert array.shape == shape and array.dtype == np.dtype(dtype), name
        assert array.chunks == (chunk, *shape[1:]), name
    fields = train["fields"][...]
    queries = train["queries"][...]
    ours = open_shards(built, "train", "zarr")
    for i in (0, 41, s - 1):
        np.testing.assert_array_equal(fields[i], ours.snapshot(i)["fields"])
        for epoch, k in enumerate(manifest["k_per_epoch"]):
            indices = documented_indices(queries[i], n, k, manifest["query_slots"][epoch])
            np.testing.assert_array_equal(indices, ours.query_set(i, epoch)[0])
    np.testing.assert_allclose(train["importance"][...].sum(1), 1.0, rtol=1e-5)


def test_tars_readable_with_webdataset_and_tarfile(built):
    """Plain tarfile + numpy.load and webdataset.WebDataset see the documented members, keys
    sorted with each trajectory's snapshots contiguous, and the same values as open_shards."""
    manifest = manifest_of(built)
    ours = open_shards(built, "train", "wds")
    shard = manifest["splits"]["train"]["shards"][1]
    tar_path = built / shard["tar"]
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        # one plain ustar header per member: fixed mtime and owner, no PAX extended headers
        assert all(
            m.mtime == 0 and m.uname == "ups" and m.isfile() and not m.pax_headers
            for m in tar.getmembers()
        )
        assert tar_path.stat().st_size < sum(512 + -(-m.size // 512) * 512 for m in tar) + 20480
        keys = [name.split(".", 1)[0] for name in names[:: len(MEMBERS)]]
        assert names == [f"{key}.{member}" for key in keys for member in MEMBERS]
        assert keys == sorted(keys) and len(keys) == shard["count"]
        assert keys[0] == f"{shard['trajectories'][0]:06d}_{0:06d}"
        for row, key in enumerate(keys):
            meta = json.load(tar.extractfile(f"{key}.meta.json"))
            assert key == f"{meta['trajectory']:06d}_{meta['time']:06d}"
            expected = ours.snapshot(shard["start"] + row)
            assert meta == {name: expected[name] for name in ("snapshot_id", "trajectory", "time")}
            for member in ("fields", "importance", "queries", "latent"):
                raw = tar.extractfile(f"{key}.{member}.npy").read()
                value = np.load(io.BytesIO(raw), allow_pickle=False)
                np.testing.assert_array_equal(value, expected[member])
    samples = list(wds.WebDataset(str(tar_path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == keys
    assert all(sorted(k for k in s if not k.startswith("__")) == list(MEMBERS) for s in samples)
    decoded = list(wds.WebDataset(str(tar_path), shardshuffle=False).decode())  # default handlers
    np.testing.assert_array_equal(
        decoded[3]["fields.npy"], ours.snapshot(shard["start"] + 3)["fields"]
    )


def test_the_stage_table_counts_the_gpu_stages_waiting_for_writers(burgers, tmp_path, monkeypatch):
    """With the writes in one thread of the build (where a patch reaches them), slowed by 0.3 s
    a shard, the GPU stages' thread waits for the writer before every shard after the first and
    for the last write: the summary's ``write wait`` says so; with the writes at their own pace
    it stays small."""
    import pipeline.write_pool as write_pool

    def build(out: str) -> dict:
        args = build_args(
            burgers, tmp_path / out, "write_workers=1", "write_in=threads", "format=zarr"
        )
        return run_build(load_config(BuildConfig, None, args))

    quick = build("quick")["seconds"]
    write = write_pool.write_shard

    def slow_write(job, block) -> float:
        time.sleep(0.3)
        return write(job, block) + 0.3

    monkeypatch.setattr(write_pool, "write_shard", slow_write)
    slow = build("slow")
    seconds, shards = slow["seconds"], slow["shards"]
    assert shards >= 3
    assert 0.2 * shards <= seconds["write wait"] <= seconds["total"]
    assert quick["write wait"] < 0.1 * shards
    for run in (quick, seconds):
        assert 0 <= run["read wait"] <= run["total"]


# ---------------------------------------------------------------- 4. crash safety


def descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (its children, theirs, ...), read from /proc."""
    children: dict[int, set[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a process that ended while being read
        children.setdefault(ppid, set()).add(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        below = children.get(todo.pop(), set()) - found
        found |= below
        todo.extend(below)
    return found


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an ended process nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("write_in", ["threads", "processes"])
def test_killed_build_resumes_to_identical_files(write_in, tmp_path):
    """SIGKILL a build after some shards finished; the rerun skips them and ends byte-identical to
    an uninterrupted build, with a manifest that verifies. With worker processes writing, none
    of them outlives the build: a writer left running would race the rerun."""
    data = generate(
        "burgers1d",
        tmp_path / "big.h5",
        trajectories=48,
        steps=STEPS,
        resolution=128,
        seed=1,
        progress=False,
    )
    codec = tiny_codec_checkpoint(data, tmp_path / "codec.pt")

    def args(out: Path) -> list[str]:
        return build_args(
            data, out, "trajectories_per_shard=1", f"write_in={write_in}", encoder=codec
        )

    reference = build_here(args(tmp_path / "uninterrupted"))
    out = tmp_path / "killed"
    proc = start_tool(BUILD, *args(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list((out / "parts").glob("*-*.json")):  # a shard's record (not metadata.json)
        assert proc.poll() is None, "the build ended before any shard finished"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    workers = descendants(proc.pid)  # the forkserver and the writers, with processes
    if write_in == "processes":
        assert workers
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in workers):
        assert time.monotonic() < deadline, f"outlived the build: {sorted(workers)}"
        time.sleep(0.05)
    assert not (out / "manifest.json").exists()
    finished = len(list((out / "parts").glob("*-*.json")))
    last = len(manifest_of(reference)["splits"]["train"]["shards"]) - 1
    assert finished <= last, "killed too late to test a resume"
    # what a kill during the writes of the unfinished last train shard leaves (the kill above may
    # or may not have hit a write): the tar writer's and zarr's temporary files
    (out / f"wds/.train-{last:06d}.tar.tmp-99999-0").write_bytes(b"partial tar")
    (out / f"zarr/train/fields/c/{last}/0").mkdir(parents=True, exist_ok=True)
    (out / f"zarr/train/fields/c/{last}/0/0.0123abcd.partial").write_bytes(b"partial chunk")

    rerun = run_tool(BUILD, *args(out))
    assert rerun.returncode == 0, rerun.stderr
    assert re.search(rf"\({finished} already done\)", rerun.stdout), rerun.stdout
    assert_same_files(reference, out)
    assert open_shards(out).verify() == []
    expected = {
        *manifest_of(out)["files"],
        "manifest.json",
        "build.json",
        ".lock",
        ".lock-rank0",
    }
    expected |= {p.relative_to(out).as_posix() for p in (out / "parts").glob("*.json")}
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == expected


def test_corrupt_files_are_reported_by_name(built, tmp_path):
    """A truncated tar, an edited zarr chunk and a deleted zarr chunk: the reader and
    inspect_shards name each file; untouched shards still read."""
    root = tmp_path / "corrupt"
    shutil.copytree(built, root)
    tar = root / "wds/train-000000.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    edited = root / "zarr/train/fields/c/1/0/0"
    data = bytearray(edited.read_bytes())
    data[len(data) // 2] ^= 0xFF
    edited.write_bytes(bytes(data))
    deleted = root / "zarr/train/importance/c/2/0"
    deleted.unlink()

    with pytest.raises(ShardError, match=r"wds/train-000000\.tar: 5000 bytes.*truncated"):
        open_shards(root, "train", "wds").read_shard(0)
    open_shards(root, "train", "wds").read_shard(1)  # an intact tar reads
    zs = open_shards(root, "train", "zarr")
    zs.read_shard(0)  # chunk 0 of every array is intact
    with pytest.raises(ShardError, match=r"zarr/train/fields/c/1/0/0: checksum mismatch"):
        zs.snapshot(45)
    with pytest.raises(ShardError, match=r"zarr/train/importance/c/2/0: missing"):
        zs.snapshot(len(zs) - 1)

    result = run_tool(INSPECT, root)
    assert result.returncode == 1
    bad = [line for line in result.stderr.splitlines() if line.startswith("BAD")]
    assert len(bad) == 3, result.stderr
    for name in (
        "wds/train-000000.tar",
        "zarr/train/fields/c/1/0/0",
        "zarr/train/importance/c/2/0",
    ):
        assert any(str(root / name) in line for line in bad), name


# ---------------------------------------------------------------- 5. bad input


@pytest.fixture(scope="module")
def wrong_grid_codec(work: Path, burgers: Path) -> Path:
    """A codec built for grid 128; the data has grid 64."""
    return tiny_codec_checkpoint(burgers, work / "codec-grid128.pt", grid=(128,))


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("encoder-grid", ["codec-grid128.pt", "grid", "[128] != [64]"]),
        ("sampler-kind", ["sampler.kind", "'bogus'"]),
        ("epochs-zero", ["'epochs'", "got 0"]),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    case, named, burgers, codec, wrong_grid_codec, tmp_path
):
    """One 'error: ...' line naming the option or file, exit 2, no output directory."""
    out = tmp_path / "out"
    extra = {
        "encoder-grid": [f"encoder={wrong_grid_codec}"],
        "sampler-kind": [f"encoder={codec}", "sampler.kind=bogus"],
        "epochs-zero": [f"encoder={codec}", "epochs=0"],
    }[case]
    result = run_tool(BUILD, *build_args(burgers, out), *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in named:
        assert word in lines[0]
    assert not out.exists()


def test_unguarded_script_gets_a_clear_error_from_write_processes(burgers, tmp_path):
    """Write workers import the script that started the build (as any spawned pool does): a
    script that builds at import time gets one error saying so and what to do, not a hang or a
    bare BrokenProcessPool; under the guard the same build works."""
    call = (
        "run_build(load_config(BuildConfig, None, "
        f"{build_args(burgers, tmp_path / 'out', 'write_in=processes', 'format=zarr')!r}))"
    )
    head = "from pipeline.build import BuildConfig, run_build\n"
    head += "from pipeline.config import load_config\n"
    unguarded, guarded = tmp_path / "unguarded.py", tmp_path / "guarded.py"
    unguarded.write_text(head + call + "\n")
    guarded.write_text(head + "if __name__ == '__main__':\n    " + call + "\n")
    result = subprocess.run(
        [sys.executable, str(unguarded)], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "if __name__ == '__main__':" in result.stderr and "write_in=threads" in result.stderr
    result = subprocess.run(
        [sys.executable, str(guarded)], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "manifest.json").exists()


def test_other_sample_set_refused_unless_overwrite(built, burgers, codec, tmp_path):
    """A directory holding another sample set is left untouched; --overwrite true replaces it."""
    out = tmp_path / "existing"
    shutil.copytree(built, out)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    args = build_args(burgers, out, "seed=1", encoder=codec)
    refused = run_tool(BUILD, *args)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out} holds shards of sample_set_id"), (
        refused.stderr
    )
    assert "--overwrite true" in lines[0]
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before

    replaced = run_tool(BUILD, *args, "--overwrite", "true")
    assert replaced.returncode == 0, replaced.stderr
    manifest = manifest_of(out)
    assert manifest["sample_set_id"] != manifest_of(built)["sample_set_id"]
    assert manifest["config"]["seed"] == 1
    assert open_shards(out).verify() == []
    listed = set(manifest["files"]) | {"manifest.json", "build.json"}
    stray = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert {p.relative_to(out).as_posix() for p in stray if p.parent.name != "parts"} == listed


def test_manifest_of_other_schema_version_is_refused(built, tmp_path):
    root = tmp_path / "future"
    root.mkdir()
    manifest = manifest_of(built)
    manifest["schema_version"] = 4
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ShardError, match=r"manifest\.json: schema_version 4, this reader understands version 3"
    ):
        open_shards(root)


def test_epochs_beyond_the_precomputed_sets_need_wrap(built):
    shards = open_shards(built)
    with pytest.raises(ShardError, match=rf"epoch {EPOCHS} is beyond the {EPOCHS} precomputed"):
        shards.query_set(0, EPOCHS)
    for offset in range(EPOCHS):
        wrapped, again = (
            shards.query_set(3, EPOCHS + offset, wrap=True),
            shards.query_set(3, offset),
        )
        np.testing.assert_array_equal(wrapped[0], again[0])
    assert not np.array_equal(shards.query_set(3, 0)[0], shards.query_set(3, 1)[0])


# ---------------------------------------------------------------- 6. URLs


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_http_and_file_urls_read_the_same_records(fmt, built, http_url):
    """open_shards over http:// and file:// returns the local path's snapshots and query sets."""
    local = open_shards(built, "train", fmt)
    for remote in (
        open_shards(http_url, "train", fmt),
        open_shards(f"file://{built}", "train", fmt),
    ):
        assert remote.sample_set_id == local.sample_set_id and len(remote) == len(local)
        for i in range(len(local)):
            a, b = local.snapshot(i), remote.snapshot(i)
            assert sorted(a) == sorted(b)
            for name in a:
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
            for epoch in range(EPOCHS):
                for x, y in zip(local.query_set(i, epoch), remote.query_set(i, epoch), strict=True):
                    np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- 7. inspect_shards


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000  # axes, a line or image and markers, not an empty canvas


def test_inspect_summarises_and_plots_1d(built_gradient, tmp_path):
    manifest = manifest_of(built_gradient)
    png = tmp_path / "plot1d.png"
    result = run_tool(
        INSPECT,
        built_gradient,
        "--split",
        "val",
        "--plot",
        png,
        "--snapshot",
        "4",
        "--epochs",
        "0,1,3",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert manifest["sample_set_id"] in out
    assert f"k_e {manifest['k_per_epoch']}" in out
    assert "verify         OK" in out and "entropy bound" in out
    for split, entry in manifest["splits"].items():
        assert f"split {split:<8} {len(entry['trajectories'])} trajectories" in out
    _assert_png(png)


def test_inspect_plots_2d(ns_file, tmp_path):
    """A 2D (32x32) field-only gradient-sampled set: summary and an imshow + scatter plot."""
    root = tmp_path / "ns"
    args = [
        f"data.path={ns_file}",
        f"out={root}",
        "epochs=3",
        "sampler.kind=gradient",
        "sampler.alpha=0.3",
        "schedule.start_ratio=0.2",
        "progress=false",
    ]
    built = run_tool(BUILD, *args)
    assert built.returncode == 0, built.stderr
    png = tmp_path / "plot2d.png"
    result = run_tool(INSPECT, root, "--plot", png)
    assert result.returncode == 0, result.stderr
    assert manifest_of(root)["sample_set_id"] in result.stdout
    assert "32x32 (2D, N=1024)" in result.stdout and "field-only" in result.stdout
    _assert_png(png)


# ---------------------------------------------------------------- shipped configs


@pytest.mark.parametrize(
    ("name", "points"), [("burgers1d_shards.yaml", 256), ("ns2d_shards.yaml", 128 * 128)]
)
def test_shipped_configs_parse(name, points):
    """The example build configs load, use the gradient sampler and give a valid k_e schedule."""
    cfg = load_config(BuildConfig, ROOT / "configs" / name)
    assert cfg.sampler.kind == "gradient" and cfg.sampler.alpha == 0.3
    ks = k_per_epoch(cfg.schedule, cfg.epochs, points)
    assert len(ks) == cfg.epochs and all(0 < k < points for k in ks) and ks[0] > ks[-1]
