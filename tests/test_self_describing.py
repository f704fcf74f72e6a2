"""Self-description: the zarr store carries its attributes and dimension names (readable with
plain zarr, no manifest), written deterministically; zarr is opened without v2 probes; a run
directory holds its resolved config.yaml, which reruns and resumes the run."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from helpers import TRAIN, manifest_of, run_tool, serve_hostile, tiny_codec_checkpoint
from test_train import build, config
from zarr.storage import WrapperStore

import pipeline.formats.zarr as zarr_format
from pipeline.config import from_dict, load_config
from pipeline.formats.zarr import ZarrWriter
from pipeline.query_codec import Slot, decode_sets
from pipeline.records import layer_schema
from pipeline.shards import open_shards
from ups.models.checkpoint import load_checkpoint
from ups.training.train import TrainConfig, Trainer, train

V2_NAMES = {".zarray", ".zattrs", ".zgroup", ".zmetadata"}
IDS = {"snapshot_id", "trajectory", "time"}


def file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_describes(out: Path) -> None:
    """The store's attributes and dimension names, read with plain zarr, say what the manifest says."""
    manifest = manifest_of(out)
    root = zarr.open_group(str(out / "zarr"), mode="r")
    described = root.attrs["ups_shards"]
    data = {k: v for k, v in manifest["data"].items() if k != "path"}
    assert described == {
        "schema_version": manifest["schema_version"],
        "sample_set_id": manifest["sample_set_id"],
        "build_id": manifest["build_id"],
        "data": data,
        "epochs": manifest["epochs"],
        "k_per_epoch": manifest["k_per_epoch"],
        "query_slots": manifest["query_slots"],
        "sampler": manifest["config"]["sampler"],
        "schedule": manifest["config"]["schedule"],
        "seed": manifest["config"]["seed"],
        "trajectories_per_shard": manifest["config"]["trajectories_per_shard"],
        "latent": manifest["latent"],
    }
    grid = manifest["data"]["grid"]
    axes = ("x", "y", "z")[: len(grid)]
    for split, entry in manifest["splits"].items():
        group = root[split]
        assert dict(group.attrs) == {
            "trajectories": entry["trajectories"],
            "snapshots_per_trajectory": entry["snapshots_per_trajectory"],
            "num_snapshots": entry["num_snapshots"],
        }
        expected = {
            **{name: ("snapshot",) for name in IDS},
            "fields": ("snapshot", "channel", *axes),
            "importance": ("snapshot", "point"),
            "queries": ("snapshot", "byte"),
            "pi_scale": ("snapshot", "epoch", "scale"),
        }
        if manifest["latent"] is not None:
            expected["latent"] = ("snapshot", "token", "feature")
        assert {name: group[name].metadata.dimension_names for name in expected} == expected
        assert sorted(group.array_keys()) == sorted(expected)
        # the named axes have the sizes the attributes give
        assert group["fields"].shape == (entry["num_snapshots"], len(data["channels"]), *grid)
        assert group["pi_scale"].shape[1] == len(described["k_per_epoch"])
    # a query set decodes from the store alone: its slots and k are in the attributes
    n, k = int(np.prod(grid)), described["k_per_epoch"][0]
    slot = from_dict(Slot, described["query_slots"][0])
    [held] = decode_sets(root["train"]["queries"][3:4, slot.rows], n, k, slot, "test")
    assert len(np.unique(held)) == k and held.max() < n


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("self-describing")


@pytest.fixture(scope="module")
def fields_1d(work: Path, burgers_file: Path) -> Path:
    return build(burgers_file, work / "fields")


def test_zarr_store_describes_itself_1d(fields_1d):
    assert_describes(fields_1d)


def test_zarr_store_describes_itself_2d_with_latents(work, ns_file):
    codec = tiny_codec_checkpoint(ns_file, work / "ns-codec.pt")
    out = build(ns_file, work / "ns", encoder=codec, epochs=2)
    assert_describes(out)
    root = zarr.open_group(str(out / "zarr"), mode="r")
    assert root.attrs["ups_shards"]["latent"] == {"tokens": 8, "dim": 16, "dtype": "float32"}
    assert root["train"]["fields"].metadata.dimension_names == ("snapshot", "channel", "x", "y")


def test_xarray_reads_the_dimension_names(fields_1d):
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(str(fields_1d / "zarr"), group="train", consolidated=False, zarr_format=3)
    assert ds["fields"].dims == ("snapshot", "channel", "x")
    assert ds["queries"].dims == ("snapshot", "byte")
    assert ds.attrs["num_snapshots"] == ds.sizes["snapshot"]


def test_rebuild_and_another_directory_change_no_byte(work, burgers_file):
    out = build(burgers_file, work / "again")
    before = file_hashes(out)
    build(burgers_file, out)
    assert file_hashes(out) == before
    # nothing in zarr.json depends on where the set was written (no paths, no times)
    other = build(burgers_file, work / "elsewhere")
    metadata = {name: h for name, h in before.items() if name.endswith("zarr.json")}
    assert metadata and {name: file_hashes(other)[name] for name in metadata} == metadata


def test_layer_arrays_have_dimension_names_and_no_attributes(tmp_path):
    """The layer writer (pipeline/layers.py) creates its store without attributes."""
    writer = ZarrWriter(tmp_path, layer_schema((8, 4), [8, 16]), chunk=5)
    writer.create({"train": 10})
    group = zarr.open_group(str(tmp_path / "zarr"), mode="r")
    assert dict(group.attrs) == {} and dict(group["train"].attrs) == {}
    names = {
        name: group["train"][name].metadata.dimension_names for name in layer_schema((8,), [1])
    }
    assert names == {
        **{name: ("snapshot",) for name in IDS},
        "error": ("snapshot", "point"),
        "importance": ("snapshot", "point"),
        "queries": ("snapshot", "byte"),
        "pi_scale": ("snapshot", "epoch", "scale"),
    }


KEYS: list[str] = []  # every key a RecordingStore was asked for


class RecordingStore(WrapperStore):
    """Records every key zarr asks the store for."""

    def _with_store(self, store):
        return type(self)(store)

    async def get(self, key, prototype, byte_range=None):
        KEYS.append(key)
        return await super().get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        KEYS.extend(key for key, _ in key_ranges)
        return await super().get_partial_values(prototype, key_ranges)

    async def exists(self, key):
        KEYS.append(key)
        return await super().exists(key)


def test_no_zarr_v2_metadata_is_probed(burgers_file, tmp_path, monkeypatch):
    """Building and reading ask for zarr.json and chunks only, never .zarray/.zattrs/.zgroup/
    .zmetadata (each would be a 404 request on a remote set)."""
    store = zarr_format.zarr_store
    monkeypatch.setattr(zarr_format, "zarr_store", lambda *a, **k: RecordingStore(store(*a, **k)))
    KEYS.clear()
    out = build(burgers_file, tmp_path / "set")
    open_shards(str(out), "train", "zarr").read_shard(1)
    names = {key.rsplit("/", 1)[-1] for key in KEYS}
    assert "zarr.json" in names and not names & V2_NAMES
    # the same over HTTP: every request is for a listed file
    with serve_hostile(out) as server:
        open_shards(server.url, "train", "zarr").read_shard(1)
    requested = [path for path in server.requests if "/zarr/" in path]
    assert requested and not {path.rsplit("/", 1)[-1] for path in requested} & V2_NAMES
    listed = set(manifest_of(out)["files"])
    assert {path.split("/", 1)[1] for path in requested} <= listed


@pytest.mark.slow
def test_config_yaml_reloads_to_the_same_run_and_resumes(fields_1d, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = [
        "stage=codec",
        f"shards={fields_1d}",
        f"out={run}",
        "batch_size=8",
        "epochs=2",
        "checkpoint_every=2",
        "eval_every=1000",
        "tensorboard=false",
        "optim.grad_clip=inf",
    ]
    cfg = config(*args)
    # stop the run right after its first checkpoint, as a killed run would
    save = Trainer.save

    def save_then_stop(self, path):
        save(self, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    written = run / "config.yaml"
    assert load_config(TrainConfig, written) == cfg
    saved = yaml.safe_load(written.read_text())
    assert list(saved) == list(cfg.__dataclass_fields__)  # in the config's order
    assert saved["resume"] is None and saved["overwrite"] is False  # as given
    assert saved["device"] == "cpu" and saved["codec"]["encoder"]["dim"] == 32  # SMALL_MODEL's

    ckpt = run / "checkpoint.pt"
    stopped_at = load_checkpoint(ckpt, "train")["step"]
    resumed = run_tool(TRAIN, "--config", written, f"resume={ckpt}", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert 0 < stopped_at < load_checkpoint(ckpt, "train")["step"]  # it went on
    assert (run / "codec.pt").exists() and (run / "test_metrics.json").exists()
    # the resumed run's config.yaml is its own: resume as it was given
    assert load_config(TrainConfig, written) == dataclasses.replace(cfg, resume=str(ckpt))
