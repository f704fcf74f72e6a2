"""Training against hostile input (issue 13): crafted pickles, resume with options that break
exactness, options out of range, missing splits, bad out/device, a full disk, logs after a kill."""

from __future__ import annotations

import errno
import importlib.util
import io
import json
import os
import pickletools
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import tiny_codec_checkpoint

from pipeline.build import BuildConfig, run_build
from pipeline.config import load_config
from pipeline.shards import open_shards
from pipeline.sources.splits import DataConfig
from ups.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ups.models.codec import load_codec, load_encoder
from ups.training import train as train_module
from ups.training.train import TrainConfig, Trainer, train

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_cli", ROOT / "tools" / "train.py")
train_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cli)
main = train_cli.main

SMALL = [
    "device=cpu",
    "codec.encoder.patch=8",
    "codec.encoder.dim=16",
    "codec.encoder.depth=1",
    "codec.encoder.num_tokens=4",
    "codec.encoder.latent_dim=8",
    "codec.decoder.dim=16",
    "codec.decoder.depth=1",
    "operator.dim=16",
    "operator.depth=1",
    "progress=false",
    "tensorboard=false",
    "loader.workers=0",
    "loader.process=false",
    "eval_trajectories=1",
    "optim.warmup_steps=2",
    "batch_size=8",
]
# the run every resume test starts from: checkpoints at steps 2, 4, 6, a log line every step
RUN = [
    *SMALL,
    "stage=codec",
    "max_steps=6",
    "checkpoint_every=2",
    "eval_every=3",
    "log_every=1",
    "log_batches=true",
]


def config(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, [*SMALL, *overrides])


def build(data: Path, out: Path, encoder: Path | None = None, splits=None) -> Path:
    cfg = BuildConfig(
        data=DataConfig(path=str(data)),
        out=str(out),
        encoder=None if encoder is None else str(encoder),
        epochs=2,
        trajectories_per_shard=2,
        splits=splits or ["train", "val", "test"],
        device="cpu",
        progress=False,
    )
    run_build(cfg, load_encoder=load_encoder)
    return out


def fails(capsys, *args: str) -> str:
    """Run tools/train.py's main; it must exit 2 with one ``error:`` line; returns that line."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def fields(burgers_file, tmp_path_factory) -> Path:
    return build(burgers_file, tmp_path_factory.mktemp("fields") / "shards")


@pytest.fixture(scope="module")
def run(fields, tmp_path_factory) -> Path:
    """An uninterrupted run of RUN, with a copy of its checkpoint at every save (ckpt-{step}.pt)."""
    out = tmp_path_factory.mktemp("run") / "run"
    mp = pytest.MonkeyPatch()
    save = Trainer.save

    def save_and_copy(self, path):
        save(self, path)
        shutil.copy(path, out / f"ckpt-{self.step}.pt")

    mp.setattr(Trainer, "save", save_and_copy)
    try:
        train(load_config(TrainConfig, None, [*RUN, f"shards={fields}", f"out={out}"]))
    finally:
        mp.undo()
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ---------------------------------------------------------------- 1. crafted pickles


class Exploit:
    """Unpickling it runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled_strings(path: Path) -> set[str]:
    """Every string operand of the pickles in a torch file, read with pickletools: what the file
    would import and call, seen without unpickling anything."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            streams = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    else:  # the legacy format: pickles one after another
        streams = [path.read_bytes()]
    found = set()
    for stream in streams:
        buf = io.BytesIO(stream)
        while buf.tell() < len(stream):
            found |= {arg for _, arg, _ in pickletools.genops(buf) if isinstance(arg, str)}
    return found


def craft(path: Path, marker: Path, kind: str, zipped: bool) -> Path:
    payload = {"kind": kind, "config": {}, "state_dict": Exploit(marker)}
    # zipped: torch's format; else its legacy format (a sequence of pickles)
    torch.save(payload, path, _use_new_zipfile_serialization=zipped)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_crafted_pickles_are_refused_without_running_them(
    burgers_file, fields, tmp_path, capsys, zipped
):
    marker = tmp_path / "MARKER"
    train_pt = craft(tmp_path / "train.pt", marker, "train", zipped)
    codec_pt = craft(tmp_path / "codec.pt", marker, "codec", zipped)
    out = tmp_path / "out"
    # resume=
    err = fails(capsys, *SMALL, f"shards={fields}", f"out={out}", f"resume={train_pt}")
    assert f"checkpoint {train_pt} refers to posix.system, not only tensors" in err
    # codec_checkpoint= (stage=operator): refused by its sha256 before it is read, and the loader
    # the operator stage reads it with refuses it too
    latents = build(
        burgers_file, tmp_path / "latents", tiny_codec_checkpoint(burgers_file, tmp_path / "c.pt")
    )
    err = fails(
        capsys,
        *SMALL,
        "stage=operator",
        f"shards={latents}",
        f"codec_checkpoint={codec_pt}",
        f"out={out}",
    )
    assert str(codec_pt) in err
    data_info = open_shards(str(latents)).manifest.data_info("train")
    with pytest.raises(
        CheckpointError, match=f"checkpoint {codec_pt} refers to posix.system, not only tensors"
    ):
        load_codec(codec_pt, data_info)
    # the build's encoder=
    with pytest.raises(
        CheckpointError, match=f"checkpoint {codec_pt} refers to posix.system, not only tensors"
    ):
        load_encoder(str(codec_pt), data_info, {"train": []})
    with pytest.raises(
        CheckpointError, match=f"checkpoint {codec_pt} refers to posix.system, not only tensors"
    ):
        build(burgers_file, tmp_path / "hostile", encoder=codec_pt)
    assert not marker.exists() and not out.exists()
    # the files are really hostile: a full unpickler would call os.system("touch MARKER")
    for crafted in (train_pt, codec_pt):
        assert {"posix system", f"touch {marker}"} <= pickled_strings(crafted)


# ---------------------------------------------------------------- 2. resume and exactness


@pytest.mark.slow
def test_resume_refuses_every_change_that_breaks_exactness(run, fields, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    ckpt = out / "ckpt-2.pt"
    base = [*RUN, f"shards={fields}", f"out={out}", f"resume={ckpt}"]
    with pytest.raises(CheckpointError) as err:
        Trainer(load_config(TrainConfig, None, [*base, "loader.seed=7", "epochs=1"]))
    message = str(err.value)
    assert str(ckpt) in message and message.count("\n") == 0
    assert "loader.seed: 0 != 7" in message and "epochs: None != 1" in message
    for change, named in [
        ("loader.seed=7", "loader.seed"),
        ("epochs=2", "epochs"),
        ("max_steps=5", "max_steps"),
        ("loader.shuffle_shards=2", "loader.shuffle_shards"),
        ("optim.lr=0.01", "optim.lr"),
        ("loss.mode=dense", "loss.mode"),
        ("seed=3", "seed"),
    ]:
        err = fails(capsys, *base, change)
        assert f"{named}: " in err, (change, err)
    # changes that keep the run exact are accepted, and the run continues to its end
    train(
        load_config(
            TrainConfig,
            None,
            [*base, "log_every=2", "loader.workers=1", "eval_every=5", "loader.format=wds"],
        )
    )
    assert load_checkpoint(out / "checkpoint.pt", "train")["step"] == 6


@pytest.mark.slow
def test_a_checkpoint_older_than_an_option_resumes_as_its_default(run, fields, tmp_path):
    """A checkpoint written before compile_mode and eval_reconstruction existed: its run went as
    their defaults go, so it resumes (with them at their defaults) and ends where RUN ends."""
    out = copy_run(run, tmp_path)
    ckpt = out / "ckpt-2.pt"
    payload = torch.load(ckpt, weights_only=True)
    for key in ("compile_mode", "eval_reconstruction"):
        del payload["config"][key]
    save_checkpoint(ckpt, payload)
    base = [*RUN, f"shards={fields}", f"out={out}", f"resume={ckpt}"]
    train(load_config(TrainConfig, None, base))
    assert load_checkpoint(out / "checkpoint.pt", "train")["step"] == 6
    with pytest.raises(CheckpointError, match="compile_mode: 'default' != 'reduce-overhead'"):
        Trainer(load_config(TrainConfig, None, [*base, "compile_mode=reduce-overhead"]))


# ---------------------------------------------------------------- 3. options out of range


@pytest.mark.parametrize(
    ("override", "option"),
    [
        ("optim.grad_clip=-1", "optim.grad_clip"),
        ("optim.grad_clip=0", "optim.grad_clip"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
        ("optim.lr=.inf", "optim.lr"),
        ("max_steps=-1", "max_steps"),
        ("log_every=0", "log_every"),
        ("eval_every=-1", "eval_every"),
        ("eval_trajectories=0", "eval_trajectories"),
        ("eval_horizons=[0, 4]", "eval_horizons"),
        ("eval_horizons=[]", "eval_horizons"),
        ("compile_mode=max-autotune", "compile_mode"),
        ("eval_reconstruction=false", "eval_reconstruction"),  # stage=codec measures nothing else
        ("checkpoint_every=-1", "checkpoint_every"),
        ("seed=-1", "seed"),
        ("device=gpu", "device"),
        ("loss.forward=-1", "loss.forward"),
        ("loss.latent=.nan", "loss.latent"),
        ("loss.rollout=.inf", "loss.rollout"),
        ("codec.encoder.dim=0", "encoder.dim"),
        ("codec.encoder.num_tokens=0", "encoder.num_tokens"),
        ("codec.decoder.depth=0", "decoder.depth"),
        ("codec.decoder.max_freq=.inf", "decoder.max_freq"),
        ("operator.depth=0", "operator.depth"),
        ("operator.heads=0", "operator.heads"),
    ],
)
def test_options_out_of_range_exit_2_naming_the_option(tmp_path, capsys, override, option):
    out = tmp_path / "out"
    err = fails(capsys, *SMALL, "shards=nowhere", f"out={out}", override)
    assert f"option '{option}'" in err
    assert not out.exists()


def test_operator_stage_with_every_loss_weight_zero_is_refused(tmp_path, capsys):
    zero = ["loss.latent=0", "loss.forward=0", "loss.inverse=0"]
    err = fails(capsys, *SMALL, "stage=operator", "codec_checkpoint=c.pt", *zero)
    assert "option 'loss'" in err


@pytest.mark.slow
def test_shards_without_val_or_test_fail_before_training(burgers_file, tmp_path, capsys):
    shards = build(burgers_file, tmp_path / "train-only", splits=["train"])
    out = tmp_path / "out"
    err = fails(capsys, *SMALL, f"shards={shards}", f"out={out}")
    assert str(shards) in err and "no 'val' split" in err
    assert not out.exists()


# ---------------------------------------------------------------- 4. messages, not tracebacks


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("mine")
    err = fails(capsys, *SMALL, "shards=nowhere", f"out={out}")
    assert "option 'out'" in err and out.read_text() == "mine"


def test_cuda_without_a_cuda_device_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    err = fails(capsys, *[a for a in SMALL if a != "device=cpu"], "device=cuda", f"out={out}")
    assert "option 'device'" in err and "no CUDA device is available" in err
    assert not out.exists()


@pytest.mark.slow
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
    run, fields, tmp_path, capsys, monkeypatch
):
    out = copy_run(run, tmp_path)
    previous = (out / "checkpoint.pt").read_bytes()
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    err = fails(capsys, *RUN, f"shards={fields}", f"out={out}", f"resume={out / 'ckpt-2.pt'}")
    monkeypatch.setattr(torch, "save", save)
    assert err == f"error: {out / 'checkpoint.pt'}: No space left on device\n"
    assert (out / "checkpoint.pt").read_bytes() == previous
    assert not list(out.glob(".checkpoint.pt.tmp-*"))


@pytest.mark.slow
def test_full_disk_while_logging_names_the_log(run, fields, tmp_path, capsys, monkeypatch):
    out = copy_run(run, tmp_path)
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if str(path).endswith("metrics.jsonl") and "a" in mode else f

    monkeypatch.setattr(train_module, "open", fake_open, raising=False)
    err = fails(capsys, *RUN, f"shards={fields}", f"out={out}", f"resume={out / 'ckpt-4.pt'}")
    assert err == f"error: {out / 'metrics.jsonl'}: No space left on device\n"


# ---------------------------------------------------------------- 5. logs after resume


def kinds(records: list[dict]) -> list[tuple[int, str]]:
    """(step, train|val|test) of each metrics record."""
    prefixes = [[k.split("/")[0] for k in r if k.split("/")[0] in ("train", "val", "test")]
                for r in records]  # fmt: skip
    return [(r["step"], p[0]) for r, p in zip(records, prefixes, strict=True)]


@pytest.mark.slow
def test_resume_after_a_kill_logs_every_step_once(run, fields, tmp_path):
    """A run killed after its checkpoint at step 2 but after logging steps 3..6 (here: the log
    of the whole run), resumed from that checkpoint, logs as the uninterrupted run did."""
    out = copy_run(run, tmp_path)
    reference = read_jsonl(run / "metrics.jsonl")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/tot')  # a line cut short by the kill
    train(
        load_config(
            TrainConfig,
            None,
            [*RUN, f"shards={fields}", f"out={out}", f"resume={out / 'ckpt-2.pt'}"],
        )
    )
    resumed = read_jsonl(out / "metrics.jsonl")
    assert kinds(resumed) == kinds(reference)
    assert len(set(kinds(resumed))) == len(resumed), "no step is logged twice"
    # each start's first step (its warm-up) comes with its first training record
    starts = [r["step"] for r in resumed if "start/first_step_seconds" in r]
    first_logged = [
        min(r["step"] for r in resumed if r["step"] > s and "train/total" in r) for s in (0, 2)
    ]
    assert starts == first_logged  # the first start and the resume from step 2
    # ... and so does its wait for the first batch (the loader starting and filling)
    assert all(
        r["start/first_batch_seconds"] > 0 for r in resumed if "start/first_step_seconds" in r
    )
    # the waits for the next batch: cumulative, part of the training seconds, saved with the
    # checkpoint and counted on from there by the resumed start (its first wait included)
    waits = [(r["step"], r["loader_wait_seconds"], r["train_seconds"]) for r in resumed
             if "train/total" in r]  # fmt: skip
    assert all(0 <= wait <= seconds for _, wait, seconds in waits)
    assert [w for _, w, _ in waits] == sorted(w for _, w, _ in waits)
    saved = load_checkpoint(out / "ckpt-2.pt", "train")["loader_wait_seconds"]
    (at_2,) = [w for step, w, _ in waits if step == 2]
    assert at_2 == saved  # logged at step 2, then saved with no batch asked for in between
    (resume,) = [r for r in resumed if r["step"] == 3 and "start/first_step_seconds" in r]
    assert resume["loader_wait_seconds"] >= saved + resume["start/first_batch_seconds"] - 1e-9
    # of the waits, the device's stalls (on the CPU the step is synchronous: nearly all of
    # them), cumulative too, saved with the checkpoint and counted on by the resumed start
    stalls = [(r["step"], r["loader_stall_seconds"], r["loader_wait_seconds"]) for r in resumed
              if "train/total" in r]  # fmt: skip
    assert all(0 < stall <= wait for _, stall, wait in stalls)
    assert [s for _, s, _ in stalls] == sorted(s for _, s, _ in stalls)
    saved = load_checkpoint(out / "ckpt-2.pt", "train")["loader_stall_seconds"]
    assert [s for step, s, _ in stalls if step == 2] == [saved]
    assert next(s for step, s, _ in stalls if step == 3) > saved  # its first batch's wait
    # the resumed steps are the same steps, bit for bit
    train_ref = [r["train/total"] for r in reference if "train/total" in r]
    assert [r["train/total"] for r in resumed if "train/total" in r] == train_ref
    assert read_jsonl(out / "batches-rank0.jsonl") == read_jsonl(run / "batches-rank0.jsonl")
    a = load_checkpoint(run / "checkpoint.pt", "train")["models"]
    b = load_checkpoint(out / "checkpoint.pt", "train")["models"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
