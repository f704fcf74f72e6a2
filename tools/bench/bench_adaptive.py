"""Error-based adaptive query sets on NS 2D: how much variance they remove, what a refresh costs.

One run on one device generates NS 2D data, builds field-only shards (uniform sets at
``--train-ratio``), trains a codec for ``--codec-steps`` steps on them (the library's
``Trainer``, uniform sparse sets, bf16 autocast on CUDA), and measures:

1. ``--part variance``: on a fixed batch of ``--snapshots`` training snapshots, the dense
   reconstruction loss L (MSE over every grid point, normalised units) and its gradient g over
   every trainable parameter (float32, no autocast, no TF32), against ``--draws`` sparse
   estimates per sampler and k/N: L_hat = mean over snapshots of each snapshot's weighted mean
   of the point errors (``weighted_point_loss``, exactly the training loss) and its gradient
   g_hat. Per configuration: relative loss variance E(L_hat - L)^2 / L^2, relative gradient
   variance E|g_hat - g|^2 / |g|^2, the bias checks and the effective sample size. Error sets
   take q from the trained codec's per-point error (``PointError``, as a refresh computes it),
   and -- "stale" -- from the codec ``--stale-epochs`` epochs before the end of training. For
   context, the minibatch's own gradient noise from every training snapshot's dense gradient.
2. ``--part refresh``: a full refresh (``ups.adaptive.refresh`` + ``PointError`` over every
   training snapshot, writing a layer of R epochs) for each R of ``--refresh-every``, after a
   warm-up refresh, CUDA-synchronised; its split into reading, error, q, the query plan, the
   copy to host, writing and checksums; optionally other adaptive.batch; the training epoch's seconds at ``--train-ratio`` from the codec run's
   metrics; the refresh's share of wall-clock refresh / (R * epoch + refresh); and a short
   ``train`` run with ``adaptive.refresh_every=1`` for the refresh as training sees it.

Results go to OUT/bench_adaptive.json and OUT/bench_adaptive.md (default: docs/bench/ and
docs/); ``--report A.json [B.json ...]`` merges the JSON of separate parts and renders them.

    python tools/bench/bench_adaptive.py                          # on a GPU, writes docs/
    python tools/bench/bench_adaptive.py --part variance --out $OUT
    python tools/bench/bench_adaptive.py --quick --device cpu     # tiny, on a CPU (< 2 min)
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import (
    build_field_shards,
    environment_lines,
    markdown_table,
    run_section,
    synthetic_data,
)

from pipeline.config import load_config
from pipeline.keys import snapshot_keys
from pipeline.layers import LayerRequest, LayerWriter
from pipeline.manifest import file_entry, shard_name
from pipeline.records import LayerBlock
from pipeline.samplers import (
    ErrorImportance,
    ErrorSampler,
    GradientSampler,
    StratifiedSampler,
    UniformSampler,
    effective_sample_size,
    weights,
)
from pipeline.schedules import ScheduleConfig, k_per_epoch
from pipeline.shards import open_shards
from ups.adaptive import PointError, error_definition, model_entry, refresh
from ups.training.losses import weighted_point_loss
from ups.training.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[2]
PARTS = ("refresh", "variance")  # the cheap, predictable part first


class StashingTrainer(Trainer):
    """A Trainer that keeps a copy of the codec's weights after step ``stash_step``: the model a
    refresh ``--stale-epochs`` epochs before the end would have computed its error from."""

    stash_step = -1
    stash: dict | None = None

    def _checkpoint_and_validate(self, writer) -> None:
        super()._checkpoint_and_validate(writer)
        if self.step == self.stash_step:
            self.stash = copy.deepcopy(self.models.codec.state_dict())


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_adaptive_", dir=args.workdir))
        self.results: dict = {
            "environment": environment_lines(),
            "device": torch.cuda.get_device_name(self.device) if self.cuda else "cpu",
            "args": vars(args),
            "sections": {},
        }

    # ---------------------------------------------------------------- helpers

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def save(self) -> None:
        path = self.args.json_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results, indent=1, default=str) + "\n")

    def section(self, name: str, fn) -> None:
        """Run one section; a failure is recorded, not fatal, so the others still run."""
        run_section(self.results["sections"], name, fn)
        self.save()

    def overrides(self) -> list[str]:
        """The NS 2D model of tools/bench/bench_accuracy.py and its training options."""
        a = self.args
        return [
            "codec.encoder.patch=8", f"codec.encoder.dim={a.width}", "codec.encoder.depth=2",
            "codec.encoder.heads=4", f"codec.encoder.num_tokens={a.tokens}",
            f"codec.encoder.latent_dim={a.latent_dim}", f"codec.decoder.dim={a.width}",
            "codec.decoder.depth=3", "codec.decoder.heads=4",
            "stage=codec", f"shards={self.shards_path}", f"device={a.device}",
            "progress=false", "tensorboard=false", f"loader.workers={a.workers}",
            f"batch_size={a.batch}", "eval_trajectories=4", f"log_every={a.log_every}",
            f"optim.warmup_steps={min(50, max(1, a.codec_steps // 4))}",
            "eval_every=1000000", "checkpoint_every=1000000",
        ]  # fmt: skip

    # ---------------------------------------------------------------- setup

    def setup(self) -> dict:
        a = self.args
        started = time.perf_counter()
        data = synthetic_data(
            self.tmp, "ns2d", a.resolution, a.trajectories, a.steps_per_traj, str(self.device)
        )
        generated = time.perf_counter() - started
        self.shards_path = self.tmp / "shards"
        summary = build_field_shards(
            data,
            self.shards_path,
            a.set_epochs,
            ScheduleConfig(start_ratio=a.train_ratio),
            str(self.device),
        )
        cfg = load_config(
            TrainConfig,
            None,
            [
                *self.overrides(),
                f"out={self.tmp / 'codec'}",
                f"max_steps={a.codec_steps}",
                f"epochs={10**6}",  # the set's sets reused cyclically
                "loader.wrap_epochs=true",
            ],
        )
        trainer = StashingTrainer(cfg)
        per_epoch = trainer.loader.batches_per_epoch
        trainer.stash_step = max(0, a.codec_steps - a.stale_epochs * per_epoch)
        if trainer.stash_step == 0:
            trainer.stash = copy.deepcopy(trainer.models.codec.state_dict())
        test = trainer.fit()
        self.trainer = trainer
        self.models = trainer.models.eval()
        self.codec = trainer.models.codec
        shards = open_shards(str(self.shards_path), "train", layer=None)
        self.num_train = len(shards)
        return {
            "data": f"NS 2D {a.resolution}x{a.resolution}, {a.trajectories} trajectories x "
            f"{a.steps_per_traj} steps",
            "N": a.resolution**2,
            "train_snapshots": self.num_train,
            "train_shards": len(shards.shards),
            "k_train": shards.k_per_epoch[0],
            "set_epochs": shards.epochs,
            "generate_seconds": generated,
            "build_seconds": summary.get("seconds"),
            "codec_steps": trainer.step,
            "codec_batches_per_epoch": per_epoch,
            "codec_train_seconds": trainer.train_seconds,
            "codec_test": test,
            "stale_step": trainer.stash_step,
            "codec_params": sum(p.numel() for p in self.codec.parameters() if p.requires_grad),
            "epoch_seconds": self.epoch_seconds(trainer),
            "setup_seconds": time.perf_counter() - started,
        }

    def epoch_seconds(self, trainer: Trainer) -> dict:
        """One training epoch's seconds at the set's ratio, from the codec run's metrics: the
        seconds per step over the run's second half (past warm-up), times the batches per epoch."""
        records = [
            json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()
        ]
        logged = [r for r in records if "samples_per_s" in r]
        half = [r for r in logged if r["step"] >= trainer.step // 2] or logged
        first, last = half[0], half[-1]
        if last["step"] == first["step"]:
            first = {"step": 0, "train_seconds": 0.0}
        per_step = (last["train_seconds"] - first["train_seconds"]) / (last["step"] - first["step"])
        per_epoch = trainer.loader.batches_per_epoch
        return {
            "seconds_per_step": per_step,
            "batches_per_epoch": per_epoch,
            "seconds": per_step * per_epoch,
            "steps_measured": [first["step"], last["step"]],
            "ratio": self.args.train_ratio,
        }

    # ---------------------------------------------------------------- 1. variance

    def batch(self, shards) -> tuple[torch.Tensor, np.ndarray, list]:
        """The fixed batch: B training snapshots evenly spread over the split (so over
        trajectories and times), as normalised fields (B, C, *grid), their ids and their shard
        blocks (for PointError)."""
        b = min(self.args.snapshots, len(shards))
        picks = sorted(set(np.linspace(0, len(shards) - 1, b).round().astype(int).tolist()))
        by_shard: dict[int, list[int]] = {}
        for i in picks:
            index, row = shards.locate(i)
            by_shard.setdefault(index, []).append(row)
        blocks = [
            shards.read_shard(index, cache=False).select(np.asarray(rows))
            for index, rows in sorted(by_shard.items())
        ]
        fields = torch.from_numpy(np.concatenate([blk.fields for blk in blocks])).to(self.device)
        ids = np.concatenate([blk.snapshot_id for blk in blocks])
        return shards.manifest.data.norm.normalize(fields), ids, blocks

    def loss_and_grad(
        self, x: torch.Tensor, idx: torch.Tensor | None, w: torch.Tensor | None
    ) -> tuple[float, torch.Tensor, torch.Tensor | None]:
        """The batch's loss and its gradient (flat, float64), float32 throughout: dense (idx None)
        or at the points idx (B, k) with weights w (B, k). Snapshots go in chunks; each chunk's
        loss is weighted_point_loss scaled by its share of the batch, so the sum is exactly the
        loss of the whole batch. Dense also returns the per-point error (B, N)."""
        codec, params = self.codec, self.params
        b, channels = x.shape[0], x.shape[1]
        target = x.flatten(2).transpose(1, 2)  # (B, N, C)
        coords = codec.grid_coords  # (N, d)
        total, grad, errors = 0.0, [torch.zeros_like(p) for p in params], []
        per_chunk = max(
            1, self.args.chunk_points // (coords.shape[0] if idx is None else idx.shape[1])
        )
        for rows in torch.arange(b, device=x.device).split(per_chunk):
            z = codec.encode(x[rows])
            if idx is None:
                c, t, wc = coords.expand(len(rows), -1, -1), target[rows], None
            else:
                ir = idx[rows]
                c = coords[ir]  # (b, k, d)
                t = target[rows].gather(1, ir[..., None].expand(-1, -1, channels))
                wc = w[rows]
            pred = codec.decoder(z, c)
            loss = weighted_point_loss(pred, t, wc) * (len(rows) / b)
            for acc, g in zip(grad, torch.autograd.grad(loss, params), strict=True):
                acc += g
            total += float(loss.detach())
            if idx is None:
                errors.append((pred.detach() - t).pow(2).mean(-1))
        flat = torch.cat([g.reshape(-1) for g in grad]).double()
        return total, flat, torch.cat(errors) if errors else None

    def point_error(self, codec, shards, blocks) -> torch.Tensor:
        """The per-point error a refresh computes (PointError, bf16 autocast on CUDA unless
        --no-amp) on the batch's snapshots: (B, N) float32."""
        error_of = PointError(
            codec,
            None,
            shards,
            error_definition("codec", 1.0, 0.5, 1),
            self.device,
            self.args.refresh_batch,
            self.args.amp,
        )
        return torch.cat([error_of(blk) for blk in blocks])

    def configurations(
        self, x, error, stale_error, periodic
    ) -> list[tuple[str, object, torch.Tensor]]:
        """(name, sampler, q (B, N)) of every configuration measured."""
        a = self.args
        out = [
            ("uniform", UniformSampler(), UniformSampler().probabilities(x, periodic)),
            ("stratified 8x8", StratifiedSampler(), StratifiedSampler().probabilities(x, periodic)),
        ]
        grad = GradientSampler(alpha=a.alpha)
        out.append((f"gradient a{a.alpha}", grad, grad.probabilities(x, periodic)))
        alphas = [a.alpha] + [x for x in a.error_alphas if x != a.alpha]
        # (power, alpha, mix, error, tag, stratify): block-ordered (stratified) draws by default
        variants = [(p, al, 0.0, error, "", True) for al in alphas for p in a.powers]
        variants += [(p, a.alpha, 0.0, error, " random order", False) for p in a.powers]
        if a.mix > 0:
            variants.append((a.powers[0], a.alpha, a.mix, error, "", True))
        if stale_error is not None:
            tag = f" stale {a.stale_epochs} ep"
            variants += [(p, a.alpha, 0.0, stale_error, tag, True) for p in a.powers]
        for power, alpha, mix, e, tag, stratify in variants:
            importance = ErrorImportance(power=power, alpha=alpha, mix=mix, stratify=stratify)
            sampler = ErrorSampler(importance)
            name = f"error p{power} a{alpha}" + (f" mix{mix}" if mix else "") + tag
            out.append((name, sampler, sampler.error_probabilities(e, x, periodic)))
        return out

    def variance(self) -> dict:
        a = self.args
        shards = open_shards(str(self.shards_path), "train", layer=None)
        grid, n = tuple(shards.grid), math.prod(shards.grid)
        periodic = list(shards.manifest.data.periodic)
        x, ids, blocks = self.batch(shards)
        codec = self.codec.eval()
        self.params = [p for p in codec.parameters() if p.requires_grad]
        error = self.point_error(codec, shards, blocks)
        stale_error = None
        if a.stale_epochs > 0 and self.trainer.stash is not None:
            stale = copy.deepcopy(codec)
            stale.load_state_dict(self.trainer.stash)
            stale_error = self.point_error(stale.eval(), shards, blocks)
            del stale
        # float32 for the gradients: no autocast, no TF32 (restored afterwards)
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            dense_loss, g, dense_error = self.loss_and_grad(x, None, None)
            g_norm2 = float(g.pow(2).sum())
            configs = self.configurations(x, error, stale_error, periodic)
            ks = {r: k_per_epoch(ScheduleConfig(start_ratio=r), 1, n)[0] for r in a.ratios}
            rows = []
            for ratio, k in ks.items():
                keys = [
                    snapshot_keys(a.seed, torch.from_numpy(ids), epoch, device=self.device)
                    for epoch in range(a.draws)
                ]
                for name, sampler, q in configs:
                    rows.append(
                        self.draws(name, sampler, q, k, ratio, keys, grid, x, dense_loss, g)
                    )
                    row = rows[-1]
                    self.results["sections"]["variance_partial"] = rows  # kept if cut short
                    self.save()
                    print(
                        f"  k/N {ratio} {name:32s} loss var {row['loss_var']:.3e} grad var "
                        f"{row['grad_var']:.3e} ESS/k {row['ess_over_k']:.3f}",
                        flush=True,
                    )
                base = next(r for r in rows if r["ratio"] == ratio and r["config"] == "uniform")
                for r in rows:
                    if r["ratio"] == ratio:
                        r["loss_var_vs_uniform"] = r["loss_var"] / base["loss_var"]
                        r["grad_var_vs_uniform"] = r["grad_var"] / base["grad_var"]
                        r["ess_vs_uniform"] = r["ess_over_k"] / base["ess_over_k"]
            context = self.minibatch_noise(shards, len(ids)) if a.context else None
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        if context is not None:
            # the sparse sets' noise next to the minibatch's: both shrink as 1/B, so their
            # ratio holds for any batch; the total is their sum (independent draws)
            noise = {}
            for r in rows:
                point = r["grad_var"] * g_norm2  # absolute, this batch
                r["point_over_minibatch"] = point / context["minibatch_var"]
                noise[(r["ratio"], r["config"])] = context["minibatch_var"] + point
            for r in rows:
                r["total_vs_uniform"] = (
                    noise[(r["ratio"], r["config"])] / noise[(r["ratio"], "uniform")]
                )
        # how far the refresh's error (bf16 on CUDA) is from the float32 error of the same model
        diff = float((error - dense_error).norm() / dense_error.norm())
        return {
            "snapshots": len(ids),
            "snapshot_ids": ids.tolist(),
            "N": n,
            "k": {str(r): k for r, k in ks.items()},
            "draws": a.draws,
            "dense_loss": dense_loss,
            "dense_grad_norm": math.sqrt(g_norm2),
            "params": int(g.numel()),
            "point_error_vs_float32_rel_l2": diff,
            "point_error_mean": float(error.mean()),
            "stale_point_error_mean": None if stale_error is None else float(stale_error.mean()),
            "error_spread": spread(error),
            "minibatch": context,
            "rows": rows,
        }

    def minibatch_noise(self, shards, b: int) -> dict:
        """The minibatch's gradient noise for context: every training snapshot's dense gradient
        g_s (float32), their mean g_all and spread S^2 = sum |g_s - g_all|^2 / (M - 1), and the
        variance of a uniformly random batch of b snapshots without replacement,
        S^2 / b (1 - b / M)."""
        started = time.perf_counter()
        norm = shards.manifest.data.norm
        total, sq, m = None, 0.0, 0
        for index in range(len(shards.shards)):
            fields = torch.from_numpy(shards.read_fields(index).fields)
            x = norm.normalize(fields.to(self.device))
            for s in range(len(x)):
                _, g_s, _ = self.loss_and_grad(x[s : s + 1], None, None)
                total = g_s.clone() if total is None else total.add_(g_s)
                sq += float(g_s.pow(2).sum())
                m += 1
        g_all = total / m
        g_all2 = float(g_all.pow(2).sum())
        spread2 = (sq - m * g_all2) / (m - 1)
        var = spread2 / b * (1 - b / m)
        return {
            "snapshots": m,
            "batch": b,
            "g_all_norm": math.sqrt(g_all2),
            "per_snapshot_rel_var": spread2 / g_all2,
            "minibatch_var": var,
            "minibatch_rel_var": var / g_all2,
            "seconds": time.perf_counter() - started,
        }

    def draws(self, name, sampler, q, k, ratio, keys, grid, x, dense_loss, g) -> dict:
        """R keyed draws of one configuration: the estimates' deviations from L and g."""
        g_norm2 = float(g.pow(2).sum())
        started = time.perf_counter()
        sets = sampler.sample_epochs(q, [k] * len(keys), keys, grid).indices
        loss_dev, grad_dev, losses, ess = [], [], [], []
        g_sum, max_w = torch.zeros_like(g), 0.0
        for idx in sets:
            w = weights(q, k, idx, 1.0)
            loss, g_hat, _ = self.loss_and_grad(x, idx, w)
            losses.append(loss)
            loss_dev.append((loss - dense_loss) ** 2 / dense_loss**2)
            grad_dev.append(float((g_hat - g).pow(2).sum()) / g_norm2)
            g_sum += g_hat
            ess.append(float(effective_sample_size(w).mean()) / k)
            max_w = max(max_w, float(w.max()))
        r = len(sets)
        mean_loss = statistics.fmean(losses)
        sd_loss = statistics.stdev(losses) if r > 1 else float("nan")
        grad_var = statistics.fmean(grad_dev)
        grad_bias2 = float((g_sum / r - g).pow(2).sum()) / g_norm2
        return {
            "config": name,
            "ratio": ratio,
            "k": k,
            "loss_var": statistics.fmean(loss_dev),
            "loss_var_se": stderr(loss_dev),
            "grad_var": grad_var,
            "grad_var_se": stderr(grad_dev),
            "mean_loss_over_L": mean_loss / dense_loss,
            "bias_z": (mean_loss - dense_loss) / (sd_loss / math.sqrt(r)) if r > 1 else None,
            # |mean g_hat - g|^2 / |g|^2 against the grad_var / R an unbiased estimate leaves
            "grad_bias2_over_noise": grad_bias2 / (grad_var / r) if grad_var > 0 else None,
            "ess_over_k": statistics.fmean(ess),
            "max_weight": max_w,  # the largest weight drawn
            "seconds": time.perf_counter() - started,
        }

    # ---------------------------------------------------------------- 2. refresh

    def refresh(self) -> dict:
        a = self.args
        definition = error_definition("codec", 1.0, 0.5, 1)
        importance = ErrorImportance(power=a.powers[0], alpha=a.alpha)

        def timed(epochs: int, batch: int = a.refresh_batch) -> dict:
            shards = open_shards(str(self.shards_path), "train", layer=None)
            self.sync()
            start = time.perf_counter()
            request = LayerRequest(
                epochs=(0, epochs),
                model=model_entry(self.models, "codec", self.trainer.step),
                error=definition,
                importance=importance,
            )
            error_of = PointError(self.codec, None, shards, definition, self.device, batch, a.amp)
            layer_id = refresh(shards, error_of, request, self.device, progress=False).layer_id
            self.sync()
            seconds = time.perf_counter() - start
            files = (self.shards_path / "layers" / layer_id).rglob("*")
            return {
                "seconds": seconds,
                "bytes": sum(f.stat().st_size for f in files if f.is_file()),
            }

        timed(1)  # warm-up: kernels, allocator, the shards in the page cache
        request = functools.partial(
            LayerRequest,
            model=model_entry(self.models, "codec", self.trainer.step),
            error=definition,
            importance=importance,
        )
        breakdown = {
            str(e): self.breakdown(request(epochs=(0, e)), definition)
            for e in sorted({min(a.refresh_every), max(a.refresh_every)})
        }
        epoch = self.results["sections"]["setup"]["epoch_seconds"]["seconds"]
        rows = []
        for every in a.refresh_every:
            measured = [timed(every) for _ in range(a.refresh_repeats)]
            runs = [m["seconds"] for m in measured]
            seconds = statistics.median(runs)
            rows.append(
                {
                    "refresh_every": every,
                    "layer_epochs": every,
                    "seconds": seconds,
                    "runs": runs,
                    "layer_bytes": measured[-1]["bytes"],
                    "snapshots_per_s": self.num_train / seconds,
                    "share": seconds / (every * epoch + seconds),
                }
            )
            print(f"  layer of {every} epochs: {seconds:.3f} s, share {rows[-1]['share']:.3f}")
        largest = max(rows, key=lambda r: r["layer_epochs"])
        # the brief's formula with one refresh (the largest layer) for every refresh_every
        for r in rows:
            r["share_with_largest_layer"] = largest["seconds"] / (
                r["refresh_every"] * epoch + largest["seconds"]
            )
        sweep = []
        for batch in a.sweep_batches:  # adaptive.batch: snapshots per dense forward
            timed(1, batch)  # warm-up at this batch's shapes
            runs = [
                timed(largest["layer_epochs"], batch)["seconds"] for _ in range(a.refresh_repeats)
            ]
            sweep.append(
                {
                    "batch": batch,
                    "epochs": largest["layer_epochs"],
                    "runs": runs,
                    "seconds": statistics.median(runs),
                }
            )
            print(f"  adaptive.batch {batch}: {sweep[-1]['seconds']:.3f} s")
        out = {
            "train_snapshots": self.num_train,
            "epoch_seconds": epoch,
            "breakdown": breakdown,
            "batch_sweep": sweep,
            "amp": a.amp,
            "refresh_batch": a.refresh_batch,
            "power": importance.power,
            "rows": rows,
        }
        if a.train_refresh_epochs > 0:
            out["in_training"] = self.train_with_refresh()
        return out

    def breakdown(self, request: LayerRequest, definition: dict) -> dict:
        """Where a refresh's seconds go: ``LayerWriter.write_shards`` step by step, each step
        CUDA-synchronised (the writer's own plan_block split in two), into a partial layer that
        is then removed: reading a shard, PointError, q from the error, the query plan (the
        draws of every epoch, their coding and pi_scale), the copy to host, writing the shard's
        zarr arrays, and their checksums."""
        a = self.args
        shards = open_shards(str(self.shards_path), "train", layer=None)
        writer = LayerWriter(shards, request, self.device)
        writer.create()
        error_of = PointError(
            self.codec, None, shards, definition, self.device, a.refresh_batch, a.amp
        )
        periodic = shards.manifest.data.periodic
        steps = ("read", "error", "q", "plan", "to_host", "write", "checksum")
        seconds = dict.fromkeys(steps, 0.0)
        clock = time.perf_counter()

        def lap(step: str) -> None:
            nonlocal clock
            self.sync()
            now = time.perf_counter()
            seconds[step] += now - clock
            clock = now

        self.sync()
        clock = time.perf_counter()
        for index in range(len(shards.shards)):
            block = shards.read_fields(index)
            lap("read")
            error = error_of(block).float()
            lap("error")
            q = writer.sampler.error_probabilities(error, None, periodic)
            lap("q")
            queries, pi_scale = writer.plan(q, block.snapshot_id)
            lap("plan")
            layer = LayerBlock(
                snapshot_id=block.snapshot_id,
                trajectory=block.trajectory,
                time=block.time,
                error=error.cpu().numpy(),
                importance=q.cpu().numpy(),
                queries=queries,
                pi_scale=pi_scale,
            )
            lap("to_host")
            name = shard_name("train", index)
            files = [f for w in writer.writers for f in w.write("train", index, name, layer)]
            lap("write")
            for f in files:
                file_entry(writer.tmp, f, len(layer))
            lap("checksum")
        shutil.rmtree(writer.tmp)
        total = sum(seconds.values())
        return {
            "epochs": request.epochs[1] - request.epochs[0],
            "seconds": seconds,
            "total": total,
            "snapshots_per_s": self.num_train / total,
        }

    def train_with_refresh(self) -> dict:
        """A short training run with adaptive.refresh_every=1 from scratch: the refresh as the
        training loop runs it (its metrics' refresh/seconds), and epochs read from layers."""
        a = self.args
        out = self.tmp / "adaptive_run"
        # a copy of the set without the layers written above: validation opens the set with
        # layer="latest", which refuses a set whose layers branch (see docs/bench_adaptive.md)
        shards = self.tmp / "shards_adaptive_run"
        shutil.copytree(self.shards_path, shards, ignore=shutil.ignore_patterns("layers"))
        cfg = load_config(
            TrainConfig,
            None,
            [
                *self.overrides(),
                f"shards={shards}",
                f"out={out}",
                f"epochs={a.train_refresh_epochs}",
                "adaptive.refresh_every=1",
                f"adaptive.power={a.powers[0]}",
                f"adaptive.alpha={a.alpha}",
                f"adaptive.batch={a.refresh_batch}",
                f"amp={str(a.amp).lower()}",
                "log_every=1",  # every step's train_seconds: per-epoch times
            ],
        )
        trainer = Trainer(cfg)
        trainer.fit()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        refreshes = [r["refresh/seconds"] for r in records if "refresh/seconds" in r]
        epochs = a.train_refresh_epochs
        loop = trainer.train_seconds - trainer.refresh_seconds
        steps = [r for r in records if "samples_per_s" in r]
        refresh_at = {r["epoch"]: r["refresh/seconds"] for r in records if "refresh/seconds" in r}
        per_epoch, step_median, before = [], [], 0.0
        for epoch in range(epochs):
            mine = [r for r in steps if r["epoch"] == epoch]
            if not mine:
                continue
            per_epoch.append(mine[-1]["train_seconds"] - before - refresh_at.get(epoch, 0.0))
            diffs = [y["train_seconds"] - x["train_seconds"] for x, y in itertools.pairwise(mine)]
            step_median.append(statistics.median(diffs) if diffs else None)
            before = mine[-1]["train_seconds"]
        # the loader's wait for each later epoch's first batch, the first read from a layer:
        # what the GPU waited for after a refresh while refreshes ran at their epoch's start
        wait_at = {r["step"]: r["loader_wait_seconds"] for r in steps}
        per = trainer.loader.batches_per_epoch
        first_waits = [
            wait_at[e * per + 1] - wait_at[e * per]
            for e in range(1, epochs)
            if e * per in wait_at and e * per + 1 in wait_at
        ]
        return {
            "epochs": epochs,
            "batches_per_epoch": trainer.loader.batches_per_epoch,
            "refresh_seconds": refreshes,
            "train_seconds": trainer.train_seconds,
            "train_seconds_without_refresh": loop,
            "epoch_seconds": loop / epochs,
            # each epoch's loop seconds without its refresh; epoch 0 reads the set's own sets,
            # later ones the layers; and each epoch's median step (past its first)
            "epoch_seconds_each": per_epoch,
            "step_seconds_median_each": step_median,
            "first_batch_wait_each": first_waits,
            "refresh_share": trainer.refresh_seconds / trainer.train_seconds,
        }

    def main(self) -> None:
        self.section("setup", self.setup)
        if "error" in self.results["sections"]["setup"]:
            return
        for part in PARTS:
            if self.args.part in ("all", part):
                self.section(part, getattr(self, part))
        self.results["sections"].pop("variance_partial", None)
        self.save()


def stderr(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def spread(error: torch.Tensor) -> dict:
    """How concentrated the error is: the share of the total error in the top 1 % and 10 % of
    points (per snapshot, averaged) -- what error sets can gain over uniform ones."""
    e = error.double().sort(1, descending=True).values
    total = e.sum(1)
    n = e.shape[1]
    return {
        f"top{p}%": float((e[:, : max(1, n * p // 100)].sum(1) / total).mean()) for p in (1, 10)
    }


# ---------------------------------------------------------------- report


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def merge(results: list[dict]) -> dict:
    """One result from the JSON of several runs: the first one's setup and environment, and
    each later run's sections over the earlier ones' (those replaced are kept in
    ``replaced``)."""
    merged = copy.deepcopy(results[0])
    merged.setdefault("replaced", {})
    for i, other in enumerate(results[1:], 1):
        taken = [n for n, v in other["sections"].items() if n != "setup" and "error" not in v]
        for name in taken:
            if name in merged["sections"]:
                merged["replaced"][f"{name} (run 0)"] = merged["sections"][name]
            merged["sections"][name] = other["sections"][name]
        command, date = other["environment"][:2]
        merged["environment"].append(
            f"- section {', '.join(taken)} from run {i}: {command[2:]}, {date[2:]}; "
            f"{other['environment'][2][2:]}"
        )
        merged.setdefault("runs", [results[0]["environment"][:2]]).append(other["environment"][:2])
    return merged


def report(results: dict) -> str:
    sections = results["sections"]
    setup = sections.get("setup", {})
    lines = [
        "# Error-based adaptive query sets: estimator variance and refresh cost",
        "",
        *results["environment"],
        f"- device: {results.get('device')}",
        "",
    ]
    if "error" in setup:
        return "\n".join([*lines, f"setup failed: {setup['error']}", ""])
    a = results["args"]
    lines += [
        f"- data: {setup['data']} ({setup['train_snapshots']} training snapshots in "
        f"{setup['train_shards']} zarr shards, N = {setup['N']})",
        f"- codec: bench_accuracy's NS 2D model (encoder patch 8, width {a['width']}, depth 2; "
        f"decoder width {a['width']}, depth 3; {a['tokens']} tokens x {a['latent_dim']}; "
        f"{setup['codec_params']:,} parameters), trained {setup['codec_steps']} steps (batch "
        f"{a['batch']}, AdamW, cosine LR, bf16 autocast on CUDA) on uniform sparse sets at "
        f"k/N = {a['train_ratio']} (k = {setup['k_train']}): partly trained, test reconstruction "
        f"nRMSE {setup['codec_test'].get('recon_nrmse', float('nan')):.4f}",
        "",
    ]
    lines += variance_report(sections.get("variance"), a, setup)
    lines += refresh_report(sections.get("refresh"), a)
    return "\n".join(lines)


def variance_report(v: dict | None, a: dict, setup: dict) -> list[str]:
    if v is None:
        return []
    if "error" in v:
        return [f"variance section failed: {v['error']}", ""]
    lines = [
        "## 1. Variance of the sparse loss and gradient estimates",
        "",
        f"A fixed batch of B = {v['snapshots']} training snapshots (evenly spread over the train "
        f"split); dense loss L = {v['dense_loss']:.5g} (MSE over all N = {v['N']} points, "
        f"normalised units), |g| = {v['dense_grad_norm']:.4g} over {v['params']:,} parameters, "
        "float32 without autocast or TF32. Per configuration and k/N, "
        f"R = {v['draws']} draws (epoch keys 0..R-1): L_hat = mean over snapshots of each "
        "snapshot's weighted mean (`weighted_point_loss`, the training loss) and its gradient. "
        "loss var = mean (L_hat - L)^2 / L^2, grad var = mean |g_hat - g|^2 / |g|^2 (± standard "
        "error over the draws); bias: mean L_hat / L and its z-score, and |mean g_hat - g|^2 "
        "against the grad var / R an unbiased estimate leaves (about 1 when unbiased); "
        "ESS/k = (sum w)^2 / (k sum w^2), mean over snapshots and draws; / unif: the ratio to "
        "uniform at the same k/N.",
        "",
        f"Error sets take q from `PointError` on the same snapshots (bf16 autocast on CUDA, as a "
        f"refresh does; {v['point_error_vs_float32_rel_l2']:.2%} relative L2 from the float32 "
        f"error) of the trained codec; *stale* ones from the codec {a['stale_epochs']} epochs "
        f"earlier (step {setup['stale_step']}, mean error {fmt(v['stale_point_error_mean'])} vs "
        f"{v['point_error_mean']:.4g} now). The error is concentrated: the top 1 % of points "
        f"hold {v['error_spread']['top1%']:.1%} of it, the top 10 % "
        f"{v['error_spread']['top10%']:.1%}.",
        "",
    ]
    head = [
        "k/N",
        "k",
        "configuration",
        "loss var",
        "/ unif",
        "grad var",
        "/ unif",
        "mean L_hat / L",
        "bias z",
        "grad bias / noise",
        "ESS/k",
        "/ unif",
        "point / minibatch",
        "total / unif",
    ]
    rows = [
        [
            r["ratio"],
            r["k"],
            r["config"],
            f"{r['loss_var']:.3g} ± {r['loss_var_se']:.2g}",
            f"{r['loss_var_vs_uniform']:.3f}",
            f"{r['grad_var']:.3g} ± {r['grad_var_se']:.2g}",
            f"**{r['grad_var_vs_uniform']:.3f}**"
            if r["config"].startswith("error")
            else f"{r['grad_var_vs_uniform']:.3f}",
            f"{r['mean_loss_over_L']:.4f}",
            fmt(r["bias_z"], "+.2f"),
            fmt(r["grad_bias2_over_noise"], ".2f"),
            f"{r['ess_over_k']:.3f}",
            f"{r['ess_vs_uniform']:.3f}",
            fmt(r.get("point_over_minibatch"), ".3f"),
            fmt(r.get("total_vs_uniform"), ".3f"),
        ]
        for r in v["rows"]
    ]
    lines += [*markdown_table(head, rows), ""]
    mb = v.get("minibatch")
    if mb:
        lines += [
            f"Context, the minibatch's own noise: over all M = {mb['snapshots']} training "
            f"snapshots' dense gradients g_s (|g_all| = {mb['g_all_norm']:.4g}), a uniformly "
            f"random batch of {mb['batch']} has E|g_B - g_all|^2 / |g_all|^2 = "
            f"{mb['minibatch_rel_var']:.3f} (per snapshot {mb['per_snapshot_rel_var']:.2f}). "
            "point / minibatch: the configuration's point-sampling noise (grad var x |g|^2 of "
            "the batch above) over that minibatch noise -- both shrink as 1/B; total / unif: "
            "(minibatch + point noise) against uniform's, the noise a training step sees.",
            "",
        ]
    lines += variance_verdict(v)
    return lines


def variance_verdict(v: dict) -> list[str]:
    fresh = [r for r in v["rows"] if r["config"].startswith("error") and "stale" not in r["config"]]
    if not fresh:
        return []
    lines = ["Goal: error sets at <= 0.5x uniform's gradient variance.", ""]
    for ratio in sorted({r["ratio"] for r in fresh}):
        at = [r for r in v["rows"] if r["ratio"] == ratio and r["config"].startswith("error")]
        parts = [
            f"{r['config']} {r['grad_var_vs_uniform']:.2f}x"
            f" ({'met' if r['grad_var_vs_uniform'] <= 0.5 else 'not met'})"
            for r in at
        ]
        lines.append(f"- k/N {ratio}: " + "; ".join(parts))
    by_config: dict[str, list[float]] = {}
    for r in fresh:
        by_config.setdefault(r["config"], []).append(r["grad_var_vs_uniform"])
    best = min(by_config, key=lambda c: statistics.fmean(by_config[c]))
    lines += [
        "",
        f"Lowest mean gradient-variance ratio over the k/N measured: {best} "
        f"({statistics.fmean(by_config[best]):.2f}x uniform).",
        "",
    ]
    return lines


def refresh_report(r: dict | None, a: dict) -> list[str]:
    if r is None:
        return []
    if "error" in r:
        return [f"refresh section failed: {r['error']}", ""]
    epoch = r["epoch_seconds"]
    lines = [
        "## 2. Refresh throughput and share of wall-clock",
        "",
        f"A full refresh: `ups.adaptive.refresh` with `PointError` (codec reconstruction error, "
        f"batch {r['refresh_batch']}, {'bf16 autocast' if r['amp'] else 'float32'}) over all "
        f"{r['train_snapshots']} training snapshots, q = error importance p{r['power']} "
        f"a{a['alpha']}, writing a zarr layer of R epochs (the layer a refresh every R epochs "
        "writes), timed after a warm-up refresh, CUDA-synchronised, median of "
        f"{len(r['rows'][0]['runs'])}. One training epoch at k/N = "
        f"{a['train_ratio']} (uniform sets, batch {a['batch']}, from the codec run's metrics, "
        f"second half of the run): {epoch:.3f} s. Share = refresh / (R x epoch + refresh).",
        "",
    ]
    head = [
        "refresh_every R",
        "refresh s (layer of R epochs)",
        "snapshots/s",
        "layer MB",
        "share",
        "share (largest layer's time)",
    ]
    rows = [
        [
            x["refresh_every"],
            f"{x['seconds']:.3f}",
            f"{x['snapshots_per_s']:,.0f}",
            f"{x['layer_bytes'] / 1e6:.1f}",
            f"{x['share']:.1%}",
            f"{x['share_with_largest_layer']:.1%}",
        ]
        for x in r["rows"]
    ]
    lines += [*markdown_table(head, rows), ""]
    steps = list(next(iter(r["breakdown"].values()))["seconds"])
    lines += [
        "Where a refresh's seconds go: `LayerWriter.write_shards` step by step, each step "
        "CUDA-synchronised (so a little slower than the refresh above), into a partial layer "
        "then removed; q = `error_probabilities`, plan = the draws of every epoch with their "
        "coding and pi_scale (`QueryPlanStage`), to_host = the error, q and sets to numpy, "
        "write = the shard's zarr arrays (zstd), checksum = sha256 of the written files.",
        "",
        *markdown_table(
            ["layer epochs", *steps, "sum", "snapshots/s"],
            [
                [
                    b["epochs"],
                    *(f"{b['seconds'][k]:.3f}" for k in steps),
                    f"{b['total']:.3f}",
                    f"{b['snapshots_per_s']:,.0f}",
                ]
                for b in r["breakdown"].values()
            ],
        ),
        "",
    ]
    if r.get("batch_sweep"):
        base = next(x for x in r["rows"] if x["layer_epochs"] == r["batch_sweep"][0]["epochs"])
        sweep = [f"{r['refresh_batch']} (above): {base['seconds']:.3f} s"]
        sweep += [f"{x['batch']}: {x['seconds']:.3f} s" for x in r["batch_sweep"]]
        lines += [
            f"The same refresh (layer of {base['layer_epochs']} epochs) at other adaptive.batch "
            f"(snapshots per dense forward): {'; '.join(sweep)}.",
            "",
        ]
    ok = [x["refresh_every"] for x in r["rows"] if x["share"] <= 0.10]
    shares = ", ".join(f"R={x['refresh_every']}: {x['share']:.1%}" for x in r["rows"])
    verdict = f"met from R = {min(ok)} on" if ok else "not met at any R measured"
    lines += [f"Goal: <= 10 % of wall-clock at the chosen refresh_every: {verdict} ({shares}).", ""]
    t = r.get("in_training")
    if t and "error" not in t:
        lines += [
            f"In training (`train` with adaptive.refresh_every=1 for {t['epochs']} epochs from "
            f"scratch, {t['batches_per_epoch']} batches each): refreshes took "
            f"{', '.join(f'{s:.3f}' for s in t['refresh_seconds'])} s (metrics' refresh/seconds); "
            f"the loop without them {t['epoch_seconds']:.3f} s per epoch; per epoch "
            f"{', '.join(fmt(x, '.3f') for x in t['epoch_seconds_each'])} s (epoch 0: the set's "
            "own sets and the loader's start; later ones: sets from layers), median step "
            f"{', '.join(fmt(x * 1e3, '.1f') for x in t['step_seconds_median_each'] if x)} ms; "
            f"refresh share {t['refresh_share']:.1%} of train_seconds.",
            "",
        ]
        if "first_batch_wait_each" in t:  # logged since the refreshes run one epoch ahead
            lines += [
                "The loader's wait for the first batch of epochs 1 on, each the first read "
                "from its layer (computed one epoch ahead, so read while the epoch before "
                f"trains): {', '.join(f'{x * 1e3:.1f}' for x in t['first_batch_wait_each'])} ms.",
                "",
            ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--out", type=Path, default=None, help="write bench_adaptive.{json,md} here (default: docs)"
    )
    add("--part", choices=("all", *PARTS), default="all")
    add("--quick", action="store_true", help="tiny sizes: checks the script on a CPU in < 2 min")
    add("--report", nargs="+", type=Path, default=None, help="only render (and merge) these JSON")
    add("--device", default="auto")
    add("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add("--workdir", default=None, help="where the data, shards and runs go (default: a temp dir)")
    add("--resolution", type=int, default=128)
    add("--trajectories", type=int, default=48)
    add("--steps-per-traj", type=int, default=20)
    add("--set-epochs", type=int, default=10, help="query sets built (>= max --refresh-every)")
    add("--train-ratio", type=float, default=0.1, help="k/N of the codec's uniform sets")
    add("--codec-steps", type=int, default=400)
    add("--batch", type=int, default=32, help="training batch")
    add("--width", type=int, default=128)
    add("--tokens", type=int, default=64)
    add("--latent-dim", type=int, default=64)
    add("--workers", type=int, default=4, help="loader.workers")
    add("--log-every", type=int, default=10)
    add("--snapshots", type=int, default=32, help="B, the fixed batch of the variance study")
    add("--draws", type=int, default=64, help="R, draws per configuration and k/N")
    add("--ratios", type=float, nargs="+", default=[0.1, 0.3])
    add("--alpha", type=float, default=0.3, help="gradient's and the error sets' uniform share")
    add(
        "--error-alphas", type=float, nargs="+", default=[0.2, 0.1], help="error sets also at these"
    )
    add("--powers", type=float, nargs="+", default=[0.5, 1.0], help="the first is the refresh's")
    add("--mix", type=float, default=0.5, help="also error p<first power> with this mix (0: not)")
    add("--stale-epochs", type=int, default=5, help="also error sets from this many epochs back")
    add("--chunk-points", type=int, default=1 << 17, help="query points per forward/backward")
    add("--seed", type=int, default=0, help="the keys' seed of the variance draws")
    add(
        "--no-context",
        dest="context",
        action="store_false",
        help="skip the minibatch noise (every training snapshot's dense gradient)",
    )
    add("--refresh-every", type=int, nargs="+", default=[1, 2, 5, 10])
    add("--refresh-repeats", type=int, default=2)
    add("--refresh-batch", type=int, default=16, help="adaptive.batch")
    add("--sweep-batches", type=int, nargs="*", default=[], help="also time refreshes at these")
    add("--no-amp", dest="amp", action="store_false", help="refresh error in float32 on CUDA")
    add("--train-refresh-epochs", type=int, default=4, help="0: skip the in-training refresh run")
    args = parser.parse_args()
    if args.report:
        merged = merge([json.loads(p.read_text()) for p in args.report])
        text = report(merged)
        print(text)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "bench_adaptive.json").write_text(json.dumps(merged, indent=1) + "\n")
            (args.out / "bench_adaptive.md").write_text(text + "\n")
        return
    if args.quick:
        args.resolution, args.trajectories, args.steps_per_traj = 32, 12, 6
        args.codec_steps, args.batch, args.log_every = 12, 8, 2
        args.width, args.tokens, args.latent_dim, args.workers = 32, 8, 16, 1
        args.snapshots, args.draws, args.set_epochs = 8, 6, 4
        args.refresh_every, args.refresh_repeats, args.stale_epochs = [1, 2, 4], 1, 1
        args.train_refresh_epochs, args.error_alphas = 3, [0.1]
        args.sweep_batches = args.sweep_batches or [64]
        # a loaded CPU runs this tiny model ~100x slower on 2 OpenMP threads than on one
        args.threads = args.threads or 1
        if args.out is None:
            args.out = Path(tempfile.gettempdir()) / "bench_adaptive_quick"
    if max(args.refresh_every) > args.set_epochs:
        parser.error("--set-epochs must be >= every --refresh-every")
    if args.threads:
        torch.set_num_threads(args.threads)
    suffix = "" if args.part == "all" else f"_{args.part}"
    if args.out is None:
        args.json_path = REPO / "docs" / "bench" / f"bench_adaptive{suffix}.json"
        args.md_path = REPO / "docs" / f"bench_adaptive{suffix}.md"
    else:
        args.json_path = args.out / f"bench_adaptive{suffix}.json"
        args.md_path = args.out / f"bench_adaptive{suffix}.md"
    bench = Bench(args)
    bench.main()
    text = report(bench.results)
    args.md_path.parent.mkdir(parents=True, exist_ok=True)
    args.md_path.write_text(text + "\n")
    print(text)
    print(f"wrote {args.json_path} and {args.md_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
