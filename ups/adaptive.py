"""Error-based adaptive query sets: where the model is wrong, from the model itself.

A refresh runs the stage's model densely over every training snapshot (batched, bf16 autocast
on CUDA) and takes the per-point loss of the stage being trained, in the normalised units the
losses use:

* ``codec``: the reconstruction error, mean over channels of (decode(encode(u)) - u)^2;
* ``operator``: the physical terms of the operator loss, per snapshot u_s:
  ``loss.forward * (decode(op(z_{s-1})) - u_s)^2`` where u_s is some window's second snapshot,
  plus ``loss.inverse * (decode(z_s) - u_s)^2`` where it is some window's first -- the very
  point losses the sets of u_s serve in training.

The pipeline turns that error into q and a layer of sets (pipeline/layers.py,
``ErrorSampler``); nothing here knows how sets are drawn or stored.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from pipeline.config import ConfigError, check
from pipeline.layers import LayerRequest, LayerWriter
from pipeline.records import SnapshotFields
from pipeline.samplers import ErrorImportance
from pipeline.shards import ShardSet
from ups.models.codec import Codec
from ups.models.operator import LatentOperator


@dataclass
class AdaptiveConfig(ErrorImportance):
    """Error-based refreshes of the query sets during training (power, alpha, mix: how the error
    becomes q, pipeline/samplers.py ErrorImportance)."""

    refresh_every: int = 0  # epochs between refreshes from the model's error (0: never)
    batch: int = 64  # snapshots per dense forward pass of a refresh

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.refresh_every >= 0,
            "adaptive.refresh_every",
            "an integer >= 0 (0: never)",
            self.refresh_every,
        )
        check(self.batch >= 1, "adaptive.batch", "an integer >= 1", self.batch)

    def importance(self) -> ErrorImportance:
        return ErrorImportance(power=self.power, alpha=self.alpha, mix=self.mix)


def weights_sha256(module: nn.Module) -> str:
    """sha256 of a model's weights (every state_dict tensor, in key order, with its name, dtype
    and shape): which model a layer's error came from, the same in training and from its
    checkpoint file."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def error_definition(stage: str, forward: float, inverse: float, window: int) -> dict:
    """What a layer's per-point error is, recorded in the layer (and so in its id)."""
    if stage == "codec":
        return {"kind": "codec-reconstruction", "units": "normalised", "channels": "mean"}
    if forward == 0 and inverse == 0:
        raise ConfigError(
            "option 'loss': loss.forward and loss.inverse are both 0, so no loss term reads the "
            "query points and an error-based refresh has nothing to serve"
        )
    return {
        "kind": "operator-loss",
        "units": "normalised",
        "channels": "mean",
        "forward": forward,
        "inverse": inverse,
        "window": window,
    }


class PointError:
    """The per-point loss (S, N) of a shard's snapshots under the stage's model, on ``device``.

    ``codec``: the model's codec; ``operator``: its operator (None for the codec stage);
    ``decode_grid``: the codec's dense decode to use, e.g. compiled (default: eager)."""

    def __init__(
        self,
        codec: Codec,
        operator: LatentOperator | None,
        shards: ShardSet,
        definition: dict,
        device: torch.device,
        batch: int,
        amp: bool,
        decode_grid: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        manifest = shards.manifest
        if operator is not None and manifest.latent is None:
            raise ConfigError(
                f"{shards.location}: field-only shards hold no latents; an operator-stage refresh "
                "needs the latent shards the operator trains on"
            )
        self.codec, self.operator, self.definition = codec, operator, definition
        self.decode_grid = decode_grid or codec.decode_grid
        self.norm, self.steps, self.device, self.batch = (
            manifest.data.norm,
            shards.steps,
            device,
            batch,
        )
        self.dt, self.params = manifest.data.dt, list(manifest.data.params.values())
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if amp and device.type == "cuda"
            else contextlib.nullcontext()
        )

    def _squared(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over channels of (decode_grid(z) - target)^2: (S, N) float32, in batches."""
        out = []
        for zb, tb in zip(z.split(self.batch), target.split(self.batch), strict=True):
            with self.autocast:
                pred = self.decode_grid(zb)  # (b, C, *grid)
            out.append((pred.float() - tb).pow(2).mean(1).flatten(1))
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, block: SnapshotFields) -> torch.Tensor:
        fields = torch.from_numpy(block.fields).to(self.device)
        target = self.norm.normalize(fields)  # (S, C, *grid)
        if self.operator is None:
            with self.autocast:
                z = torch.cat([self.codec.encode(x) for x in target.split(self.batch)])
            return self._squared(z, target)
        z = torch.from_numpy(block.latent).to(self.device).float()  # (S, T, D)
        time = torch.from_numpy(block.time).to(self.device)
        window = self.definition["window"]
        first = time <= self.steps - 1 - window  # u_s opens a window: the inverse term
        second = (time >= 1) & (time <= self.steps - window)  # u_s is a window's second
        error = torch.zeros(target.shape[0], target[0, 0].numel(), device=self.device)
        if self.definition["inverse"]:
            error += self.definition["inverse"] * self._squared(z, target) * first[:, None]
        if self.definition["forward"]:
            # row s - 1 precedes row s in its trajectory wherever s is a window's second
            rows = second.nonzero().flatten()
            b = len(rows)
            dt = torch.full((b,), self.dt, device=self.device)
            params = torch.tensor([self.params] * b, dtype=torch.float32, device=self.device)
            with self.autocast:
                pred = torch.cat(
                    [
                        self.operator(zb, db, pb)
                        for zb, db, pb in zip(
                            z[rows - 1].split(self.batch),
                            dt.split(self.batch),
                            params.reshape(b, len(self.params)).split(self.batch),
                            strict=True,
                        )
                    ]
                )
            forward = self._squared(pred.float(), target[rows])
            error[rows] += self.definition["forward"] * forward
        return error


@dataclass(frozen=True)
class Refreshed:
    """A refresh's layer, and where this rank's seconds went: waiting for reads, the error, the
    plan on the main thread, and the writes summed over their threads (LayerWriter.clock)."""

    layer_id: str
    seconds: dict[str, float]


def refresh(
    shards: ShardSet,
    error_of: Callable[[SnapshotFields], torch.Tensor],
    request: LayerRequest,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> Refreshed:
    """Write a layer of error-based sets for ``request.epochs``: every rank computes and writes
    its share of the shards, rank 0 records the layer; its id is the same on every rank."""
    writer = LayerWriter(shards, request, device)
    if rank == 0:
        writer.create()
    if world > 1:
        dist.barrier()
    mine = list(range(rank, len(shards.shards), world))
    first, stop = request.epochs
    with tqdm(
        total=len(mine),
        desc=f"refresh epochs {first}:{stop}",
        unit="shard",
        disable=not progress or rank != 0,
        leave=False,
    ) as bar:
        writer.write_shards(error_of, mine, bar.update)
    if world > 1:
        dist.barrier()
    layer_id = [writer.finalize() if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(layer_id, src=0)
    assert layer_id[0] is not None  # rank 0's, broadcast to every other rank
    return Refreshed(layer_id[0], dict(writer.clock.seconds))


def model_entry(models: nn.Module, stage: str, step: int) -> dict:
    """The ``model`` of a layer record: which weights the error came from."""
    return {"sha256": weights_sha256(models), "stage": stage, "step": step}


__all__ = [
    "AdaptiveConfig",
    "PointError",
    "Refreshed",
    "error_definition",
    "model_entry",
    "refresh",
    "weights_sha256",
]
