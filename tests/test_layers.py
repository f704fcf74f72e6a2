"""Layers of error-based adaptive query sets: unbiased for their q, deterministic, never half
visible, refused where they do not belong, and streamed by training runs that refresh them."""

from __future__ import annotations

import hashlib
import json
import math
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
from helpers import ENV, ROOT, groups_of_shards, record_preparations, run_tool
from test_train import SMALL_MODEL, build, config, free_port, read_jsonl, run_train_cli

from pipeline.config import ConfigError, from_dict
from pipeline.layers import LAYERS, LayerRequest, LayerWriter
from pipeline.loader import LoaderConfig, ShardLoader
from pipeline.records import ShardError, SnapshotFields
from pipeline.samplers import ErrorImportance
from pipeline.shards import open_shards
from pipeline.sources.generate import generate
from ups.adaptive import PointError, error_definition, model_entry
from ups.models.checkpoint import load_checkpoint
from ups.training.train import TrainConfig, Trainer, batch_spec, build_models, train

pytestmark = pytest.mark.slow

REFRESH = ROOT / "tools" / "refresh_queries.py"
EPOCHS = 40  # query sets of the base set; the unbiasedness test refreshes all of them


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Burgers data -> field shards (zarr and tars) -> a codec trained 2 epochs -> latent shards
    -> an operator trained 1 epoch."""
    root = tmp_path_factory.mktemp("layers")
    data = generate(
        "burgers1d", root / "b.h5", trajectories=15, steps=12, resolution=64, seed=3, progress=False
    )
    fields = build(data, root / "fields", epochs=EPOCHS)
    train(
        config(
            "stage=codec", f"shards={fields}", f"out={root / 'codec'}", "epochs=2", "batch_size=8"
        )
    )
    codec = root / "codec" / "codec.pt"
    latents = build(data, root / "latents", encoder=codec, epochs=4, kind="gradient")
    train(
        config(
            "stage=operator",
            f"shards={latents}",
            f"codec_checkpoint={codec}",
            f"out={root / 'operator'}",
            "epochs=1",
            "batch_size=8",
        )
    )
    return {"root": root, "data": data, "fields": fields, "codec": codec, "latents": latents}


def refresh_cli(shards: Path, checkpoint: Path, epochs: str, *extra: str):
    return run_tool(
        REFRESH, shards, "--checkpoint", checkpoint, "--epochs", epochs, "device=cpu",
        "progress=false", *extra, timeout=300,
    )  # fmt: skip


def layer_id_of(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[1]


def tree_digest(root: Path, skip: str | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` (except those under the top-level ``skip``)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (skip is None or p.relative_to(root).parts[0] != skip)
    }


def copy_set(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(LAYERS))
    return dst


def test_refresh_leaves_the_base_untouched_and_writes_the_same_bytes_twice(flow, tmp_path):
    fields = copy_set(flow["fields"], tmp_path / "a")
    other = copy_set(flow["fields"], tmp_path / "b")
    before = tree_digest(fields)
    identity = open_shards(str(fields)).manifest_id
    ckpt = flow["root"] / "codec" / "checkpoint.pt"
    first = layer_id_of(refresh_cli(fields, ckpt, "2:6"))
    assert tree_digest(fields, skip=LAYERS) == before, "the base set's files changed"
    assert open_shards(str(fields)).manifest_id == identity
    again = layer_id_of(refresh_cli(fields, ckpt, "2:6"))
    elsewhere = layer_id_of(refresh_cli(other, ckpt, "2:6"))
    assert first == again == elsewhere
    layer = fields / LAYERS / first
    assert tree_digest(layer) == tree_digest(other / LAYERS / first)
    assert sorted(p.name for p in (fields / LAYERS).iterdir()) == [first], "no partial left"
    record = json.loads((layer / "layer.json").read_text())
    assert record["parent"] is None and record["epochs"] == [2, 6]
    assert record["model"]["stage"] == "codec"
    assert record["model"]["step"] == load_checkpoint(ckpt, "train")["step"]
    assert record["base"] == identity
    assert {name.split("/")[0] for name in record["files"]} == {"zarr", "wds"}
    # another layer on top chains to it; the effective set of an epoch is the newest covering it
    second = layer_id_of(refresh_cli(fields, ckpt, "4:8", "adaptive.power=1.0"))
    shards = open_shards(str(fields))
    assert shards.layer_ids == [first, second]
    assert [shards.layer_of(e) and shards.layer_of(e).record.id for e in (1, 2, 4, 7, 8)] == [
        None, first, second, second, None,
    ]  # fmt: skip
    base = open_shards(str(fields), layer=None)
    for epoch in (1, 8):
        assert np.array_equal(shards.query_set(5, epoch)[0], base.query_set(5, epoch)[0])
    assert not np.array_equal(shards.query_set(5, 2)[0], base.query_set(5, 2)[0])
    assert shards.verify() == []


def test_layer_sets_are_unbiased_for_their_stored_q(flow, tmp_path):
    """Pooled z-test over every train snapshot and all 40 epochs: the weighted estimate of the
    dense mean of two fixed per-point losses (the stored error itself, and u^2) from the layer's
    sets; and q is the documented function of the stored error."""
    fields = copy_set(flow["fields"], tmp_path / "set")
    ckpt = flow["root"] / "codec" / "checkpoint.pt"
    layer_id = layer_id_of(refresh_cli(fields, ckpt, f"0:{EPOCHS}", "format=wds"))
    shards = open_shards(str(fields), format="zarr")
    layer = shards.layers[0]
    assert layer.record.id == layer_id and all(layer.record.covers(e) for e in range(EPOCHS))
    n = shards.manifest.num_points
    deviations = {"error": [], "u2": []}
    for index in range(len(shards.shards)):
        block, sets = shards.read_shard(index), shards.read_layer(layer, index)
        err = sets.error.astype(np.float64)  # (S, N)
        focus = err**0.5 / (err**0.5).sum(1, keepdims=True)
        expected_q = 0.3 / n + 0.7 * focus
        np.testing.assert_allclose(sets.importance, expected_q, rtol=1e-5, atol=1e-9)
        losses = {"error": err, "u2": block.fields.reshape(len(block), -1).astype(np.float64) ** 2}
        for epoch in range(EPOCHS):
            queries = shards.epoch_queries(block, index, epoch, False, sets)
            for name, loss in losses.items():
                at = np.take_along_axis(loss, queries.indices, axis=1)
                estimate = (queries.weights * at).mean(1)  # (S,)
                deviations[name].append((estimate - loss.mean(1)) / loss.mean(1))
    for name, values in deviations.items():
        d = np.concatenate(values)
        z = d.mean() / (d.std() / math.sqrt(d.size))
        print(f"{name}: {d.size} estimates, mean relative deviation {d.mean():+.2e}, z = {z:+.2f}")
        assert abs(z) < 4, f"{name}: the layer's weighted estimates are biased (z = {z:.1f})"
        assert d.std() > 0, "the estimates must vary: the sets are sparse"


def test_a_refresh_reads_no_query_sets(flow, tmp_path):
    """read_fields gives read_shard's ids, fields and latent in both formats. It reads no query
    sets: with a zarr chunk of them edited, read_shard refuses the shard while read_fields and a
    whole refresh (tools/refresh_queries.py, format=zarr) go on, to the layer a clean set gets."""
    for fmt in ("zarr", "wds"):
        shards = open_shards(str(flow["latents"]), "train", fmt)
        for index in range(len(shards.shards)):
            full, part = shards.read_shard(index, cache=False), shards.read_fields(index)
            assert type(part) is SnapshotFields and part.latent is not None
            for name in SnapshotFields.names():
                np.testing.assert_array_equal(getattr(part, name), getattr(full, name))
    ckpt = flow["root"] / "codec" / "checkpoint.pt"
    clean = copy_set(flow["fields"], tmp_path / "clean")
    expected = layer_id_of(refresh_cli(clean, ckpt, "1:3", "format=zarr"))
    edited = copy_set(flow["fields"], tmp_path / "edited")
    chunk = edited / "zarr/train/queries/c/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    shards = open_shards(str(edited), "train", "zarr")
    with pytest.raises(ShardError, match=r"zarr/train/queries/c/0/0: checksum mismatch"):
        shards.read_shard(0, cache=False)
    np.testing.assert_array_equal(
        shards.read_fields(0).fields, open_shards(str(clean), "train", "zarr").read_shard(0).fields
    )
    assert layer_id_of(refresh_cli(edited, ckpt, "1:3", "format=zarr")) == expected


def test_the_shard_read_benchmark_reads_less_for_a_refresh_and_an_epoch(tmp_path):
    """tools/bench/bench_shard_reads.py on a small set: a result per ratio and format, a row
    per read; read_fields returning fewer bytes than read_shard (no query sets) in every one,
    and a stream's block and one epoch's sets fewer than the whole record where the format
    reads them apart (zarr), a tar's block the whole record."""
    out = tmp_path / "reads.md"
    result = run_tool(
        ROOT / "tools" / "bench" / "bench_shard_reads.py", "--resolution", "32",
        "--trajectories", "6", "--steps", "5", "--trajectories-per-shard", "2", "--epochs", "20",
        "--ratios", "0.1", "0.3", "--repeats", "1", "--out", out, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "bench" / "reads.json").read_text())["results"]
    assert {(r["ratio"], r["format"]) for r in rows} == {
        (ratio, fmt) for ratio in (0.1, 0.3) for fmt in ("zarr", "wds")
    }
    for r in rows:
        assert 0 < r["read_fields_bytes"] < r["read_shard_bytes"], r
        assert 0 < r["read_codes_bytes"] < r["read_block_bytes"], r
        if r["format"] == "zarr":
            assert r["read_block_bytes"] + 20 * r["read_codes_bytes"] == r["read_shard_bytes"], r
        else:
            assert r["read_block_bytes"] == r["read_shard_bytes"], r
    assert out.read_text().count("| 0.3 | wds |") == 4  # one row per read


def test_killed_refresh_is_never_visible_and_reruns_to_the_same_bytes(flow, tmp_path):
    clean = copy_set(flow["fields"], tmp_path / "clean")
    ckpt = flow["root"] / "codec" / "checkpoint.pt"
    expected = layer_id_of(refresh_cli(clean, ckpt, "1:3"))
    cut = copy_set(flow["fields"], tmp_path / "cut")
    # what a kill leaves: some shards written, one half-written tar, no record
    shards = open_shards(str(cut))
    payload = load_checkpoint(ckpt, "train")
    run = from_dict(TrainConfig, payload["config"])
    models, _ = build_models(run, shards)
    models.load_state_dict(payload["models"])
    models.eval()
    definition = error_definition("codec", 1.0, 0.5, batch_spec(run).window)
    request = LayerRequest(
        epochs=(1, 3),
        model=model_entry(models, "codec", payload["step"]),
        error=definition,
        importance=ErrorImportance(),
        checkpoint=str(ckpt),
    )
    writer = LayerWriter(shards, request, torch.device("cpu"))
    writer.create()
    error_of = PointError(models.codec, None, shards, definition, torch.device("cpu"), 16, False)
    writer.write_shards(error_of, [0, 2])
    (writer.tmp / "wds" / ".train-000001.tar.tmp-99999-0").write_bytes(b"half a tar")
    assert open_shards(str(cut)).layer_ids == [], "a partial layer must not be read"
    assert [p.name for p in (cut / LAYERS).iterdir()] == [writer.tmp.name]
    rerun = layer_id_of(refresh_cli(cut, ckpt, "1:3"))
    assert rerun == expected
    assert tree_digest(cut / LAYERS / rerun) == tree_digest(clean / LAYERS / expected)
    assert [p.name for p in (cut / LAYERS).iterdir()] == [rerun]


def test_refresh_refuses_checkpoints_that_do_not_belong(flow, tmp_path):
    codec_ckpt = flow["root"] / "codec" / "checkpoint.pt"
    operator_ckpt = flow["root"] / "operator" / "checkpoint.pt"
    fields = copy_set(flow["fields"], tmp_path / "fields")
    latents = copy_set(flow["latents"], tmp_path / "latents")
    # a codec run's checkpoint on the latent set it did not train on
    result = refresh_cli(latents, codec_ckpt, "0:2")
    assert result.returncode == 2 and "trained on another shard set" in result.stderr
    # an operator checkpoint on field-only shards
    result = refresh_cli(fields, operator_ckpt, "0:2")
    assert result.returncode == 2 and "field-only shards hold no latents" in result.stderr
    # an operator whose run names another codec than the one the latents were encoded with
    payload = load_checkpoint(operator_ckpt, "train")
    other_codec = tmp_path / "other_codec.pt"
    codec_payload = load_checkpoint(flow["codec"], "codec")
    codec_payload["state_dict"] = {k: v + 1 for k, v in codec_payload["state_dict"].items()}
    torch.save(codec_payload, other_codec)
    payload["config"]["codec_checkpoint"] = str(other_codec)
    edited = tmp_path / "operator_other_codec.pt"
    torch.save(payload, edited)
    result = refresh_cli(latents, edited, "0:2")
    assert (
        result.returncode == 2
        and "differs from the encoder the shards were built with" in result.stderr
    )
    # epochs outside the set
    result = refresh_cli(latents, operator_ckpt, "2:9")
    assert result.returncode == 2 and "option 'epochs'" in result.stderr
    assert not (latents / LAYERS).exists() or not any((latents / LAYERS).iterdir())
    # the operator's own set: its layer's error is the operator loss
    layer = layer_id_of(refresh_cli(latents, operator_ckpt, "1:3"))
    record = json.loads((latents / LAYERS / layer / "layer.json").read_text())
    assert record["error"]["kind"] == "operator-loss" and record["model"]["stage"] == "operator"


def test_edited_or_foreign_layers_are_refused(flow, tmp_path):
    fields = copy_set(flow["fields"], tmp_path / "fields")
    ckpt = flow["root"] / "codec" / "checkpoint.pt"
    layer = layer_id_of(refresh_cli(fields, ckpt, "0:2"))
    record_path = fields / LAYERS / layer / "layer.json"
    record = json.loads(record_path.read_text())
    record["importance"]["alpha"] = 0.5
    record_path.write_text(json.dumps(record))
    with pytest.raises(ShardError, match="not its content's"):
        open_shards(str(fields))
    # a layer of another set copied in
    other = copy_set(flow["latents"], tmp_path / "latents")
    shutil.copytree(fields / LAYERS, other / LAYERS)
    record["importance"]["alpha"] = 0.3
    (other / LAYERS / layer / "layer.json").write_text(json.dumps(record))
    with pytest.raises(ShardError, match="a layer of another shard set"):
        open_shards(str(other))
    # an edited layer file is named when read
    record_path.write_text(json.dumps(record))
    tar = fields / LAYERS / layer / "wds" / "train-000000.tar"
    tar.write_bytes(tar.read_bytes()[:-10] + b"0123456789")
    shards = open_shards(str(fields), format="wds")
    with pytest.raises(ShardError, match="checksum mismatch"):
        shards.query_set(0, 1)


def test_loader_streams_a_layer_named_by_the_run(flow, tmp_path):
    fields = copy_set(flow["fields"], tmp_path / "fields")
    layer = layer_id_of(refresh_cli(fields, flow["root"] / "codec" / "checkpoint.pt", "1:2"))
    for process in (False, True):
        shards = open_shards(str(fields), layer=layer[:10])
        loader = ShardLoader(
            shards,
            LoaderConfig(workers=1, process=process),
            batch_size=4,
            spec=batch_spec(config("stage=codec")),
        )
        index_of = {shards.snapshot(i)["snapshot_id"]: i for i in range(len(shards))}
        coords = shards.manifest.data.grid[0]
        for epoch in (0, 1):
            loader.epoch = epoch
            loader._batches = 0
            loader.close()
            batch = next(iter(loader))
            for row, sid in enumerate(batch.snapshot_id.tolist()):
                indices, weights = shards.query_set(index_of[sid], epoch)
                got = torch.round(batch.coords[row, :, 0] * (coords - 1)).long().numpy()
                assert np.array_equal(got, indices), (process, epoch)
                assert np.allclose(batch.weights[row].numpy(), weights)
        loader.close()


def test_a_layer_added_mid_epoch_is_read_ahead_before_its_epoch(flow, tmp_path, monkeypatch):
    """The loader waits for an awaited epoch's layer; once the layer is added (a refresh one
    epoch ahead) it prepares that epoch's groups while the epoch before still streams, and the
    epoch's batches come from the layer."""
    fields = copy_set(flow["fields"], tmp_path / "fields")
    layer = layer_id_of(refresh_cli(fields, flow["root"] / "codec" / "checkpoint.pt", "2:3"))
    prepared = record_preparations(monkeypatch)  # the loader's threads, in this process
    shards = open_shards(str(fields), layer=None)  # as a run starts: the layer is to come
    shards.await_layers([2])
    spec = batch_spec(config("stage=codec"))
    loader = ShardLoader(shards, LoaderConfig(workers=1, process=False), batch_size=4, spec=spec)
    for _ in loader:  # epoch 0
        pass
    epoch_1 = iter(loader)
    next(epoch_1)
    assert all(epoch < 2 for _, epoch, _ in prepared), "epoch 2 read ahead before its layer"
    loader.add_layer(layer)
    rest = list(epoch_1)
    assert rest and all(b.epoch == 1 for b in rest)
    early = [shard for shard, epoch, streaming in prepared if epoch == 2 and streaming == 1]
    assert early, "epoch 2's groups were prepared only once the stream reached epoch 2"
    index_of = {shards.snapshot(i)["snapshot_id"]: i for i in range(len(shards))}
    coords = shards.manifest.data.grid[0]
    batch = next(iter(loader))  # epoch 2: its sets are the layer's
    for row, sid in enumerate(batch.snapshot_id.tolist()):
        indices, _ = shards.query_set(index_of[sid], 2)
        got = torch.round(batch.coords[row, :, 0] * (coords - 1)).long().numpy()
        assert np.array_equal(got, indices)
    stream = loader.graph.source
    loader.close()
    groups = groups_of_shards(stream, {epoch for _, epoch, _ in prepared})
    twice = Counter((shard, epoch) for shard, epoch, _ in prepared) - groups
    assert not twice, f"(shard, epoch) prepared more often than in a group: {dict(twice)}"


def run_args(shards: Path) -> list[str]:
    return [
        *SMALL_MODEL, "stage=codec", f"shards={shards}", "batch_size=8", "epochs=6",
        "adaptive.refresh_every=2", "checkpoint_every=3", "log_batches=true", "progress=false",
        "loader.workers=2", "eval_every=1000",
    ]  # fmt: skip


def test_training_refreshes_and_a_killed_run_resumes_to_the_same_batches(flow, tmp_path):
    """A run with refresh_every=2 and the same run SIGKILLed (once during a refresh, once
    during training) and resumed: the same batches, the same layers, the same weights."""
    full_set = copy_set(flow["fields"], tmp_path / "full_set")
    done = run_train_cli(*run_args(full_set), f"out={tmp_path / 'full'}")
    assert done.returncode == 0, done.stderr
    chain = load_checkpoint(tmp_path / "full" / "checkpoint.pt", "train")["layers"]
    assert chain["initial"] == [] and len(chain["refreshed"]) == 2  # epochs 2:4 and 4:6
    metrics = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    refreshes = [m for m in metrics if "refresh/seconds" in m]
    assert [m["refresh/epochs"] for m in refreshes] == [[2, 4], [4, 6]]
    assert [m["refresh/layer"] for m in refreshes] == chain["refreshed"]
    for m in refreshes:  # where each refresh's seconds went: the main thread's part of them
        parts = [m[f"refresh/{stage}_seconds"] for stage in ("read", "error", "plan", "write")]
        assert all(seconds > 0 for seconds in parts), m
        assert sum(parts[:3]) <= m["refresh/seconds"], m

    cut_set = copy_set(flow["fields"], tmp_path / "cut_set")
    out, ckpt = tmp_path / "cut", tmp_path / "cut" / "checkpoint.pt"
    args = [*run_args(cut_set), f"out={out}"]

    def partial_layer() -> bool:
        return any((cut_set / LAYERS).glob(".partial-*/parts/train-*.json"))

    def step() -> int:
        return load_checkpoint(ckpt, "train")["step"] if ckpt.exists() else -1

    # killed while writing the first layer, then resumed and killed while training, then resumed
    assert kill_when(args, partial_layer), "the run ended before a refresh could be interrupted"
    assert not any(p.name[0] != "." for p in (cut_set / LAYERS).iterdir()), "half a layer shown"
    first = step()
    assert kill_when([*args, f"resume={ckpt}"], lambda: step() > first + 12)
    resumed = run_train_cli(*args, f"resume={ckpt}")
    assert resumed.returncode == 0, resumed.stderr
    reference = {r["step"]: r for r in read_jsonl(tmp_path / "full" / "batches-rank0.jsonl")}
    resumed = {r["step"]: r for r in read_jsonl(out / "batches-rank0.jsonl")}
    assert resumed == reference
    assert load_checkpoint(out / "checkpoint.pt", "train")["layers"] == chain
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt", "train")["models"]
    b = load_checkpoint(out / "checkpoint.pt", "train")["models"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert sorted(p.name for p in (cut_set / LAYERS).iterdir()) == sorted(chain["refreshed"])


def kill_when(args: list[str], condition) -> bool:
    """Run the training CLI and SIGKILL it as soon as ``condition()`` holds; False if the run
    ended first."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "train.py"), *args],
        env=ENV, cwd=ROOT, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    return False


def test_ddp_refresh_writes_the_layer_one_process_writes(flow, tmp_path):
    """Two torchrun ranks refresh in training, each its share of the shards; an offline refresh
    in one process from the same weights (a run stopped at the refresh, constant learning rate,
    so the same steps) writes the same layer."""
    shards = copy_set(flow["fields"], tmp_path / "set")
    args = [
        *SMALL_MODEL, "stage=codec", f"shards={shards}", "batch_size=4", "epochs=3",
        "adaptive.refresh_every=2", "progress=false", "loader.workers=1", "eval_every=1000",
        "optim.warmup_steps=0", "optim.min_lr_ratio=1.0",
    ]  # fmt: skip
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), str(ROOT / "tools" / "train.py"), *args,
    ]  # fmt: skip
    result = subprocess.run(
        [*cmd, f"out={tmp_path / 'ddp'}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (refreshed,) = [
        m for m in read_jsonl(tmp_path / "ddp" / "metrics.jsonl") if "refresh/layer" in m
    ]
    layer, step = refreshed["refresh/layer"], refreshed["step"]
    chain = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt", "train")["layers"]
    assert chain == {"initial": [], "refreshed": [layer]}
    stopped = subprocess.run(
        [*cmd, f"out={tmp_path / 'stopped'}", f"max_steps={step}"],
        capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT,
    )  # fmt: skip
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    other = copy_set(flow["fields"], tmp_path / "other")
    offline = refresh_cli(other, tmp_path / "stopped" / "checkpoint.pt", "2:4")
    assert layer_id_of(offline) == layer  # the id: the record without its provenance
    ours, theirs = tree_digest(shards / LAYERS / layer), tree_digest(other / LAYERS / layer)
    del ours["layer.json"], theirs["layer.json"]  # one names the checkpoint file it came from
    assert ours == theirs


def test_a_compiled_run_refreshes_from_the_eager_error(flow, tmp_path):
    """compile=true compiles the refreshes' dense decode too (inductor's kernels on this CPU):
    an operator run refreshes with it in training, and on a real shard block it gives the
    per-point error of the eager decode, both terms of the operator loss, within rounding."""
    shards = copy_set(flow["latents"], tmp_path / "set")
    cfg = config(
        "stage=operator", f"shards={shards}", f"codec_checkpoint={flow['codec']}",
        f"out={tmp_path / 'run'}", "batch_size=8", "epochs=2", "adaptive.refresh_every=1",
        "compile=true", "eval_every=1000",
    )  # fmt: skip
    trainer = Trainer(cfg)
    trainer.fit()
    (refreshed,) = [
        m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "refresh/layer" in m
    ]
    assert refreshed["refresh/epochs"] == [1, 2]
    definition = error_definition("operator", 1.0, 0.5, batch_spec(cfg).window)
    models, device = trainer.models.eval(), torch.device("cpu")
    block = trainer.shards.read_shard(0)
    eager = PointError(models.codec, models.operator, trainer.shards, definition, device, 4, False)
    compiled = PointError(
        models.codec, models.operator, trainer.shards, definition, device, 4, False,
        trainer.dense_decode,
    )  # fmt: skip
    assert trainer.dense_decode != models.codec.decode_grid  # not the eager bound method
    expected = eager(block)
    assert expected.shape == (len(block.time), 64) and expected.sum() > 0
    torch.testing.assert_close(compiled(block), expected, rtol=1e-4, atol=1e-7)


def test_resume_on_another_chain_is_refused(flow, tmp_path):
    shards = copy_set(flow["fields"], tmp_path / "set")
    out = tmp_path / "run"
    done = run_train_cli(*run_args(shards), f"out={out}", "max_steps=40")
    assert done.returncode == 0, done.stderr
    chain = load_checkpoint(out / "checkpoint.pt", "train")["layers"]["refreshed"]
    assert len(chain) == 1
    shutil.rmtree(shards / LAYERS / chain[0])
    result = run_train_cli(
        *run_args(shards), f"out={out}", "max_steps=40", f"resume={out / 'checkpoint.pt'}"
    )
    assert result.returncode == 2
    assert "no longer holds" in result.stderr and chain[0][:12] in result.stderr
    with pytest.raises(ConfigError, match=r"adaptive\.refresh_every"):
        config("stage=codec", f"shards={shards}", "adaptive.refresh_every=2", "loss.mode=dense")


def test_bad_adaptive_options_are_refused_before_any_work(flow, tmp_path):
    for option, expected in (
        ("adaptive.alpha=0", "adaptive.alpha"),
        ("adaptive.power=0", "adaptive.power"),
        ("adaptive.mix=1.5", "adaptive.mix"),
        ("adaptive.refresh_every=-1", "adaptive.refresh_every"),
    ):
        result = run_train_cli(*run_args(flow["fields"]), f"out={tmp_path / 'x'}", option)
        assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()
    result = refresh_cli(flow["fields"], flow["root"] / "codec" / "checkpoint.pt", "3")
    assert result.returncode == 2 and "option 'epochs'" in result.stderr
    assert os.path.exists(flow["fields"] / "manifest.json")


def test_branching_layers_need_a_name_for_train_and_never_touch_other_splits(flow, tmp_path):
    """Two refreshes on the set itself (layer=none) branch: "latest" asks for a layer id, while
    validation and test splits, which layers never replace, open as before."""
    fields = copy_set(flow["fields"], tmp_path / "fields")
    ckpt = flow["root"] / "codec" / "checkpoint.pt"
    a = layer_id_of(refresh_cli(fields, ckpt, "0:2", "layer=null"))
    b = layer_id_of(refresh_cli(fields, ckpt, "0:2", "layer=null", "adaptive.power=1.0"))
    with pytest.raises(ShardError, match="branch into 2 chains"):
        open_shards(str(fields))
    assert open_shards(str(fields), layer=b[:12]).layer_ids == [b]
    for split in ("val", "test"):
        assert open_shards(str(fields), split).layer_ids == []
    assert a != b
