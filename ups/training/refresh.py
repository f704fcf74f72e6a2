"""An error-based refresh from a training checkpoint, outside training: one new layer of
adaptive query sets for a range of epochs (ups/adaptive.py, pipeline/layers.py).

The checkpoint must be a training run's on this very shard set (its ``manifest_id``): its
config rebuilds the models, its weights give the error, and its loss weights define it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from pipeline.config import ConfigError, check, from_dict
from pipeline.layers import LayerRequest
from pipeline.samplers import ErrorImportance
from pipeline.shards import open_shards
from ups.adaptive import PointError, error_definition, model_entry, refresh
from ups.models.checkpoint import CheckpointError, load_checkpoint
from ups.training.train import TrainConfig, batch_spec, build_models, valid_device


@dataclass
class RefreshConfig:
    shards: str = ""  # path of a local shard set (layers are written beside it)
    checkpoint: str = ""  # a training run's checkpoint.pt on this shard set
    epochs: str = ""  # A:B, the epochs [A, B) whose sets the layer replaces
    adaptive: ErrorImportance = field(default_factory=ErrorImportance)  # error -> q
    layer: str | None = "latest"  # the chain to extend: "latest", a layer id, or null (the set)
    batch: int = 64  # snapshots per dense forward pass
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    format: Literal["auto", "zarr", "wds"] = "auto"  # which files to read (a layer has all)
    progress: bool = True

    def __post_init__(self) -> None:
        check(bool(self.shards), "shards", "a shard set's path", self.shards)
        check(bool(self.checkpoint), "checkpoint", "a training checkpoint", self.checkpoint)
        check(
            re.fullmatch(r"\d+:\d+", self.epochs) is not None,
            "epochs",
            "A:B, the epochs [A, B) to refresh",
            self.epochs,
        )
        check(self.batch >= 1, "batch", "an integer >= 1", self.batch)
        check(valid_device(self.device), "device", "auto, cpu, cuda or cuda:N", self.device)

    @property
    def epoch_range(self) -> tuple[int, int]:
        first, stop = self.epochs.split(":")
        return int(first), int(stop)


def _device(option: str) -> torch.device:
    if option == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(option)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"option 'device': {option!r}, but no CUDA device is available")
    return device


def refresh_from_checkpoint(cfg: RefreshConfig) -> str:
    """Write the layer ``cfg`` asks for; returns its id."""
    device = _device(cfg.device)
    shards = open_shards(cfg.shards, "train", cfg.format, layer=cfg.layer)
    ckpt = load_checkpoint(cfg.checkpoint, "train")
    run = from_dict(TrainConfig, ckpt["config"], "config")
    if run.stage == "operator" and shards.manifest.latent is None:
        raise ConfigError(
            f"{cfg.shards}: field-only shards hold no latents; an operator-stage refresh needs the "
            "latent shards the operator was trained on"
        )
    if ckpt.get("manifest_id") != shards.manifest_id:
        raise CheckpointError(
            f"checkpoint {cfg.checkpoint}: trained on another shard set (manifest_id "
            f"{str(ckpt.get('manifest_id'))[:12]}, {cfg.shards} is {shards.manifest_id[:12]}); "
            "refresh the set its run trained on"
        )
    models, _ = build_models(run, shards)  # operator: refuses a codec other than the shards'
    models.load_state_dict(ckpt["models"])
    models.to(device).eval()
    w = run.loss
    definition = error_definition(run.stage, w.forward, w.inverse, batch_spec(run).window)
    request = LayerRequest(
        epochs=cfg.epoch_range,
        model=model_entry(models, run.stage, int(ckpt["step"])),
        error=definition,
        importance=cfg.adaptive,
        checkpoint=cfg.checkpoint,
    )
    if shards.layers and _same_request(shards.layers[-1].record, request):
        return shards.layer_ids[-1]  # the same refresh again: the layer is there already
    error_of = PointError(
        models.codec, models.operator, shards, definition, device, cfg.batch, cfg.amp
    )
    return refresh(shards, error_of, request, device, progress=cfg.progress).layer_id


def _same_request(record, request: LayerRequest) -> bool:
    """True when layer ``record`` was made by ``request`` (the same model, error, importance
    and epochs): a rerun of a finished refresh adds no second, identical layer on top."""
    return (
        tuple(record.epochs) == tuple(request.epochs)
        and record.model == request.model
        and record.error == request.error
        and record.importance == request.importance
    )
