"""The streaming loader on real shard sets: pairs, query gathering, order, resume, ranks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ENV, ROOT, groups_of_shards, record_preparations, tiny_codec_checkpoint

from pipeline.build import BuildConfig, run_build
from pipeline.config import ConfigError
from pipeline.grid import grid_coordinates
from pipeline.loader import BatchSpec, LoaderConfig, ShardLoader
from pipeline.records import ShardError
from pipeline.samplers import SamplerConfig
from pipeline.schedules import ScheduleConfig
from pipeline.shards import ShardSet, gather_queries, open_shards
from pipeline.sources.generate import generate
from pipeline.sources.splits import DataConfig
from ups.models.codec import load_encoder

# real shard sets streamed by real loader processes: the fast lane (pytest -m "not slow") leaves them out
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    data = generate(
        "burgers1d", root / "b.h5", trajectories=14, steps=10, resolution=64, seed=3, progress=False
    )
    codec = tiny_codec_checkpoint(data, root / "codec.pt")
    cfg = BuildConfig(
        data=DataConfig(path=str(data), val_fraction=0.1, test_fraction=0.1),
        out=str(root / "shards"),
        encoder=str(codec),
        epochs=3,
        sampler=SamplerConfig(kind="gradient"),
        # k grows over the epochs (16, 24, 32 of 64 points): a loader process grows its slots
        schedule=ScheduleConfig(kind="linear", start_ratio=0.25, end_ratio=0.5, multiple=8),
        trajectories_per_shard=2,
        progress=False,
    )
    run_build(cfg, load_encoder=load_encoder)
    return Path(cfg.out)


def make_loader(
    location,
    batch_size=8,
    window=1,
    workers=0,
    fmt="auto",
    rank=0,
    world=1,
    wrap=False,
    split="train",
    cache_mb=2048,
    process=True,
    device=None,
    partitions=2,
    read_ahead=2,
):
    shards = open_shards(str(location), split, fmt)
    cfg = LoaderConfig(
        partitions=partitions,
        read_ahead=read_ahead,
        workers=workers,
        format=fmt,
        wrap_epochs=wrap,
        shuffle_shards=2,
        cache_mb=cache_mb,
        process=process,
    )
    sparse = (0, 1) if window else (0,)
    return ShardLoader(
        shards,
        cfg,
        batch_size=batch_size,
        spec=BatchSpec(window=window, sparse_steps=sparse, latents=True),
        rank=rank,
        world_size=world,
        device=device,
    )


def run_epochs(loader, epochs):
    out = []
    for _ in range(epochs):
        out += [
            (b.epoch, b.snapshot_id.tolist(), b.coords.numpy().copy(), b.coords_next.numpy().copy())
            for b in loader
        ]
    loader.close()
    return out


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x[0] == y[0] and x[1] == y[1]
        np.testing.assert_array_equal(x[2], y[2])
        np.testing.assert_array_equal(x[3], y[3])


def by_snapshot_id(shards):
    return {shards.snapshot(i)["snapshot_id"]: i for i in range(len(shards))}


def test_pairs_latents_and_queries_come_from_the_shards(latent_shards):
    shards = open_shards(str(latent_shards))
    index = by_snapshot_id(shards)
    coords = grid_coordinates(shards.grid)
    mean = np.asarray(shards.manifest.data.norm.mean, dtype=np.float32)
    std = np.asarray(shards.manifest.data.norm.std, dtype=np.float32)
    loader = make_loader(latent_shards, workers=2)
    batches = list(loader)  # a whole epoch: several shard groups, batches across their boundaries
    loader.close()
    assert len(batches) == loader.batches_per_epoch > 2
    seen = [sid for batch in batches for sid in batch.snapshot_id.tolist()]
    assert len(set(seen)) == len(seen)
    for batch in batches:
        assert batch.epoch == 0 and batch.z.shape == (8, 8, 16)
        assert batch.z_next.shape == (8, 1, 8, 16)
        check_batch_against_shards(batch, shards, index, coords, mean, std)


def check_batch_against_shards(batch, shards, index, coords, mean, std):
    for b, sid in enumerate(batch.snapshot_id.tolist()):
        now, nxt = shards.snapshot(index[sid]), shards.snapshot(index[sid + 1])
        assert nxt["trajectory"] == now["trajectory"] and nxt["time"] == now["time"] + 1
        np.testing.assert_array_equal(batch.z[b].numpy(), now["latent"])
        np.testing.assert_array_equal(batch.z_next[b, 0].numpy(), nxt["latent"])
        for step, snap, pos in ((0, now, index[sid]), (1, nxt, index[sid + 1])):
            idx, w = shards.query_set(pos, epoch=0)
            suffix = "" if step == 0 else "_next"
            np.testing.assert_array_equal(getattr(batch, f"coords{suffix}")[b].numpy(), coords[idx])
            np.testing.assert_array_equal(getattr(batch, f"weights{suffix}")[b].numpy(), w)
            expected = (snap["fields"].reshape(1, -1)[:, idx].T - mean) / std
            np.testing.assert_allclose(
                getattr(batch, f"targets{suffix}")[b].numpy(), expected, rtol=1e-6
            )


def test_every_pair_once_per_epoch_and_epochs_differ(latent_shards):
    loader = make_loader(latent_shards, batch_size=1, partitions=1)
    epochs = run_epochs(loader, 2)
    shards = open_shards(str(latent_shards))
    steps = shards.steps
    expected = sorted(
        i for i in by_snapshot_id(shards) if i % steps != steps - 1
    )  # every u_t with a u_{t+1}
    for epoch in (0, 1):
        ids = [sid for e, ids, *_ in epochs if e == epoch for sid in ids]
        assert sorted(ids) == expected
    first = [ids for e, ids, *_ in epochs if e == 0]
    second = [ids for e, ids, *_ in epochs if e == 1]
    assert first != second, "each epoch has its own order"


def test_resume_mid_epoch_is_exact_and_independent_of_workers_format_and_process(latent_shards):
    full = make_loader(latent_shards, workers=2)
    reference, state = [], None
    for epoch in range(3):
        for i, b in enumerate(full):
            reference.append(
                (
                    b.epoch,
                    b.snapshot_id.tolist(),
                    b.coords.numpy().copy(),
                    b.coords_next.numpy().copy(),
                )
            )
            if epoch == 1 and i == 2:
                state, cut = full.state_dict(), len(reference)
    full.close()
    resumed = make_loader(latent_shards, workers=0, fmt="wds", process=False)
    resumed.load_state_dict(state)
    same_batches(reference[cut:], run_epochs(resumed, 2))


@pytest.mark.parametrize(("world", "partitions"), [(2, 2), (2, 4), (3, 6)])
def test_global_batches_do_not_depend_on_the_world_size(latent_shards, world, partitions):
    """Each rank's batch is its share of the one-rank run's batch, in rank order; ranks are
    disjoint, see equal counts, and each reads only the shards of its neighbouring partitions."""
    batch = 2 * partitions

    def epochs(rank, world):
        loader = make_loader(
            latent_shards, batch_size=batch, rank=rank, world=world, partitions=partitions
        )
        return run_epochs(loader, 2)

    single = epochs(0, 1)
    ranks = [epochs(r, world) for r in range(world)]
    assert {len(r) for r in ranks} == {len(single)}, "every rank takes part in every step"
    for step, reference in enumerate(single):
        shares = [r[step] for r in ranks]
        assert [sid for share in shares for sid in share[1]] == reference[1]
        np.testing.assert_array_equal(np.concatenate([s[2] for s in shares]), reference[2])
        assert {len(share[1]) for share in shares} == {batch // world}
    shards = open_shards(str(latent_shards))
    ends = np.cumsum([s.count for s in shards.shards])  # snapshot index -> its shard
    index = by_snapshot_id(shards)
    for epoch in (0, 1):
        read = [
            {
                int(np.searchsorted(ends, index[sid], side="right"))
                for e, ids, *_ in r
                if e == epoch
                for sid in ids
            }
            for r in ranks
        ]
        for shards_of_rank in read:  # a contiguous run of the epoch's shard order, one shared
            assert len(shards_of_rank) <= -(-len(shards.shards) // world) + 1


def test_partitions_divide_the_batch_and_the_world_size_divides_them(latent_shards):
    with pytest.raises(
        ConfigError, match=r"option 'loader.partitions'.*multiple of the world size 3"
    ):
        make_loader(latent_shards, world=3, partitions=4)
    with pytest.raises(ConfigError, match=r"option 'batch_size'.*multiple of loader.partitions=4"):
        make_loader(latent_shards, batch_size=6, partitions=4)


def test_epochs_beyond_the_query_sets_need_wrap(latent_shards):
    loader = make_loader(latent_shards)
    loader.load_state_dict(
        {"epoch": 3, "batches": 0, "batches_per_epoch": loader.batches_per_epoch}
    )
    with pytest.raises(
        ShardError, match=r"epoch 3 is beyond the 3 precomputed query sets.*wrap_epochs=true"
    ):
        next(iter(loader))
    shards = open_shards(str(latent_shards))
    index = by_snapshot_id(shards)
    wrapped = make_loader(latent_shards, wrap=True)
    wrapped.load_state_dict(
        {"epoch": 3, "batches": 0, "batches_per_epoch": wrapped.batches_per_epoch}
    )
    batch = next(iter(wrapped))
    wrapped.close()
    assert batch.epoch == 3
    idx, _ = shards.query_set(index[batch.snapshot_id[0].item()], epoch=0)
    np.testing.assert_array_equal(batch.coords[0].numpy(), grid_coordinates(shards.grid)[idx])


def test_batch_larger_than_the_partitions(latent_shards):
    with pytest.raises(
        ShardError,
        match=r"batch_size 1000 takes 500 examples from each of loader.partitions=2 partitions, "
        r"which hold \d+ examples each",
    ):
        make_loader(latent_shards, batch_size=1000)


def test_windows_longer_than_the_trajectories(latent_shards):
    assert (
        make_loader(latent_shards, batch_size=2, window=9).batches_per_epoch >= 1
    )  # one window per trajectory
    with pytest.raises(
        ShardError, match="windows of 11 snapshots need trajectories of at least 11; these have 10"
    ):
        make_loader(latent_shards, window=10)


def test_shard_cache_reads_each_shard_once_and_changes_no_batch(latent_shards, monkeypatch):
    """With the cache, a zarr shard's block (without its query sets) is read once, and each
    epoch reads only that epoch's coded sets of each shard."""
    reads, code_reads = [], []
    read_block, read_codes = ShardSet.read_block, ShardSet.read_codes

    def counting(self, index):
        reads.append(index)
        return read_block(self, index)

    def counting_codes(self, index, stored):
        code_reads.append((index, stored))
        return read_codes(self, index, stored)

    monkeypatch.setattr(ShardSet, "read_block", counting)  # counts reads in this process
    monkeypatch.setattr(ShardSet, "read_codes", counting_codes)
    cached = run_epochs(make_loader(latent_shards, process=False), 3)
    shards = len(open_shards(str(latent_shards)).shards)
    assert sorted(reads) == list(range(shards)), "a split that fits the cache is read once"
    assert sorted(code_reads) == sorted((i, e) for i in range(shards) for e in range(3))
    reads.clear()
    # (a read still in flight is shared: no read-ahead here, so none spans two epochs)
    uncached = run_epochs(make_loader(latent_shards, cache_mb=0, read_ahead=0, process=False), 3)
    assert len(reads) > shards, "without the cache, later epochs read again"
    same_batches(cached, uncached)


def test_every_shard_is_prepared_once_per_epoch(latent_shards, monkeypatch):
    """A group's query sets are gathered and its arrays prepared once: reading ahead for one
    partition does not prepare again the group another partition streams."""
    prepared = record_preparations(monkeypatch)
    loader = make_loader(latent_shards, process=False, partitions=2)
    run_epochs(loader, 3)
    once = Counter((shard, epoch) for shard, epoch, _ in prepared)
    assert once == groups_of_shards(loader.graph.source, range(3))


def test_corrupt_shard_mid_run_is_named(latent_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(latent_shards, copy)
    tar = sorted((copy / "wds").glob("train-*.tar"))[-1]
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    loader = make_loader(copy, fmt="wds")
    with pytest.raises(ShardError, match=rf"{tar.name}: checksum mismatch"):
        run_epochs(loader, 1)


def test_loader_process_death_is_reported_and_close_stops_it(latent_shards):
    loader = make_loader(latent_shards, workers=2)
    batches = iter(loader)
    next(batches)
    child = loader._process._process
    assert child.is_alive()
    child.kill()
    with pytest.raises(RuntimeError, match="the loader process ended"):
        for _ in range(loader.cfg.prefetch + 1):  # the slots already filled still arrive
            next(batches)
    loader.close()
    resumed = make_loader(latent_shards, workers=2)
    next(iter(resumed))
    child = resumed._process._process
    resumed.close()
    assert not child.is_alive() and resumed._process is None


# a training process whose loader process waits for the layer of a refresh it never finishes
KILLED_DURING_REFRESH = """
import sys, time
from pipeline.loader import BatchSpec, LoaderConfig, ShardLoader
from pipeline.shards import open_shards

location, awaited = sys.argv[1], int(sys.argv[2])
shards = open_shards(location)
shards.await_layers([awaited])  # as a run with adaptive.refresh_every does
spec = BatchSpec(window=1, sparse_steps=(0, 1), latents=True)
loader = ShardLoader(shards, LoaderConfig(workers=1), batch_size=8, spec=spec)
if awaited:
    for _ in loader:  # epoch 0; the loader process runs on into epoch 1, which waits
        pass
else:
    loader.batches_from(0, 0)  # its first epoch waits
print(loader._process._process.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize(
    ("awaited", "delay"),
    [(1, 1.0), (0, 5.0), (0, 0.0)],
    ids=["waiting-mid-run", "waiting-at-start", "starting"],
)
def test_loader_process_of_a_run_killed_during_a_refresh_exits_quietly(
    latent_shards, awaited, delay
):
    """The training process SIGKILLed while its loader process waits for a layer (a refresh
    that is then never finished), or while that process still starts: it exits within seconds,
    printing nothing, rather than live on for ever as an orphan holding shared memory."""
    run = subprocess.Popen(
        [sys.executable, "-c", KILLED_DURING_REFRESH, str(latent_shards), str(awaited)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
    )  # fmt: skip
    child = None
    try:
        child = int(run.stdout.readline())
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
        run.wait()
        # the loader process holds the same stdout and stderr: they end when it has exited
        try:
            _, stderr = run.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("the loader process of a killed training process still runs after 20 s")
        for noise in ("Traceback", "leaked", "ConnectionResetError", "BrokenPipeError"):
            assert noise not in stderr, stderr
    finally:
        run.kill()
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        run.communicate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_process_delivers_the_same_batches_on_the_gpu(latent_shards):
    """Pinned slots, one transfer per batch, slots given back on CUDA events, slots that grow."""
    batches = {}
    for process in (True, False):
        loader = make_loader(latent_shards, workers=2, process=process, device="cuda")
        batches[process] = []
        for _ in range(3):
            for b in loader:
                assert b.coords.device.type == "cuda"
                batches[process].append(
                    (b.epoch, b.snapshot_id.tolist(), b.coords.cpu().numpy(), b.z.cpu().numpy())
                )
        loader.close()
    same_batches(batches[True], batches[False])


def timed_epochs(loader, epochs, after_batch=lambda: None) -> tuple[int, float]:
    """Batches taken over ``epochs`` epochs, and the seconds spent waiting for them."""
    count, waited = 0, 0.0
    for _ in range(epochs):
        batches = iter(loader)
        while True:
            asked = time.perf_counter()
            if next(batches, None) is None:
                break
            waited += time.perf_counter() - asked
            count += 1
            after_batch()
    return count, waited


def test_loader_counts_every_wait_as_a_stall_on_the_cpu(latent_shards):
    """The CPU's step is synchronous: every second spent waiting for a batch is a second the
    device had no work, counted on across a close and restart."""
    for process in (True, False):
        loader = make_loader(latent_shards, workers=1, process=process)
        count, waited = timed_epochs(loader, 1)
        assert count == loader.batches_per_epoch
        assert 0 < loader.stall_seconds <= waited
        before = loader.stall_seconds
        loader.close()  # the next epoch starts a new stream: the count goes on
        _, waited_more = timed_epochs(loader, 1)
        loader.close()
        assert before < loader.stall_seconds <= waited + waited_more


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_counts_only_the_waits_that_leave_the_gpu_idle(latent_shards):
    """A wait for a batch while the GPU is still busy with earlier work (a long kernel queued
    after each batch) costs the GPU only the batch's copy: no stall. A consumer that
    synchronises after each batch leaves the GPU idle through every wait: all of it stalls."""
    loader = make_loader(latent_shards, batch_size=4, workers=2, process=True, device="cuda")
    next(iter(loader))  # the loader's start, with nothing queued on the GPU: a stall
    torch.cuda.synchronize()
    started = loader.stall_seconds
    # the rest of epoch 0, then epoch 1, each batch followed by ~30 ms of GPU work
    count, waited = timed_epochs(loader, 2, lambda: torch.cuda._sleep(50_000_000))
    torch.cuda.synchronize()
    busy = loader.stall_seconds - started
    loader.close()
    assert count > 2 * loader.cfg.prefetch
    # the training thread waited for the ring's slots (the GPU behind), the GPU did not wait
    assert busy < 0.1 * waited, (busy, waited, count)
    synced = make_loader(latent_shards, batch_size=4, workers=2, process=True, device="cuda")
    _, waited = timed_epochs(synced, 2, torch.cuda.synchronize)
    torch.cuda.synchronize()
    idle = synced.stall_seconds
    synced.close()
    assert 0.5 * waited <= idle <= waited + 0.01 * count, (idle, waited, count)


def test_gathered_targets_are_normalised_float32(latent_shards):
    loader = make_loader(latent_shards, workers=1)
    batch = next(iter(loader))
    loader.close()
    assert batch.targets.dtype == torch.float32 and batch.weights.dtype == torch.float32
    assert batch.coords.min() >= 0 and batch.coords.max() <= 1


@pytest.mark.parametrize("moves", [1, 2])
def test_query_sets_with_a_wrong_count_are_refused(latent_shards, moves):
    """A set bit moved from one snapshot's coded set to another's keeps the block total but not
    the rows (the part of the code that holds one bit per point: the bitmask, or Elias-Fano's
    high parts)."""
    shards = open_shards(str(latent_shards))
    block = shards.read_shard(0, cache=False)
    k, slot = shards.k_per_epoch[0], shards.slots[0]
    codes = block.queries[:, slot.rows]
    assert gather_queries(block, codes, slot, k, shards.beta).indices.shape == (len(block), k)
    held = shards.manifest.num_points - k if slot.complement else k
    first = held * slot.low_bits  # where the one-bit-per-point part starts
    bits = [np.unpackbits(block.queries[row, slot.rows]) for row in (0, 1)]
    ones = np.flatnonzero(bits[0][first:])[:moves] + first
    zeros = np.flatnonzero(bits[1][first:] == 0)[:moves] + first
    bits[0][ones], bits[1][zeros] = 0, 1  # snapshot 0 loses ``moves`` points, snapshot 1 gains them
    block.queries = block.queries.copy()
    for row, row_bits in enumerate(bits):
        block.queries[row, slot.rows] = np.packbits(row_bits)
    with pytest.raises(ShardError, match=r"shard 0: .* hold \["):
        gather_queries(block, block.queries[:, slot.rows], slot, k, shards.beta, "shard 0")
