"""One readable training loop for both stages, streaming from shards.

* ``stage=codec``: GridEncoder + AnyPointDecoder. The encoder reads the full grid; the decoder's
  loss is evaluated at the epoch's precomputed query points (or densely, or on points drawn on
  the fly inside the loss -- ``loss.mode``), importance-weighted.
* ``stage=operator``: LatentOperator + decoder fine-tuning from cached latents (frozen encoder):
  latent one-step (and optional rollout) loss + forward physical loss at u_{t+1}'s query points
  + inverse-encoding loss at u_t's query points.

``adaptive.refresh_every=R`` refreshes the query sets from the model's own error every R epochs
(ups/adaptive.py): every rank writes its share of a new layer of sets for epochs [a, a + R),
a = R, 2R, ..., one epoch ahead, at the start of epoch a - 1, and the loader streams on from it.
The chain of layers a run reads is in its checkpoints; a resume reads the same chain or refuses.

Runs on one process or under ``torchrun`` (DDP: NCCL on GPUs, gloo on CPUs; ``batch_size`` is
the global batch, each rank streams its equal share of it; only rank 0 writes). Checkpoints hold
the models, optimizer, scheduler, step, the loader's position in global batches, the on-the-fly
sampling RNG, and the shard set's identity; ``resume=PATH`` continues exactly where the run
stopped and refuses other shards. The global batches do not depend on the number of ranks, so a
run resumes on any world size that divides ``loader.partitions`` (an elastic resume).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm

from pipeline.collate import SparseBatch
from pipeline.config import ConfigError, check, config_diff, to_dict, with_defaults, without_keys
from pipeline.layers import LayerRequest
from pipeline.loader import BatchSpec, LoaderConfig, ShardLoader
from pipeline.records import ShardError
from pipeline.shards import ShardSet, open_shards
from pipeline.sources.pdebench import DataInfo
from pipeline.sources.splits import NormStats
from pipeline.storage import file_sha256, named_os_errors, write_atomic
from ups.adaptive import AdaptiveConfig, PointError, error_definition, model_entry, refresh
from ups.evaluation import HORIZONS, evaluate
from ups.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ups.models.codec import Codec, CodecConfig, load_codec, save_codec
from ups.models.operator import LatentOperator, OperatorConfig
from ups.training.losses import (
    check_query_sample_ratio,
    forward_physical_loss,
    inverse_encoding_loss,
    latent_one_step_loss,
    latent_rollout_loss,
    sample_in_loss,
)


@dataclass
class LossConfig:
    # sparse: the shards' precomputed query sets; dense: every grid point; on_the_fly: a uniform
    # subset drawn inside the loss (query_sample_ratio)
    mode: Literal["sparse", "dense", "on_the_fly"] = "sparse"
    query_sample_ratio: float = 1.0  # on_the_fly: uniform share of points drawn inside the loss
    latent: float = 1.0  # operator: latent one-step loss weight
    forward: float = 1.0  # operator: forward physical loss weight (decode predicted z_{t+1})
    inverse: float = 0.5  # operator: inverse-encoding loss weight (decode z_t)
    rollout_steps: int = 0  # operator: extra latent rollout loss over this many steps (0 = off)
    rollout: float = 0.5  # its weight

    def __post_init__(self) -> None:
        check_query_sample_ratio(self.query_sample_ratio)
        check(self.rollout_steps >= 0, "loss.rollout_steps", "an integer >= 0", self.rollout_steps)
        for name in ("latent", "forward", "inverse", "rollout"):
            value = getattr(self, name)
            check(
                math.isfinite(value) and value >= 0,
                f"loss.{name}",
                "a finite weight >= 0",
                value,
            )


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check(math.isfinite(self.lr) and self.lr > 0, "optim.lr", "a finite number > 0", self.lr)
        check(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            "optim.weight_decay",
            "a finite number >= 0",
            self.weight_decay,
        )
        check(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)
        check(
            0 <= self.min_lr_ratio <= 1,
            "optim.min_lr_ratio",
            "a number in [0, 1]",
            self.min_lr_ratio,
        )
        # inf is allowed: no clipping; a negative norm would flip the gradients (ascent)
        check(
            self.grad_clip > 0, "optim.grad_clip", "a number > 0 (inf: no clipping)", self.grad_clip
        )


@dataclass
class TrainConfig:
    stage: Literal["codec", "operator"] = "codec"
    shards: str = "shards/burgers1d-fields"  # path or URL of a shard set
    out: str = "runs/codec"
    codec: CodecConfig = field(default_factory=CodecConfig)  # stage=codec: the model to train
    codec_checkpoint: str | None = None  # stage=operator: the trained codec the latents came from
    operator: OperatorConfig = field(default_factory=OperatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)  # error-based refreshes
    # layers of adaptive sets read from the start: null (the set's own sets), "latest", or an id
    layer: str | None = None
    epochs: int | None = None  # None: as many as the shards have query sets
    batch_size: int = 32  # examples per step over all ranks (each takes batch_size / world size)
    max_steps: int = 0  # stop early after this many steps (0: all epochs)
    seed: int = 0  # model init and on-the-fly sampling; data order is loader.seed, query sets come from the shards
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    compile: bool = False
    # torch.compile's mode: "reduce-overhead" replays the step's graphs as CUDA graphs (one
    # launch instead of hundreds: the sparse step is launch-bound, docs/benchmarks.md)
    compile_mode: Literal["default", "reduce-overhead"] = "default"
    log_every: int = 10
    eval_every: int = 0  # steps between validations; 0: at the end of every epoch
    eval_trajectories: int = 8  # validation trajectories per evaluation
    # rollout horizons of each validation (the test always reports HORIZONS, 1, 4 and 16): [1]
    # halves the dense decodes of a validation, for runs that only follow the one-step error
    eval_horizons: tuple[int, ...] = HORIZONS
    # each validation also decodes every snapshot's reconstruction (val/recon_nrmse); false
    # skips those decodes in the operator stage, about half of a one-step validation's work
    eval_reconstruction: bool = True
    checkpoint_every: int = 0  # steps between checkpoints; 0: at the end of every epoch
    resume: str | None = None
    overwrite: bool = False  # allow an ``out`` that already holds a run (without resume)
    tensorboard: bool = True  # also write metrics as TensorBoard events under out/tb
    # every rank writes each batch's snapshot ids and query hash to batches-rank{r}.jsonl:
    log_batches: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check(
            self.epochs is None or self.epochs >= 1,
            "epochs",
            "null or an integer >= 1",
            self.epochs,
        )
        check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        check(
            self.batch_size % self.loader.partitions == 0,
            "batch_size",
            f"a multiple of loader.partitions={self.loader.partitions} (each global batch takes "
            "as many examples from every partition)",
            self.batch_size,
        )
        check(bool(self.shards), "shards", "a shard set's path or URL", self.shards)
        check(bool(self.out), "out", "a directory", self.out)
        check(self.max_steps >= 0, "max_steps", "an integer >= 0 (0: all epochs)", self.max_steps)
        check(0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32)", self.seed)
        check(self.log_every >= 1, "log_every", "an integer >= 1", self.log_every)
        check(
            self.eval_every >= 0, "eval_every", "an integer >= 0 (0: every epoch)", self.eval_every
        )
        check(
            self.eval_trajectories >= 1,
            "eval_trajectories",
            "an integer >= 1",
            self.eval_trajectories,
        )
        check(
            len(self.eval_horizons) >= 1 and all(h >= 1 for h in self.eval_horizons),
            "eval_horizons",
            "a list of integers >= 1, such as [1, 4, 16]",
            self.eval_horizons,
        )
        check(
            self.checkpoint_every >= 0,
            "checkpoint_every",
            "an integer >= 0 (0: every epoch)",
            self.checkpoint_every,
        )
        check(
            self.resume is None or bool(self.resume), "resume", "null or a checkpoint", self.resume
        )
        check(valid_device(self.device), "device", "auto, cpu, cuda or cuda:N", self.device)
        w = self.loss
        weights = {"latent": w.latent, "forward": w.forward, "inverse": w.inverse}
        if w.rollout_steps:
            weights["rollout"] = w.rollout
        check(
            self.stage == "codec" or sum(weights.values()) > 0,
            "loss",
            "a positive weight on at least one loss term for stage=operator",
            weights,
        )
        check(
            self.stage == "operator" or self.eval_reconstruction,
            "eval_reconstruction",
            "true for stage=codec (reconstruction is what its validations measure)",
            self.eval_reconstruction,
        )
        check(
            self.stage == "codec" or self.codec_checkpoint is not None,
            "codec_checkpoint",
            "a codec checkpoint for stage=operator",
            None,
        )
        check(
            self.loss.mode == "on_the_fly" or self.loss.query_sample_ratio == 1.0,
            "loss.query_sample_ratio",
            "1.0 unless loss.mode=on_the_fly",
            self.loss.query_sample_ratio,
        )
        refreshes = self.adaptive.refresh_every > 0
        check(
            not refreshes or self.loss.mode == "sparse",
            "adaptive.refresh_every",
            "0 unless loss.mode=sparse (refreshes replace the shards' query sets)",
            self.adaptive.refresh_every,
        )
        check(
            not refreshes or not self.loader.wrap_epochs,
            "adaptive.refresh_every",
            "0 with loader.wrap_epochs=true (a layer replaces the sets of stored epochs)",
            self.adaptive.refresh_every,
        )


# Options that may differ between a run and its resume, because none of them changes a batch,
# the on-the-fly sampling, the model or an optimisation step: resuming with them changed still
# continues the run bit for bit. Every other option must match the checkpoint's; among them
# loader.seed, loader.partitions and loader.shuffle_shards (the data order), batch_size, epochs and
# max_steps (the global batches and the length of the LR schedule), optim.* and loss.*, stage, codec and
# operator (the models), amp and compile (other kernels, other numerics), and seed (it no
# longer changes anything after the start, but the run's config would then misdescribe its init).
RESUME_MAY_CHANGE = frozenset(
    {
        # where the run writes and what it continues from
        "out",
        "resume",
        "overwrite",
        # what is reported, not what is computed
        "progress",
        "tensorboard",
        "log_every",
        "log_batches",
        # validation reads other shards in eval mode under no_grad and draws no random numbers
        "eval_every",
        "eval_trajectories",
        "eval_horizons",
        "eval_reconstruction",
        # saving reads the state and changes none of it
        "checkpoint_every",
        # the string only: the device type must match (checked apart), cuda:0 for cuda:1 is fine
        "device",
        # the location only: _identity checks that it is the same shard set (moved, or over http)
        "shards",
        # the path only: build_models checks that its sha256 is the shards' encoder's, and the
        # trained weights come from the checkpoint
        "codec_checkpoint",
        # pipeline/loader_config.py: none of these changes the batches (workers collate whole
        # batches in order, in threads or in the loader process)
        "loader.workers",
        "loader.prefetch",
        "loader.read_threads",
        "loader.read_ahead",
        "loader.cache_mb",
        "loader.process",
        # timeouts and retries of remote reads: a retried read returns the same verified bytes
        "loader.remote",
        # zarr and tars hold the same arrays of the same shards (tests/test_build_shards.py)
        "loader.format",
        # matters only for epochs beyond the precomputed query sets: with epochs and max_steps
        # fixed, turning it off where it is needed fails at the start, turning it on changes nothing
        "loader.wrap_epochs",
    }
)


# ---------------------------------------------------------------- setup


def _short(ids: list[str]) -> list[str]:
    return [i[:12] for i in ids]


def valid_device(device: str) -> bool:
    """``auto``, or a device string torch parses (cpu, cuda, cuda:1, ...)."""
    if device == "auto":
        return True
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        return False
    return True


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise ConfigError(f"option 'device': {device!r}, but no CUDA device is available")
    if cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu" if device == "auto" else device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, dev


def batch_spec(cfg: TrainConfig) -> BatchSpec:
    """What the stage's losses read from each batch (docs/design.md, section 7).

    codec: single snapshots, the full fields (encoder input) and, for sparse losses, the epoch's
    query points. operator: windows of cached latents (pairs, or rollout windows), and for the
    decoder losses u_t and u_{t+1} at the epoch's query points -- or their full fields when the
    loss is dense or draws its points on the fly.
    """
    sparse = cfg.loss.mode == "sparse"
    if cfg.stage == "codec":
        return BatchSpec(window=0, sparse_steps=(0,) if sparse else (), dense_steps=(0,))
    return BatchSpec(
        window=max(1, cfg.loss.rollout_steps),
        sparse_steps=(0, 1) if sparse else (),
        dense_steps=() if sparse else (0, 1),
        latents=True,
    )


def param_groups(models: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices and embeddings (>= 2 dimensions), none on
    biases, norm scales and other vectors, whose decay only shrinks them towards zero."""
    params = [p for p in models.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def lr_lambda(cfg: OptimConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Models(nn.Module):
    """What a stage trains, in one module so DDP and the optimizer see one parameter set.

    Its forward is the stage's loss, so DDP wraps the whole step (gradients of every rank are
    averaged in backward) and ``torch.compile`` sees one graph.
    """

    def __init__(self, codec: Codec, operator: LatentOperator | None):
        super().__init__()
        self.codec, self.operator = codec, operator

    def forward(self, batch, cfg: TrainConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return compute_losses(self, batch, cfg, gen)


def build_models(cfg: TrainConfig, shards: ShardSet) -> tuple[Models, NormStats]:
    info = shards.manifest.data_info(shards.split)
    norm = shards.manifest.data.norm
    if cfg.stage == "codec":
        return Models(Codec(cfg.codec, info), None), norm
    encoder = shards.manifest.encoder
    if encoder is None:
        raise CheckpointError(
            f"{shards.location}: field-only shards (no latents); stage=operator needs shards built with encoder=..."
        )
    latent = shards.manifest.latent
    assert latent is not None  # the manifest has both an encoder and a latent, or neither
    checkpoint = cfg.codec_checkpoint
    assert checkpoint is not None  # TrainConfig requires it for stage=operator
    if file_sha256(checkpoint) != encoder.sha256:
        raise CheckpointError(
            f"checkpoint {cfg.codec_checkpoint}: its sha256 differs from the encoder the shards were built with ({encoder.path})"
        )
    codec, norm, _ = load_codec(checkpoint, info)
    codec.encoder.requires_grad_(False)  # frozen: the cached latents came from it
    operator = LatentOperator(
        cfg.operator, latent.dim, latent.tokens, len(info.params), coord_dim=len(info.grid)
    )
    return Models(codec, operator), norm


# ---------------------------------------------------------------- the loss of one batch


def compute_losses(
    models: Models, batch, cfg: TrainConfig, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Every loss term of the stage; ``total`` is their weighted sum."""
    codec, mode = models.codec, cfg.loss.mode

    def points(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(coords, targets, weights) of window position ``step`` for the configured loss mode."""
        if mode == "sparse":
            suffix = "" if step == 0 else "_next"
            return (
                getattr(batch, f"coords{suffix}"),
                getattr(batch, f"targets{suffix}"),
                getattr(batch, f"weights{suffix}"),
            )
        fields = batch.fields if step == 0 else batch.fields_next
        coords = codec.grid_coords.expand(fields.shape[0], -1, -1)  # (B, N, d)
        targets = fields.flatten(2).transpose(1, 2)  # (B, C, *grid) -> (B, N, C)
        if mode == "on_the_fly":
            coords, targets = sample_in_loss(coords, targets, cfg.loss.query_sample_ratio, gen)
        return coords, targets, None

    if cfg.stage == "codec":
        z = codec.encode(batch.fields)
        loss = inverse_encoding_loss(codec.decoder, z, *points(0))
        return {"total": loss, "reconstruction": loss}
    w, operator = cfg.loss, models.operator
    assert operator is not None  # build_models makes one for stage=operator
    z_pred = operator(batch.z, batch.dt, batch.params)
    terms = {"latent": latent_one_step_loss(z_pred, batch.z_next[:, 0])}
    if w.forward:  # a zero weight skips the term's work, not just its gradient
        terms["forward"] = forward_physical_loss(codec.decoder, z_pred, *points(1))
    if w.inverse:
        terms["inverse"] = inverse_encoding_loss(codec.decoder, batch.z, *points(0))
    if w.rollout_steps > 0:
        window = torch.cat([batch.z[:, None], batch.z_next], dim=1)  # (B, h+1, T, D)
        terms["rollout"] = latent_rollout_loss(operator, window, batch.dt, batch.params)
    weight = {"latent": w.latent, "forward": w.forward, "inverse": w.inverse, "rollout": w.rollout}
    total = functools.reduce(torch.add, (weight[name] * value for name, value in terms.items()))
    return {"total": total, **terms}


# ---------------------------------------------------------------- the run


class PendingLog:
    """A training record whose losses are still on their way from the device.

    Reading a CUDA tensor on the host waits for every step queued before it: at each log line
    the GPU would run dry and wait for the host to queue the next step. So the values are
    copied to pinned host memory behind the step, and the record is written at the next log
    line (or the next synchronisation), when that copy has long finished."""

    def __init__(
        self, record: dict[str, Any], names: list[str], values: torch.Tensor, device: torch.device
    ):
        self._record, self._names = record, names
        self._copied: torch.cuda.Event | None = None
        if device.type == "cuda":
            self._values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._values.copy_(values, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(device))
        else:
            self._values = values

    def record(self) -> dict[str, Any]:
        """The record with its values (waiting for their copy if it has not finished)."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._record | dict(zip(self._names, self._values.tolist(), strict=True))


class Trainer:
    _clock: float  # perf_counter() when train_seconds last resumed counting (set by train())
    _first_step_seconds: float | None = None  # this start's first step, until it is logged
    _first_batch_seconds: float | None = None  # the wait for this start's first batch, likewise
    _pending_log: PendingLog | None = None  # the last training record, its values in transit
    _bar: tqdm  # the progress bar of fit()
    # (limit, trajectories, info) of the validation split, read at the first validation
    _val_data: tuple[int | None, list[np.ndarray], DataInfo] | None = None

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed(cfg.device)
        torch.manual_seed(cfg.seed)
        self.out = Path(cfg.out)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"option 'out': expected a directory, got {cfg.out!r}, a file")
        self.shards = open_shards(
            cfg.shards, "train", cfg.loader.format, remote=cfg.loader.remote, layer=cfg.layer
        )
        self.initial_layers = self.shards.layer_ids  # read from the start; refreshes add more
        self._check_eval_splits()
        self.models, self.norm = build_models(cfg, self.shards)
        self.models.to(self.device)
        self.loader = ShardLoader(
            self.shards,
            cfg.loader,
            batch_size=cfg.batch_size,
            spec=batch_spec(cfg),
            rank=self.rank,
            world_size=self.world,
            device=self.device,
        )
        epochs = cfg.epochs or self.shards.epochs
        self.total_steps = epochs * self.loader.batches_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        last_epoch = (self.total_steps - 1) // self.loader.batches_per_epoch
        self.shards.k_for_epoch(
            last_epoch, cfg.loader.wrap_epochs
        )  # epochs beyond the query sets: fail now
        self.optimizer = torch.optim.AdamW(  # fused: one kernel per step on a GPU
            param_groups(self.models, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            fused=self.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.optim, self.total_steps)
        )
        self.gen = torch.Generator(self.device).manual_seed(cfg.seed * 1000 + self.rank)
        self.step, self.train_seconds, self.refresh_seconds = 0, 0.0, 0.0
        # the training thread's waits for its next batch: the loader's share of train_seconds;
        # of them, the device's time without work because of the loader (earlier starts' here)
        self.loader_wait_seconds, self._stall_before = 0.0, 0.0
        self._await_refreshes()
        if not cfg.resume and not cfg.overwrite and (self.out / "checkpoint.pt").exists():
            raise CheckpointError(
                f"{self.out} already holds a run; pass resume={self.out / 'checkpoint.pt'} to continue it, or overwrite=true"
            )
        if cfg.overwrite:
            (self.out / f"batches-rank{self.rank}.jsonl").unlink(missing_ok=True)
            if self.rank == 0:
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
        if cfg.resume:
            self._resume(cfg.resume)
            self._await_refreshes()
        if cfg.compile:
            self.models.compile(mode=cfg.compile_mode)
        # a refresh's error pass decodes every training snapshot densely: compiled with the
        # step, 2.2x faster on an H200 (docs/bench_dense_decode.md); one wrapper for the run,
        # so that every refresh reuses its compiled graphs
        self.dense_decode = (
            torch.compile(self.models.codec.decode_grid)
            if cfg.compile
            else self.models.codec.decode_grid
        )
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if cfg.amp and self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        self.step_fn = (
            nn.parallel.DistributedDataParallel(
                self.models, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if self.world > 1
            else self.models
        )

    def _check_eval_splits(self) -> None:
        """Fail before training when the shard set lacks the splits the run evaluates on."""
        splits = self.shards.manifest.splits
        for split, use in (("val", "validation"), ("test", "the final test")):
            if split not in splits or not splits[split].trajectories:
                raise ShardError(
                    f"{self.shards.location}: no '{split}' split (it has {sorted(splits)}); "
                    f"training needs it for {use}: rebuild with splits including '{split}'"
                )

    # -- adaptive refreshes
    def _await_refreshes(self) -> None:
        """The epochs whose sets a refresh of this run is still to write: the loader waits for
        their layers instead of reading the sets below them."""
        every = self.cfg.adaptive.refresh_every
        if not every:
            return
        per_epoch = self.loader.batches_per_epoch
        last = (self.total_steps - 1) // per_epoch
        refreshed = {
            layer.record.epochs[0] for layer in self.shards.layers[len(self.initial_layers) :]
        }
        due = [e for e in range(every, last + 1, every) if e not in refreshed]
        self.shards.await_layers(due)

    def _refresh_if_due(self, writer) -> None:
        """Compute the next awaited layer one epoch ahead: the sets of epochs [a, a + R) at the
        start of epoch a - 1, from the model then. The loader process then reads and prepares
        epoch a's first groups while epoch a - 1 trains; computed at a's own start, the GPU
        waited for them after every refresh. A run resumed past that point computes it now."""
        awaiting = self.shards.awaiting
        if not awaiting or self.step < (awaiting[0] - 1) * self.loader.batches_per_epoch:
            return
        epoch = awaiting[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_seconds += time.perf_counter() - self._clock
        self._write_pending_log(writer)
        start = time.perf_counter()
        cfg, w = self.cfg, self.cfg.loss
        stop = min(epoch + cfg.adaptive.refresh_every, self.shards.epochs)
        definition = error_definition(cfg.stage, w.forward, w.inverse, batch_spec(cfg).window)
        request = LayerRequest(
            epochs=(epoch, stop),
            model=model_entry(self.models, cfg.stage, self.step),
            error=definition,
            importance=cfg.adaptive.importance(),
        )
        error_of = PointError(
            self.models.codec,
            self.models.operator,
            self.shards,
            definition,
            self.device,
            cfg.adaptive.batch,
            cfg.amp,
            self.dense_decode,
        )
        self.models.eval()
        try:
            refreshed = refresh(
                self.shards, error_of, request, self.device, self.rank, self.world, cfg.progress
            )
        finally:
            self.models.train()
        self.loader.add_layer(refreshed.layer_id)
        seconds = time.perf_counter() - start
        self.refresh_seconds += seconds
        self.train_seconds += seconds  # part of the run's wall-clock
        now = self.step // self.loader.batches_per_epoch  # the epoch whose time it takes
        record = {"step": self.step, "epoch": now, "train_seconds": self.train_seconds}
        self._log(
            {
                **record,
                "refresh/seconds": seconds,
                "refresh/total_seconds": self.refresh_seconds,
                "refresh/layer": refreshed.layer_id,
                "refresh/epochs": [epoch, stop],
                # read (waiting), error, plan; write: summed over the writer threads
                **{f"refresh/{k}_seconds": v for k, v in sorted(refreshed.seconds.items())},
            },
            writer,
        )
        self._clock = time.perf_counter()

    # -- checkpoints
    def _identity(self) -> dict[str, str]:
        return {
            "sample_set_id": self.shards.sample_set_id,
            "manifest_id": self.shards.manifest_id,
        }

    def save(self, path: Path) -> None:
        gens: list[torch.Tensor | None] = [self.gen.get_state()]
        if self.world > 1:
            gens = [None] * self.world
            dist.all_gather_object(gens, self.gen.get_state())
        if self.rank != 0:
            return
        payload = {
            "kind": "train",
            "config": to_dict(self.cfg),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "device_type": self.device.type,
            "models": self.models.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),  # every rank's: at the same global batch
            "generator": gens,
            "refresh_seconds": self.refresh_seconds,
            "loader_wait_seconds": self.loader_wait_seconds,
            "loader_stall_seconds": self._stall_seconds(),
            # the chain of layers read: those from the start, then this run's refreshes
            "layers": {
                "initial": self.initial_layers,
                "refreshed": self.shards.layer_ids[len(self.initial_layers) :],
            },
            **self._identity(),
        }
        save_checkpoint(path, payload)  # atomic: a full disk leaves the previous one intact

    def _resume(self, path: str) -> None:
        ckpt = load_checkpoint(path, "train")
        for key, value in self._identity().items():
            saved = ckpt.get(key)
            if saved != value:
                raise CheckpointError(
                    f"checkpoint {path}: made on other shards ({key} {str(saved)[:12]} != "
                    f"{value[:12]} of {self.cfg.shards}); resume on the shard set the run started "
                    "with (a checkpoint of an older version records no manifest_id)"
                )
        saved = with_defaults(ckpt["config"], to_dict(TrainConfig()))  # options added since
        diff = config_diff(
            without_keys(saved, RESUME_MAY_CHANGE),
            without_keys(to_dict(self.cfg), RESUME_MAY_CHANGE),
        )
        saved_device = ckpt["device_type"]
        if saved_device != self.device.type:
            diff.append(f"device (type): {saved_device!r} != {self.device.type!r}")
        if diff:
            raise CheckpointError(
                f"checkpoint {path}: resuming with other options than the run's would not continue "
                f"it exactly (saved != now): {'; '.join(diff)}. Only these may change on resume: "
                f"{', '.join(sorted(RESUME_MAY_CHANGE))}"
            )
        self._resume_layers(path, ckpt.get("layers", {"initial": [], "refreshed": []}))
        self.models.load_state_dict(ckpt["models"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.loader.load_state_dict(ckpt["loader"])
        self._resume_generator(ckpt["generator"], ckpt["step"])
        self.step, self.train_seconds = ckpt["step"], ckpt["train_seconds"]
        self.refresh_seconds = ckpt.get("refresh_seconds", 0.0)
        self.loader_wait_seconds = ckpt.get("loader_wait_seconds", 0.0)
        self._stall_before = ckpt.get("loader_stall_seconds", 0.0)
        self._truncate_logs()

    def _resume_generator(self, saved: list[torch.Tensor], step: int) -> None:
        """The on-the-fly sampling generator of this rank: as saved on the same world size; on
        another (an elastic resume) a fresh stream from (seed, step, rank). The global batches
        are the same either way, the on-the-fly points drawn in them then are not."""
        if len(saved) == self.world:
            self.gen.set_state(saved[self.rank])
        else:
            key = np.random.SeedSequence([self.cfg.seed, step, self.rank])
            self.gen.manual_seed(int(key.generate_state(1)[0]))

    def _resume_layers(self, path: str, layers: dict[str, list[str]]) -> None:
        """Read the chain of layers the run read: the same layers from the start (``layer``
        opens them again) and its own refreshes, each there and unchanged, or refuse."""
        # "latest" may now find the run's own refreshes too: the checkpoint says where it began
        if self.cfg.layer != "latest" and layers["initial"] != self.initial_layers:
            raise CheckpointError(
                f"checkpoint {path}: the run started on the layers {_short(layers['initial'])}, "
                f"layer={self.cfg.layer!r} now gives {_short(self.initial_layers)}; resume on the "
                "chain the run read (name its last layer with layer=ID)"
            )
        self.initial_layers = list(layers["initial"])
        chain = layers["initial"] + layers["refreshed"]
        try:
            self.shards.use_layers(chain)
        except ShardError as err:
            raise CheckpointError(
                f"checkpoint {path}: the run read the layers {_short(chain)}, which this shard "
                f"set no longer holds as they were ({err})"
            ) from None

    def _truncate_logs(self) -> None:
        """Drop the log records of steps after the checkpoint (a run killed after logging them):
        the resumed run writes them again. Rank 0 its metrics, every rank its batch log."""
        names = [f"batches-rank{self.rank}.jsonl"] + (["metrics.jsonl"] if self.rank == 0 else [])
        for name in names:
            path = self.out / name
            if not path.is_file():
                continue
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the kill
                    continue
                if not isinstance(record, dict) or record.get("step", 0) > self.step:
                    continue
                if not any(key.startswith("test/") for key in record):  # _test writes it again
                    kept.append(line + "\n")
            write_atomic(path, "".join(kept).encode())

    # -- logging
    def _log(self, record: dict[str, Any], writer) -> None:
        if self.rank != 0:
            return
        path = self.out / "metrics.jsonl"
        with named_os_errors(path), open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    writer.add_scalar(key, value, record["step"])

    def validate(
        self,
        split: str = "val",
        limit: int | None = None,
        horizons: Sequence[int] = HORIZONS,
        reconstruction: bool = True,
    ) -> dict[str, float]:
        trajectories, info = self._eval_data(split, limit)
        return evaluate(
            self.models.codec,
            self.norm,
            trajectories,
            info.dt,
            list(info.params.values()),
            self.models.operator,
            horizons=horizons,
            reconstruction=reconstruction,
            device=self.device,
        )

    def _eval_data(self, split: str, limit: int | None) -> tuple[Iterable[np.ndarray], DataInfo]:
        """The split's first ``limit`` trajectories, each (T, C, *grid), and its data info. The
        validation split's are read once and kept: a run validates every eval_every steps, and
        reading its shards again each time (every epoch's query sets with the fields, from a
        URL perhaps) cost a share of each evaluation. Other splits stream, one trajectory at a
        time (the test split is evaluated once, whole)."""
        if split == "val" and self._val_data is not None and self._val_data[0] == limit:
            return self._val_data[1:]
        shards = open_shards(
            self.cfg.shards, split, self.cfg.loader.format, remote=self.cfg.loader.remote
        )
        info = shards.manifest.data_info(split)
        if split != "val":
            return shards.trajectories(limit), info
        self._val_data = limit, list(shards.trajectories(limit)), info
        return self._val_data[1:]

    # -- the loop
    def fit(self) -> dict[str, float]:
        """Train to ``total_steps``, validating and checkpointing on the way; then test."""
        writer = self._open_writer()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"train {self.cfg.stage}",
            disable=not self.cfg.progress or self.rank != 0,
        )
        self._bar = bar
        self._seen, self._tick = 0, time.perf_counter()  # for samples/s between log lines
        self._clock = time.perf_counter()  # train_seconds counts the loop, not eval or checkpoints
        self.models.train()
        first_step = True  # this start's first step: its warm-up (with compile, compilation)
        try:
            while self.step < self.total_steps:
                self._refresh_if_due(writer)
                asked = time.perf_counter()
                for batch in self.loader:
                    tick = time.perf_counter()
                    self.loader_wait_seconds += tick - asked
                    terms, grad_norm = self._train_step(batch)
                    if first_step:  # logged with the next training record
                        self._first_step_seconds = time.perf_counter() - tick
                        self._first_batch_seconds = tick - asked  # the loader's start and fill
                        first_step = False
                    self._log_step(batch, terms, grad_norm, writer, bar)
                    bar.update(1)
                    self._checkpoint_and_validate(writer)
                    if self.step >= self.total_steps:
                        break
                    asked = time.perf_counter()
        finally:  # also on an error or Ctrl-C: the loader's threads or process end here
            bar.close()
            self.loader.close()
        return self._test(writer)

    def _stall_seconds(self) -> float:
        return self._stall_before + self.loader.stall_seconds

    def _train_step(self, batch: SparseBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimisation step: the stage's losses, backward, clipped gradients, update."""
        if batch.epoch != self.step // self.loader.batches_per_epoch:
            raise RuntimeError(
                f"loader epoch {batch.epoch} out of step with training step {self.step}"
            )
        if self.cfg.compile and self.cfg.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are done with
        with self.autocast:
            terms = self.step_fn(batch, self.cfg, self.gen)
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        grad_norm = nn.utils.clip_grad_norm_(self.models.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return terms, grad_norm

    def _log_step(self, batch, terms, grad_norm, writer, bar) -> None:
        """Every ``log_every`` steps (and the last): the losses averaged over ranks, lr, rate."""
        self._seen += batch.snapshot_id.shape[0] * self.world
        if self.cfg.log_batches:
            self._log_batch(batch)
        if self.step % self.cfg.log_every != 0 and self.step != self.total_steps:
            return
        self._write_pending_log(writer)  # the last log line's: its copy ended long ago
        rate = self._seen / (time.perf_counter() - self._tick)
        record = {
            "step": self.step,
            "epoch": batch.epoch,
            # the host's clock: the GPU may still be working on the steps queued before this
            "train_seconds": self.train_seconds + time.perf_counter() - self._clock,
            "loader_wait_seconds": self.loader_wait_seconds,  # part of train_seconds
            # of it, the device's time without work because of the loader (ShardLoader)
            "loader_stall_seconds": self._stall_seconds(),
            "lr": self.scheduler.get_last_lr()[0],
            "samples_per_s": rate,
        }
        if self._first_step_seconds is not None:  # this start's first step, its warm-up
            record["start/first_step_seconds"] = self._first_step_seconds
            record["start/first_batch_seconds"] = self._first_batch_seconds
            self._first_step_seconds = self._first_batch_seconds = None
        names = [f"train/{k}" for k in terms] + ["grad_norm"]
        values = torch.stack([v.detach().float() for v in [*terms.values(), grad_norm]])
        values = values.double()  # (len(names),): copied out of a CUDA graph's outputs
        if self.world > 1:
            dist.all_reduce(values)  # queued like the step: the losses averaged over ranks
            values /= self.world
        self._pending_log = PendingLog(record, names, values, self.device)
        self._seen, self._tick = 0, time.perf_counter()

    def _write_pending_log(self, writer) -> None:
        """Write the training record whose values are on their way to the host, if any."""
        pending, self._pending_log = self._pending_log, None
        if pending is None:
            return
        record = pending.record()
        self._log(record, writer)
        self._bar.set_postfix(
            loss=f"{record['train/total']:.4g}", samples_s=f"{record['samples_per_s']:.0f}"
        )

    def _checkpoint_and_validate(self, writer) -> None:
        """Save and validate when due; the time they take is not training time."""
        per_epoch, cfg, last = (
            self.loader.batches_per_epoch,
            self.cfg,
            self.step == self.total_steps,
        )
        due_ckpt = self.step % (cfg.checkpoint_every or per_epoch) == 0 or last
        due_eval = self.step % (cfg.eval_every or per_epoch) == 0 or last
        if not (due_ckpt or due_eval):
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_seconds += time.perf_counter() - self._clock
        self._write_pending_log(writer)  # before the validation's record: records stay in order
        if due_ckpt:
            self.save(self.out / "checkpoint.pt")
        if due_eval:
            if self.rank == 0:
                tick = time.perf_counter()
                metrics = self.validate(
                    "val", cfg.eval_trajectories, cfg.eval_horizons, cfg.eval_reconstruction
                )
                record = {
                    "step": self.step,
                    "train_seconds": self.train_seconds,
                    "val_seconds": time.perf_counter() - tick,  # its results are on the host
                }
                self._log({**record, **{f"val/{k}": v for k, v in metrics.items()}}, writer)
            if self.world > 1:
                dist.barrier()
        self._clock = time.perf_counter()

    def _open_writer(self):
        """Rank 0: ``config.yaml``, then its TensorBoard writer (None on other ranks or with
        tensorboard off)."""
        if self.rank != 0:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        # the resolved config, resume and overwrite as given: --config out/config.yaml reruns it
        config = yaml.safe_dump(to_dict(self.cfg), sort_keys=False)
        write_atomic(self.out / "config.yaml", config.encode())
        if not self.cfg.tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter

        # after a resume, drop the events of steps after the checkpoint: they are logged again
        return SummaryWriter(str(self.out / "tb"), purge_step=self.step + 1 if self.step else None)

    def _test(self, writer) -> dict[str, float]:
        """Rank 0: the dense test metrics, the trained model file, the last log records."""
        final = {}
        if self.rank == 0:
            final = self.validate("test")
            self._save_model()
            path = self.out / "test_metrics.json"
            write_atomic(path, (json.dumps(final, indent=1) + "\n").encode())
            record = {"step": self.step, "train_seconds": self.train_seconds}
            self._log({**record, **{f"test/{k}": v for k, v in final.items()}}, writer)
            if writer is not None:
                writer.close()
        if self.world > 1:
            dist.barrier()
        return final

    def _log_batch(self, batch) -> None:
        query = batch.coords if batch.coords is not None else batch.coords_next
        digest = (
            hashlib.sha256(query.cpu().numpy().tobytes()).hexdigest()[:16]
            if query is not None
            else None
        )
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"batches-rank{self.rank}.jsonl"
        with named_os_errors(path), open(path, "a") as f:
            f.write(
                json.dumps(
                    {
                        "step": self.step,
                        "epoch": batch.epoch,
                        "snapshot_id": batch.snapshot_id.tolist(),
                        "queries": digest,
                    }
                )
                + "\n"
            )

    def _save_model(self) -> None:
        """The trained model file: codec.pt (stage codec) or operator.pt (stage operator)."""
        identity = {
            **self._identity(),
            "splits": {s: v.trajectories for s, v in self.shards.manifest.splits.items()},
            "layers": self.shards.layer_ids,  # the chain of adaptive layers it trained on
        }
        if self.cfg.stage == "codec":
            save_codec(self.out / "codec.pt", self.models.codec, self.norm, extra=identity)
            return
        operator = self.models.operator
        assert operator is not None  # build_models makes one for stage=operator
        save_checkpoint(
            self.out / "operator.pt",
            {
                "kind": "operator",
                "config": to_dict(self.cfg.operator),
                "latent": to_dict(self.shards.manifest.latent),
                "num_params": operator.num_params,
                "state_dict": operator.state_dict(),
                "decoder": self.models.codec.decoder.state_dict(),
                "codec_checkpoint": self.cfg.codec_checkpoint,
                **identity,
            },
        )


def train(cfg: TrainConfig) -> dict[str, float]:
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        # DDP's reducer holds the process group: free the trainer (and any cycle through it)
        # first, so the group is gone when it is destroyed, not torn down with gloo's threads
        # still alive later, at the interpreter's exit, where that can abort the process.
        del trainer
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
