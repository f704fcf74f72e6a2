"""Training streamed from shards: both stages, sparse vs dense, exact resume, DDP, HTTP, errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import serve_directory

from pipeline.build import BuildConfig, run_build
from pipeline.config import load_config
from pipeline.loader import BatchSpec, LoaderConfig, ShardLoader
from pipeline.records import ShardError
from pipeline.samplers import SamplerConfig
from pipeline.schedules import ScheduleConfig
from pipeline.shards import open_shards
from pipeline.sources.generate import generate
from pipeline.sources.splits import DataConfig
from ups.models.checkpoint import CheckpointError, load_checkpoint
from ups.models.codec import load_encoder
from ups.training.train import TrainConfig, Trainer, train

# end-to-end training runs: the fast lane (pytest -m "not slow") leaves them out
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# Training runs on the CPU even where a GPU is present: these tests compare runs bit for bit, and
# the torchrun test runs two gloo ranks.
SMALL_MODEL = [
    "device=cpu",
    "codec.encoder.patch=8",
    "codec.encoder.dim=32",
    "codec.encoder.depth=1",
    "codec.encoder.num_tokens=8",
    "codec.encoder.latent_dim=16",
    "codec.decoder.dim=32",
    "codec.decoder.depth=1",
    "operator.dim=32",
    "operator.depth=1",
]


def config(*overrides: str) -> TrainConfig:
    base = [
        *SMALL_MODEL,
        "progress=false",
        "loader.workers=1",
        "log_every=5",
        "eval_trajectories=1",
        "optim.warmup_steps=5",
    ]
    return load_config(TrainConfig, None, [*base, *overrides])


def build(
    data: Path,
    out: Path,
    encoder: Path | None = None,
    epochs: int = 4,
    kind: str = "uniform",
    ratio: float = 0.25,
) -> Path:
    run_build(
        BuildConfig(
            data=DataConfig(path=str(data), val_fraction=0.13, test_fraction=0.13),
            out=str(out),
            encoder=None if encoder is None else str(encoder),
            epochs=epochs,
            sampler=SamplerConfig(kind=kind),
            schedule=ScheduleConfig(start_ratio=ratio, multiple=8),
            trajectories_per_shard=2,
            device="cpu",
            progress=False,
        ),
        load_encoder=load_encoder,
    )
    return out


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Generated Burgers data -> field shards -> a codec -> latent shards."""
    root = tmp_path_factory.mktemp("flow")
    data = generate(
        "burgers1d", root / "b.h5", trajectories=15, steps=12, resolution=64, seed=1, progress=False
    )
    fields = build(data, root / "fields")
    train(
        config(
            "stage=codec", f"shards={fields}", f"out={root / 'codec'}", "epochs=2", "batch_size=8"
        )
    )
    codec = root / "codec" / "codec.pt"
    latents = build(data, root / "latents", encoder=codec, kind="gradient", ratio=0.1)
    return {"root": root, "data": data, "fields": fields, "codec": codec, "latents": latents}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_codec_then_operator_streaming_from_shards(flow, tmp_path):
    codec_run = flow["root"] / "codec"
    metrics = read_jsonl(codec_run / "metrics.jsonl")
    assert any("train/reconstruction" in m for m in metrics) and any(
        "val/recon_nrmse" in m for m in metrics
    )
    assert (codec_run / "tb").is_dir() and json.loads(
        (codec_run / "test_metrics.json").read_text()
    )["recon_nrmse"] > 0
    payload = load_checkpoint(flow["codec"], "codec")
    assert payload["sample_set_id"] == open_shards(str(flow["fields"])).sample_set_id
    final = train(
        config(
            "stage=operator",
            f"shards={flow['latents']}",
            f"codec_checkpoint={flow['codec']}",
            f"out={tmp_path}",
            "epochs=2",
            "batch_size=8",
            "loss.rollout_steps=2",
            "eval_horizons=[1]",
            "eval_reconstruction=false",
        )
    )
    # the test reports every horizon and the reconstruction; validations only eval_horizons,
    # without the reconstruction's decodes, and how long each took
    for key in ("recon_nrmse", "model_h1", "persistence_h1", "model_h4", "persistence_h4"):
        assert np.isfinite(final[key])
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert "train/rollout" in metrics[0]
    validations = [m for m in metrics if "val/model_h1" in m]
    assert validations and not any("val/model_h4" in m for m in validations)
    assert not any("val/recon_nrmse" in m for m in validations)
    assert all(m["val_seconds"] > 0 for m in validations)
    assert (
        load_checkpoint(tmp_path / "operator.pt", "operator")["sample_set_id"]
        == open_shards(str(flow["latents"])).sample_set_id
    )


def test_compiled_step_trains_like_the_eager_one(flow, tmp_path):
    """compile=true with compile_mode=reduce-overhead (CUDA graphs on a GPU; on this CPU the
    mode's plumbing, the step marks, and inductor's kernels): the same losses as eager, within
    the rounding of other kernels."""
    losses = {}
    for name, extra in [
        ("eager", []),
        ("compiled", ["compile=true", "compile_mode=reduce-overhead"]),
    ]:
        train(
            config(
                "stage=operator",
                f"shards={flow['latents']}",
                f"codec_checkpoint={flow['codec']}",
                f"out={tmp_path / name}",
                "max_steps=10",
                "batch_size=8",
                "log_every=1",
                *extra,
            )
        )
        metrics = read_jsonl(tmp_path / name / "metrics.jsonl")
        losses[name] = [m["train/total"] for m in metrics if "train/total" in m]
    assert len(losses["eager"]) == 10
    np.testing.assert_allclose(losses["compiled"], losses["eager"], rtol=2e-3)


def log_run(flow, out: Path, *overrides: str) -> list[dict]:
    train(
        config(
            "stage=operator",
            f"shards={flow['latents']}",
            f"codec_checkpoint={flow['codec']}",
            f"out={out}",
            "max_steps=10",
            "batch_size=8",
            "eval_every=4",
            *overrides,
        )
    )
    return read_jsonl(out / "metrics.jsonl")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_each_log_record_holds_its_own_steps_losses(flow, tmp_path, device):
    """Log records are written a log line late (their values copied off the device behind the
    step, not read at once): each still holds its own step's losses, in step order, the
    validation's record after its step's. On a GPU through CUDA graphs, whose outputs the next
    step overwrites."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    on = [f"device={device}"]
    if device == "cuda":
        on += ["compile=true", "compile_mode=reduce-overhead"]
    every = log_run(flow, tmp_path / "every", "log_every=1", *on)
    sparse = log_run(flow, tmp_path / "sparse", "log_every=3", *on)
    steps = [r["step"] for r in sparse if "train/total" in r]
    assert steps == [3, 6, 9, 10]
    losses = {r["step"]: (r["train/total"], r["grad_norm"]) for r in every if "train/total" in r}
    assert sorted(losses) == list(range(1, 11))
    for r in sparse:
        if "train/total" in r:  # eager on the CPU: the same numbers; on a GPU, its rounding
            np.testing.assert_allclose((r["train/total"], r["grad_norm"]), losses[r["step"]],
                                       rtol=0 if device == "cpu" else 1e-4)  # fmt: skip
    order = [(r["step"], "val/model_h1" in r) for r in sparse if "test/model_h1" not in r]
    assert order == sorted(order), "records in step order, a step's training record first"
    assert [s for s, val in order if val] == [4, 8, 10]


def test_operator_decoder_calls_see_at_most_k_points(flow, tmp_path):
    trainer = Trainer(
        config(
            "stage=operator",
            f"shards={flow['latents']}",
            f"codec_checkpoint={flow['codec']}",
            f"out={tmp_path}",
            "max_steps=3",
            "batch_size=8",
        )
    )
    k = max(trainer.shards.k_per_epoch)
    assert k < 64 * 0.2, "the shards really sample"
    sizes = []
    trainer.models.codec.decoder.register_forward_pre_hook(
        lambda mod, args: sizes.append(args[1].shape[1])
    )
    trainer.fit()
    training_calls = sizes[
        : 2 * 3
    ]  # forward + inverse loss per step, before validation decodes the dense grid
    assert training_calls and max(training_calls) <= k


def test_sparse_operator_loss_matches_the_dense_loss_in_expectation(flow, tmp_path):
    """Over many epochs' precomputed gradient-importance sets the sparse loss averages to the dense loss."""
    shards_dir = build(
        flow["data"],
        tmp_path / "many",
        encoder=flow["codec"],
        epochs=300,
        kind="gradient",
        ratio=0.1,
    )
    trainer = Trainer(
        config(
            "stage=operator",
            f"shards={shards_dir}",
            f"codec_checkpoint={flow['codec']}",
            f"out={tmp_path / 'run'}",
            "epochs=300",
        )
    )
    torch.nn.init.normal_(
        trainer.models.operator.out.weight, std=0.05
    )  # a fixed, non-trivial model
    shards = open_shards(str(shards_dir))
    pairs = BatchSpec(window=1, sparse_steps=(0, 1), latents=True)
    dense_pairs = BatchSpec(window=1, dense_steps=(0, 1), latents=True)
    cfg = LoaderConfig(workers=0, partitions=1)  # one batch: the whole epoch
    slice_size = ShardLoader(shards, cfg, batch_size=1, spec=pairs).batches_per_epoch
    sparse = ShardLoader(shards, cfg, batch_size=slice_size, spec=pairs)
    dense = ShardLoader(shards, cfg, batch_size=slice_size, spec=dense_pairs)
    gen = torch.Generator()
    with torch.no_grad():
        dense_cfg = config("stage=operator", "loss.mode=dense", f"codec_checkpoint={flow['codec']}")
        reference = trainer.models(next(iter(dense)).to(trainer.device), dense_cfg, gen)
        estimates = {name: [] for name in ("forward", "inverse")}
        for _ in range(300):
            batch = next(iter(sparse)).to(trainer.device)  # one batch = the whole epoch
            terms = trainer.models(batch, trainer.cfg, gen)
            for name in estimates:
                estimates[name].append(float(terms[name]))
    for name, values in estimates.items():
        values = np.asarray(values)
        stderr = values.std() / np.sqrt(len(values))
        assert 4 * stderr < 0.03 * float(reference[name]), "enough draws to resolve 3 %"
        assert abs(values.mean() - float(reference[name])) < 4 * stderr, (
            name,
            values.mean(),
            float(reference[name]),
        )


def test_model_seed_does_not_change_the_batches(flow, tmp_path):
    for seed in (0, 1):
        train(
            config(
                "stage=codec",
                f"shards={flow['fields']}",
                f"out={tmp_path / str(seed)}",
                f"seed={seed}",
                "max_steps=12",
                "batch_size=8",
                "log_batches=true",
            )
        )
    a, b = (read_jsonl(tmp_path / s / "batches-rank0.jsonl") for s in ("0", "1"))
    assert a == b and len(a) == 12
    pa, pb = (
        load_checkpoint(tmp_path / s / "checkpoint.pt", "train")["models"] for s in ("0", "1")
    )
    assert not torch.equal(pa["codec.decoder.out.weight"], pb["codec.decoder.out.weight"])


def run_train_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_sigkill_and_resume_sees_the_same_batches_and_parameters(flow, tmp_path):
    args = [
        *SMALL_MODEL,
        "stage=codec",
        f"shards={flow['fields']}",
        "batch_size=8",
        "epochs=4",
        "checkpoint_every=5",
        "log_batches=true",
        "progress=false",
        "loader.workers=2",
        "eval_every=1000",
    ]
    done = run_train_cli(*args, f"out={tmp_path / 'full'}")
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "train.py"), *args, f"out={tmp_path / 'cut'}"],
        env=env,
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run was killed before it finished"
    stopped_at = load_checkpoint(ckpt, "train")["step"]
    full_total = len(read_jsonl(tmp_path / "full" / "batches-rank0.jsonl"))
    assert 0 < stopped_at < full_total
    resumed = run_train_cli(*args, f"out={tmp_path / 'cut'}", f"resume={ckpt}")
    assert resumed.returncode == 0, resumed.stderr
    reference = {r["step"]: r for r in read_jsonl(tmp_path / "full" / "batches-rank0.jsonl")}
    after = [
        r for r in read_jsonl(tmp_path / "cut" / "batches-rank0.jsonl") if r["step"] > stopped_at
    ][-(full_total - stopped_at) :]
    assert [r["step"] for r in after] == list(range(stopped_at + 1, full_total + 1))
    assert all(r == reference[r["step"]] for r in after)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt", "train")["models"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt", "train")["models"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(ranks: int) -> list[str]:
    port = str(free_port())
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", port]  # fmt: skip


@pytest.mark.parametrize(
    ("trajectories", "batch", "partitions", "device"),
    [(15, 12, 4, "cpu"), (14, 10, 2, "cpu"), pytest.param(15, 12, 4, "cuda", marks=TWO_GPUS)],
)
def test_ddp_two_ranks_stream_disjoint_equal_shares(
    tmp_path, trajectories, batch, partitions, device
):
    """Two torchrun ranks: gloo on the CPU; NCCL, one GPU per rank, where two GPUs exist."""
    data = generate(
        "burgers1d",
        tmp_path / "b.h5",
        trajectories=trajectories,
        steps=11,
        resolution=64,
        seed=2,
        progress=False,
    )
    shards = build(data, tmp_path / "fields", epochs=2)
    total = len(open_shards(str(shards)))
    cmd = [
        *torchrun(2), str(ROOT / "tools" / "train.py"), *SMALL_MODEL, "stage=codec", f"shards={shards}",
        f"out={tmp_path / 'run'}", f"batch_size={batch}", f"loader.partitions={partitions}", "epochs=2",
        "log_batches=true", "progress=false", "loader.workers=1", "eval_trajectories=1", f"device={device}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [read_jsonl(tmp_path / "run" / f"batches-rank{r}.jsonl") for r in (0, 1)]
    # every global batch takes batch / partitions examples of each partition of M / partitions
    per_epoch = total // partitions // (batch // partitions) * batch
    for epoch in (0, 1):
        ids = [
            [sid for rec in log if rec["epoch"] == epoch for sid in rec["snapshot_id"]]
            for log in logs
        ]
        assert len(ids[0]) == len(ids[1]) == per_epoch // 2
        assert not set(ids[0]) & set(ids[1])
    assert (tmp_path / "run" / "codec.pt").exists() and not (
        tmp_path / "run" / "batches-rank2.jsonl"
    ).exists()
    # rank 0 logs the losses averaged over the ranks (on the device, then copied off it behind
    # the step), every log_every (10) steps and the last, in step order
    steps = sum(1 for rec in logs[0])  # the global batches trained
    train = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/total" in r]
    expected = [s for s in range(1, steps + 1) if s % 10 == 0 or s == steps]
    assert [r["step"] for r in train] == expected
    assert all(0 < r["train/total"] < 10 and r["grad_norm"] > 0 for r in train)


# One leg of an elastic run: the run ends after STOP steps, as a preempted job would (its LR
# schedule keeps the full length), and leaves its checkpoint for the next leg.
LEG = """
import sys
import torch.distributed as dist
from pipeline.config import load_config
from ups.training.train import TrainConfig, Trainer

if __name__ == "__main__":  # the loader process (spawned) imports this file again
    trainer = Trainer(load_config(TrainConfig, None, sys.argv[2:]))
    trainer.total_steps = int(sys.argv[1])
    try:
        trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
"""


def test_elastic_resume_one_two_one_ranks_sees_the_same_global_batches(flow, tmp_path):
    """A run resumed from 1 on 2 ranks and back on 1 (torchrun, gloo) trains on the global
    batches of an uninterrupted one-rank run, step for step, to the same parameters."""
    leg = tmp_path / "leg.py"
    leg.write_text(LEG)
    args = [
        *SMALL_MODEL, "stage=codec", f"shards={flow['fields']}", "batch_size=8", "epochs=2",
        "log_batches=true", "progress=false", "loader.workers=1", "eval_every=1000",
        "eval_trajectories=1",
    ]  # fmt: skip
    steps = Trainer(config(*args, f"out={tmp_path / 'probe'}")).total_steps
    cut = tmp_path / "cut"
    ckpt = cut / "checkpoint.pt"
    legs = [
        (1, steps, [f"out={tmp_path / 'full'}"]),
        (1, steps // 3, [f"out={cut}"]),
        (2, 3 * steps // 4, [f"out={cut}", f"resume={ckpt}"]),  # across the epoch boundary
        (1, steps, [f"out={cut}", f"resume={ckpt}"]),
    ]
    for ranks, stop, extra in legs:
        cmd = [*torchrun(ranks), str(leg), str(stop), *args, *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
    reference = read_jsonl(tmp_path / "full" / "batches-rank0.jsonl")
    assert [r["step"] for r in reference] == list(range(1, steps + 1))
    ranks = [read_jsonl(cut / f"batches-rank{r}.jsonl") for r in (0, 1)]
    for want in reference:
        shares = [r for log in ranks for r in log if r["step"] == want["step"]]
        assert len(shares) == (2 if steps // 3 < want["step"] <= 3 * steps // 4 else 1)
        assert [sid for r in shares for sid in r["snapshot_id"]] == want["snapshot_id"]
        assert {r["epoch"] for r in shares} == {want["epoch"]}
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt", "train")
    b = load_checkpoint(ckpt, "train")
    assert a["step"] == b["step"] == steps and a["loader"] == b["loader"]
    for name, value in a["models"].items():  # two ranks average two half-batch gradients
        torch.testing.assert_close(b["models"][name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_training_over_http_sees_the_same_batches(flow, tmp_path):
    with serve_directory(flow["fields"]) as url:
        train(
            config(
                "stage=codec",
                f"shards={url}",
                f"out={tmp_path / 'http'}",
                "max_steps=6",
                "batch_size=8",
                "log_batches=true",
            )
        )
    train(
        config(
            "stage=codec",
            f"shards={flow['fields']}",
            f"out={tmp_path / 'local'}",
            "max_steps=6",
            "batch_size=8",
            "log_batches=true",
        )
    )
    assert read_jsonl(tmp_path / "http" / "batches-rank0.jsonl") == read_jsonl(
        tmp_path / "local" / "batches-rank0.jsonl"
    )


def test_resume_on_other_shards_is_refused(flow, tmp_path):
    train(
        config(
            "stage=codec",
            f"shards={flow['fields']}",
            f"out={tmp_path}",
            "max_steps=3",
            "batch_size=8",
        )
    )
    with pytest.raises(CheckpointError, match=r"made on other shards \(sample_set_id"):
        Trainer(
            config(
                "stage=codec",
                f"shards={flow['latents']}",
                f"out={tmp_path / 'x'}",
                "batch_size=8",
                f"resume={tmp_path / 'checkpoint.pt'}",
            )
        )


def test_bad_training_inputs(flow, tmp_path):
    with pytest.raises(ShardError, match=r"epoch 4 is beyond the 4 precomputed query sets"):
        Trainer(config("stage=codec", f"shards={flow['fields']}", "epochs=5"))
    with pytest.raises(ShardError, match=r"batch_size 4096 takes 1024 examples from each of"):
        Trainer(config("stage=codec", f"shards={flow['fields']}", "batch_size=4096"))
    with pytest.raises(CheckpointError, match="field-only shards"):
        Trainer(
            config(
                "stage=operator", f"shards={flow['fields']}", f"codec_checkpoint={flow['codec']}"
            )
        )
    other = tmp_path / "other.pt"
    other.write_bytes(flow["codec"].read_bytes() + b"x")
    with pytest.raises(
        CheckpointError, match="differs from the encoder the shards were built with"
    ):
        Trainer(config("stage=operator", f"shards={flow['latents']}", f"codec_checkpoint={other}"))
    result = run_train_cli("stage=codec", f"shards={flow['fields']}", "loss.query_sample_ratio=1.5")
    assert result.returncode == 2 and "loss.query_sample_ratio" in result.stderr


def test_corrupt_shard_mid_run_stops_with_its_name_and_keeps_the_checkpoint(flow, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(flow["fields"], copy)
    run = tmp_path / "run"
    args = ("stage=codec", f"shards={copy}", f"out={run}", "max_steps=8", "batch_size=8")
    first = Trainer(config(*args, "loader.format=wds"))
    first.total_steps = 4  # stop after 4 of the 8 steps, as a killed run would
    first.fit()
    good = (run / "checkpoint.pt").read_bytes()
    for tar in sorted((copy / "wds").glob("train-*.tar")):
        data = bytearray(tar.read_bytes())
        data[1500] ^= 0xFF
        tar.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-\d+\.tar: checksum mismatch"):
        train(config(*args, "loader.format=wds", f"resume={run / 'checkpoint.pt'}"))
    assert (run / "checkpoint.pt").read_bytes() == good


def test_validation_reads_its_split_once_per_run(flow, tmp_path):
    """A run validates every eval_every steps on the same trajectories: it reads them from the
    shards at the first validation and keeps them, so later validations give the same numbers
    without reading again (here: with the val shards corrupted on disk since), while the test
    split, or another number of validation trajectories, is still read."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(flow["fields"], copy)
    args = ("stage=codec", f"shards={copy}", f"out={tmp_path / 'run'}", "loader.format=wds")
    trainer = Trainer(config(*args))
    first = trainer.validate("val", 2)
    for tar in sorted((copy / "wds").glob("val-*.tar")):
        data = bytearray(tar.read_bytes())
        data[1500] ^= 0xFF
        tar.write_bytes(bytes(data))
    assert trainer.validate("val", 2) == first
    assert np.isfinite(trainer.validate("test", 1)["recon_nrmse"])
    corrupt = r"val-\d+\.tar: checksum mismatch"
    with pytest.raises(ShardError, match=corrupt):
        trainer.validate("val", 1)  # other trajectories than those kept: read, and noticed
    with pytest.raises(ShardError, match=corrupt):
        Trainer(config(*args)).validate("val", 2)  # a new run reads them, and notices


def test_curriculum_from_dense_trains_on_every_point_then_fewer(flow, tmp_path):
    """schedule cosine 1.0 -> 0.2 with a dense tail: the dense epochs' batches hold every point
    with weight 1, the sampled ones fewer."""
    shards = tmp_path / "curriculum"
    run_build(
        BuildConfig(
            data=DataConfig(path=str(flow["data"]), val_fraction=0.13, test_fraction=0.13),
            out=str(shards),
            epochs=4,
            sampler=SamplerConfig(kind="gradient"),  # weights != 1 where it samples
            schedule=ScheduleConfig(
                kind="cosine", start_ratio=1.0, end_ratio=0.2, dense_tail_epochs=1, multiple=8
            ),
            device="cpu",
            progress=False,
        )
    )
    n = 64
    assert open_shards(str(shards)).k_per_epoch == [n, 40, 16, n]  # ratios 1.0, 0.6, 0.2, 1.0
    cfg = config("stage=codec", f"shards={shards}", f"out={tmp_path / 'run'}", "batch_size=8")
    trainer = Trainer(cfg)
    try:
        seen = {}
        per_epoch = trainer.loader.batches_per_epoch
        for epoch in range(4):
            trainer.loader.load_state_dict(
                {"epoch": epoch, "batches": 0, "batches_per_epoch": per_epoch}
            )
            batch = next(iter(trainer.loader))
            seen[epoch] = (batch.coords.shape[1], bool((batch.weights == 1).all()))
    finally:
        trainer.loader.close()
    assert seen == {0: (n, True), 1: (40, False), 2: (16, False), 3: (n, True)}
