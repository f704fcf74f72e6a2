"""GPU training-step benchmark: what sparse precomputed queries buy, measured side by side.

One run on one GPU builds what it needs (generated NS 2D 128x128 data, a codec, latent shards
at several ratios) and measures, with the library's own training step (``Models`` +
``compute_losses`` + AdamW, bf16 autocast):

1. the decoder-loss step alone (decoder hidden 256, 3 cross-attention layers) at dense and at
   ratios 0.5 / 0.3 / 0.1 / 0.05: median / p10 / p90 step time and peak memory;
2. the whole operator-stage and codec-stage steps on GPU-resident batches, broken down into
   operator or encoder, decoder + loss, optimizer (by differences of measured variants), with
   the Amdahl bound 1 / ((1 - f) + f r) from the measured dense decoder share f;
3. streaming from zarr and from tars vs the same batches already on the GPU, at ratio 0.1;
4. the three ways to get sparse queries on equal terms: dense, on-the-fly sampling inside the
   loss, precomputed sets from shards;
5. eager vs torch.compile for the operator and codec steps, dense and at ratio 0.1;
6. host-to-GPU copies of pinned batches on the training stream against a stream of their own.

Results go to OUT/bench_train.json after every section; ``--report`` turns that JSON into the
markdown tables of docs/benchmarks.md.

    python tools/bench/bench_train.py --out-dir docs/bench           # on a GPU
    python tools/bench/bench_train.py --smoke --out-dir /tmp/bench   # tiny, on a CPU: checks the script
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import resource
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
from bench_common import environment_lines, forever, markdown_table, run_section, synthetic_data

from pipeline.build import BuildConfig, run_build
from pipeline.config import load_config
from pipeline.loader import LoaderConfig, ShardLoader
from pipeline.samplers import SamplerConfig
from pipeline.schedules import ScheduleConfig
from pipeline.shards import open_shards
from pipeline.sources.splits import DataConfig, NormStats
from pipeline.transfer import SideStreamCopy
from ups.models.codec import Codec, CodecConfig, load_encoder, save_codec
from ups.models.decoder import AnyPointDecoder, DecoderConfig
from ups.models.encoder import EncoderConfig
from ups.models.operator import LatentOperator, OperatorConfig
from ups.training.losses import weighted_point_loss
from ups.training.train import Models, TrainConfig, batch_spec

RATIOS = (1.0, 0.5, 0.3, 0.1, 0.05)


def main_thread_waits() -> int:
    """Voluntary context switches of the calling thread so far (Linux; 0 elsewhere): each is a
    wait, for the interpreter lock or for the GPU, during which the thread gave up its core."""
    rusage_thread = getattr(resource, "RUSAGE_THREAD", None)
    return 0 if rusage_thread is None else resource.getrusage(rusage_thread).ru_nvcsw


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.out = Path(args.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict = {
            "environment": environment_lines(),
            "args": vars(args),
            "sections": {},
        }
        self.started = time.perf_counter()

    def save(self) -> None:
        (self.out / "bench_train.json").write_text(json.dumps(self.results, indent=1, default=str))

    def section(self, name: str, fn) -> None:
        """Run one section; a failure is recorded, not fatal, so later sections still run."""
        if time.perf_counter() - self.started > self.args.time_budget:
            self.results["sections"][name] = {"skipped": "time budget spent"}
            self.save()
            return
        run_section(self.results["sections"], name, fn)
        self.save()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self):
        return (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()
        )

    def time_steps(
        self, step, batches, steps: int | None = None, warmup: int | None = None
    ) -> dict:
        """Wall time per step (CUDA-synchronised), median/p10/p90/mean in ms, and peak GPU memory."""
        steps = steps or self.args.steps
        warmup = self.args.warmup if warmup is None else warmup
        it = iter(batches)
        for _ in range(warmup):
            step(next(it))
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        cpu, waits = time.process_time(), main_thread_waits()
        for _ in range(steps):
            start = time.perf_counter()
            step(next(it))
            self.sync()
            times.append((time.perf_counter() - start) * 1e3)
        cpu, waits = time.process_time() - cpu, main_thread_waits() - waits
        q = statistics.quantiles(times, n=10)
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")
        return {
            "median_ms": statistics.median(times),
            "p10_ms": q[0],
            "p90_ms": q[-1],
            "mean_ms": statistics.fmean(times),
            "peak_gib": peak,
            "steps": steps,
            "process_cpu_ms": cpu / steps * 1e3,  # all threads' CPU time per step
            "main_waits": waits / steps,  # times per step the main thread blocked (lock, sync)
        }

    # ---------------------------------------------------------------- setup

    def setup(self) -> dict:
        a = self.args
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
        data = synthetic_data(
            self.tmp, "ns2d", a.resolution, a.trajectories, a.steps_per_traj, str(self.device)
        )
        source, splits = DataConfig(path=str(data)).open()
        norm = NormStats.from_trajectories(source, splits["train"], progress=False)
        self.codec_cfg = CodecConfig(
            EncoderConfig(
                patch=8, dim=a.width, depth=2, heads=8, num_tokens=a.tokens, latent_dim=a.latent_dim
            ),
            DecoderConfig(dim=a.width, depth=3, heads=8, num_freqs=16, max_freq=64.0),
        )
        self.info = source.info
        self.codec_path = self.tmp / "codec.pt"
        save_codec(self.codec_path, Codec(self.codec_cfg, source.info), norm)
        self.shards = {}
        build_seconds = {}
        for ratio in RATIOS[1:]:
            cfg = BuildConfig(
                data=DataConfig(path=str(data)),
                out=str(self.tmp / f"shards_{ratio}"),
                encoder=str(self.codec_path),
                epochs=2,
                sampler=SamplerConfig(kind="gradient"),
                schedule=ScheduleConfig(start_ratio=ratio),
                trajectories_per_shard=4,
                progress=False,
            )
            summary = run_build(cfg, load_encoder=load_encoder)
            build_seconds[str(ratio)] = summary["seconds"]
            self.shards[ratio] = cfg.out
        n = a.resolution**2
        return {
            "data": f"NS 2D {a.resolution}x{a.resolution}, {a.trajectories} trajectories x {a.steps_per_traj} steps",
            "N": n,
            "k": {str(r): open_shards(self.shards[r]).k_per_epoch[0] for r in RATIOS[1:]},
            "build_seconds": build_seconds,
        }

    # ---------------------------------------------------------------- 1. decoder-loss step

    def decoder_step(self) -> dict:
        a = self.args
        torch.manual_seed(0)
        decoder = AnyPointDecoder(self.codec_cfg.decoder, a.latent_dim, 2, 1, a.tokens).to(
            self.device
        )
        opt = torch.optim.AdamW(decoder.parameters(), lr=1e-4)
        n = a.resolution**2
        out = {}
        for ratio in RATIOS:
            k = n if ratio == 1.0 else open_shards(self.shards[ratio]).k_per_epoch[0]
            batches = [
                (
                    torch.randn(a.batch, a.tokens, a.latent_dim, device=self.device),
                    torch.rand(a.batch, k, 2, device=self.device),
                    torch.randn(a.batch, k, 1, device=self.device),
                    torch.rand(a.batch, k, device=self.device) + 0.5,
                )
                for _ in range(4)
            ]

            def step(b, decoder=decoder, opt=opt):
                z, coords, targets, w = b
                with self.autocast():
                    loss = weighted_point_loss(decoder(z, coords), targets, w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            out[str(ratio)] = {"k": k, **self.guarded(step, forever(batches))}
        return out

    def guarded(self, step, batches, **kw) -> dict:
        """time_steps, with a failure (out of memory, say) recorded instead of raised."""
        try:
            return self.time_steps(step, batches, **kw)
        except Exception as err:
            if self.cuda:
                torch.cuda.empty_cache()
            print(traceback.format_exc())
            return {"error": f"{type(err).__name__}: {str(err)[:200]}"}

    # ---------------------------------------------------------------- 2. whole steps, resident

    def train_config(
        self, stage: str, mode: str = "sparse", ratio: float = 1.0, **loss
    ) -> TrainConfig:
        overrides = [f"stage={stage}", f"loss.mode={mode}", f"codec_checkpoint={self.codec_path}"]
        overrides += [f"operator.dim={self.args.width}", "operator.depth=4", "operator.heads=8"]
        if mode == "on_the_fly":
            overrides.append(f"loss.query_sample_ratio={ratio}")
        overrides += [f"loss.{k}={v}" for k, v in loss.items()]
        return load_config(TrainConfig, None, overrides)

    def models(self, stage: str) -> Models:
        torch.manual_seed(0)
        codec = Codec(self.codec_cfg, self.info)
        operator = (
            LatentOperator(
                load_config(OperatorConfig, None, [f"dim={self.args.width}", "depth=4", "heads=8"]),
                self.args.latent_dim,
                self.args.tokens,
                len(self.info.params),
                coord_dim=len(self.info.grid),
            )
            if stage == "operator"
            else None
        )
        if stage == "operator":
            codec.encoder.requires_grad_(False)
        return Models(codec, operator).to(self.device)

    def loader(
        self,
        stage: str,
        ratio: float,
        mode: str,
        fmt: str = "zarr",
        workers: int | None = None,
        cache_mb: int = 2048,
        process: bool = True,
    ) -> ShardLoader:
        shards = open_shards(self.shards[ratio if ratio < 1 else 0.1], "train", fmt)
        cfg = LoaderConfig(
            workers=self.args.workers if workers is None else workers,
            cache_mb=cache_mb,
            prefetch=8,
            format=fmt,
            wrap_epochs=True,
            process=process,
        )
        spec = batch_spec(self.train_config(stage, mode))
        return ShardLoader(shards, cfg, batch_size=self.args.batch, spec=spec, device=self.device)

    def resident(self, loader: ShardLoader, count: int = 6) -> list:
        batches = []
        for batch in forever(loader):
            batches.append(batch)
            if len(batches) == count:
                break
        loader.close()
        return batches

    def train_step(self, models: Models, cfg: TrainConfig, timings: dict | None = None):
        opt = torch.optim.AdamW([p for p in models.parameters() if p.requires_grad], lr=1e-4)
        gen = torch.Generator(self.device).manual_seed(0)

        def step(batch):
            with self.autocast():
                terms = models(batch, cfg, gen)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
            if timings is not None:
                self.sync()
                start = time.perf_counter()
            opt.step()
            if timings is not None:
                self.sync()
                timings.setdefault("optimizer", []).append((time.perf_counter() - start) * 1e3)

        return step

    def stage_steps(self, stage: str) -> dict:
        out = {}
        models = self.models(stage)
        for ratio in RATIOS:
            mode = "dense" if ratio == 1.0 else "sparse"
            batches = self.resident(self.loader(stage, ratio, mode, process=False))
            timings: dict = {}
            out[str(ratio)] = self.guarded(
                self.train_step(models, self.train_config(stage, mode), timings), forever(batches)
            )
            if timings:
                out[str(ratio)]["optimizer_ms"] = statistics.median(timings["optimizer"])
            del batches
        # the decoder's share: the same step without the decoder losses
        if stage == "operator":
            batches = self.resident(self.loader(stage, 0.1, "sparse", process=False))
            out["no_decoder"] = self.guarded(
                self.train_step(models, self.train_config(stage, "sparse", forward=0, inverse=0)),
                forever(batches),
            )
        else:
            # the codec step without the encoder: decoder + loss on latents of a frozen encoder
            enc = models.codec.encoder
            for ratio in (1.0, 0.1):
                mode = "dense" if ratio == 1.0 else "sparse"
                batches = self.resident(self.loader(stage, ratio, mode, process=False))
                with torch.no_grad(), self.autocast():
                    zs = [enc(b.fields).float() for b in batches]
                decoder = models.codec.decoder
                opt = torch.optim.AdamW(decoder.parameters(), lr=1e-4)

                def step(pair, decoder=decoder, opt=opt, mode=mode):
                    batch, z = pair
                    if mode == "dense":
                        coords = models.codec.grid_coords.expand(z.shape[0], -1, -1)
                        targets, w = batch.fields.flatten(2).transpose(1, 2), None
                    else:
                        coords, targets, w = batch.coords, batch.targets, batch.weights
                    with self.autocast():
                        loss = weighted_point_loss(decoder(z, coords), targets, w)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                out[f"decoder_only_{ratio}"] = self.guarded(
                    step, forever(list(zip(batches, zs, strict=True)))
                )
        return out

    # ---------------------------------------------------------------- 3. streaming vs resident

    def streaming(self) -> dict:
        """Resident batches vs the loader from zarr and from tars, with the RAM shard cache (after
        the warm-up every shard is in it) and without it (every epoch reads and verifies).

        The eager step is host-bound and its time drifts by a few per cent over a run, more than
        the difference measured here; so the configurations take turns, in ``--stream-rounds``
        rounds, and each reports its median round."""
        models = self.models("operator")
        cfg = self.train_config("operator")
        batches = self.resident(self.loader("operator", 0.1, "sparse", process=False))
        sources = {
            "resident": None,
            "zarr": ("zarr", 2048, True),
            "zarr_no_cache": ("zarr", 0, True),
        }
        sources |= {"wds": ("wds", 2048, True), "wds_no_cache": ("wds", 0, True)}
        sources |= {"zarr_threads": ("zarr", 2048, False)}  # the graph in this process
        rounds: dict[str, list[dict]] = {name: [] for name in sources}
        for _ in range(self.args.stream_rounds):
            for name, source in sources.items():
                loader = None
                if source is not None:
                    fmt, cache_mb, process = source
                    loader = self.loader(
                        "operator", 0.1, "sparse", fmt=fmt, cache_mb=cache_mb, process=process
                    )
                result = self.guarded(
                    self.train_step(models, cfg),
                    forever(batches if loader is None else loader),
                    steps=self.args.stream_steps,
                )
                rounds[name].append(result)
                if loader is not None:
                    loader.close()
        out = {}
        for name, results in rounds.items():
            ok = sorted((r for r in results if "error" not in r), key=lambda r: r["mean_ms"])
            out[name] = (
                {**ok[len(ok) // 2], "round_mean_ms": [r["mean_ms"] for r in ok]}
                if ok
                else results[0]
            )
        return out

    # ---------------------------------------------------------------- 4. three ways

    def three_ways(self) -> dict:
        out = {}
        models = self.models("operator")
        for name, mode in (
            ("dense", "dense"),
            ("on_the_fly", "on_the_fly"),
            ("precomputed", "sparse"),
        ):
            loader = self.loader("operator", 0.1, mode)
            cfg = self.train_config("operator", mode, 0.1)
            out[name] = self.guarded(
                self.train_step(models, cfg), forever(loader), steps=self.args.stream_steps
            )
            loader.close()
        return out

    # ---------------------------------------------------------------- 5. torch.compile

    def compiled(self) -> dict:
        out = {}
        for stage, ratio in itertools.product(("operator", "codec"), (1.0, 0.1)):
            mode = "dense" if ratio == 1.0 else "sparse"
            models = self.models(stage)
            batches = self.resident(self.loader(stage, ratio, mode, process=False))
            models.compile()
            start = time.perf_counter()
            result = self.guarded(
                self.train_step(models, self.train_config(stage, mode)),
                forever(batches),
                warmup=5,
            )
            out[f"{stage}_{ratio}"] = {
                **result,
                "compile_and_run_seconds": time.perf_counter() - start,
            }
            del batches, models
            torch._dynamo.reset()
        return out

    # ---------------------------------------------------------------- 6. host-to-GPU copies

    def copies(self) -> dict:
        """The operator step fed from pinned host batches, each copied to the GPU on the
        training stream (how the loader copied before pipeline/transfer.py) or on a stream of
        its own (SideStreamCopy, how it copies now), against the same batches already on the
        GPU. Nothing is synchronised between steps, as in training: a copy can only hide
        behind steps the GPU still has queued. The feeds take turns in --stream-rounds rounds;
        each reports its median round."""
        models = self.models("operator")
        side = SideStreamCopy(self.device) if self.cuda else None
        out: dict = {}
        for ratio in (1.0, 0.3, 0.1):
            mode = "dense" if ratio == 1.0 else "sparse"
            resident = self.resident(self.loader("operator", ratio, mode, process=False))
            pinned = [b.to("cpu") for b in resident]
            if side is not None:
                pinned = [b.pin_memory() for b in pinned]
            feeds = {
                "resident": lambda i, resident=resident: resident[i],
                "training stream": lambda i, pinned=pinned: pinned[i].to(
                    self.device, non_blocking=True
                ),
            }
            if side is not None:
                feeds["side stream"] = lambda i, pinned=pinned: side.batch(pinned[i])
            step = self.train_step(models, self.train_config("operator", mode))
            rounds: dict[str, list[float]] = {name: [] for name in feeds}
            for _ in range(self.args.stream_rounds):
                for name, feed in feeds.items():
                    rounds[name].append(self.unsynced_ms(step, feed, len(resident)))
            megabytes = sum(t.numel() * t.element_size() for t in pinned[0].tensors()) / 2**20
            out[str(ratio)] = {
                "batch_mib": megabytes,
                **{
                    name: {"mean_ms": statistics.median(ms), "round_mean_ms": ms}
                    for name, ms in rounds.items()
                },
            }
            del resident, pinned
        return out

    def unsynced_ms(self, step, feed, count: int) -> float:
        """Mean ms per step over --stream-steps steps, synchronised only at the start and end."""
        for i in range(self.args.warmup):
            step(feed(i % count))
        self.sync()
        start = time.perf_counter()
        for i in range(self.args.stream_steps):
            step(feed(i % count))
        self.sync()
        return (time.perf_counter() - start) * 1e3 / self.args.stream_steps


# ---------------------------------------------------------------- report


def is_result(v) -> bool:
    return isinstance(v, dict) and ("steps" in v or "error" in v)


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


HEAD = ["config", "median ms", "p10 ms", "p90 ms", "peak GiB"]


def row(name: str, r: dict) -> list[str]:
    """One timing row: median / p10 / p90 / peak memory, or the error."""
    return (
        [
            name,
            fmt(r.get("median_ms"), 2),
            fmt(r.get("p10_ms"), 2),
            fmt(r.get("p90_ms"), 2),
            fmt(r.get("peak_gib"), 2),
        ]
        if "median_ms" in r
        else [name, r.get("error", "-"), "", "", ""]
    )


def setup_table(results: dict) -> list[str]:
    """Render the data line and table 0: build_shards seconds per stage and ratio."""
    setup = results["sections"].get("setup", {})
    if "N" not in setup:
        return []
    lines = [
        f"- data: {setup['data']}; N = {setup['N']} points; k per ratio: {setup['k']}",
        "",
        "### 0. build_shards per stage (latent shards, gradient importance, zarr + tars)",
        "",
    ]
    stages = ("read", "encode", "importance", "query plan", "write", "total")
    rows = [
        [ratio, *(fmt(sec.get(stage), 2) for stage in stages)]
        for ratio, sec in setup["build_seconds"].items()
    ]
    head = ["ratio", "read s", "encode s", "importance s", "query plan s", "write s", "total s"]
    return [*lines, *markdown_table(head, rows), ""]


def decoder_step_table(results: dict) -> list[str]:
    """Render table 1: the decoder-loss step per ratio, speed-up and memory vs dense."""
    s = results["sections"]
    if "decoder_step" not in s or "1.0" not in s["decoder_step"]:
        return []
    dec = s["decoder_step"]
    width = results["args"]["width"]
    lines = [
        f"### 1. Decoder-loss step (decoder hidden {width}, 3 cross-attention layers, batch {results['args']['batch']})",
        "",
    ]
    rows = []
    dense = dec["1.0"]
    for r in RATIOS:
        d = dec[str(r)]
        speed = (
            dense["median_ms"] / d["median_ms"]
            if "median_ms" in d and "median_ms" in dense
            else None
        )
        mem = d["peak_gib"] / dense["peak_gib"] if "peak_gib" in d and "peak_gib" in dense else None
        rows.append(
            [*row(f"ratio {r} (k={d.get('k')})", d), fmt(speed, 2) + "x", fmt(mem, 3) + "x"]
        )
    return [*lines, *markdown_table([*HEAD, "speed-up vs dense", "memory vs dense"], rows), ""]


def stage_steps_table(results: dict, stage: str) -> list[str]:
    """Render table 2 for one stage: whole steps per ratio against the Amdahl bound."""
    key = f"{stage}_steps"
    s = results["sections"]
    if key not in s or "1.0" not in s[key]:
        return []
    st = s[key]
    dense = st["1.0"]["median_ms"]
    if stage == "operator":
        rest = st["no_decoder"]["median_ms"]
        f = (dense - rest) / dense
    else:
        dec = st["decoder_only_1.0"]["median_ms"]
        f = dec / dense
    lines = [
        f"### 2. Whole {stage}-stage step, batches resident on the GPU",
        "",
        f"- dense decoder share f = {f:.3f}",
        "",
    ]
    rows = []
    for r in RATIOS:
        d = st[str(r)]
        if "median_ms" not in d:
            rows.append([f"ratio {r}", d.get("error", "-"), "", "", "", "", "", ""])
            continue
        speed = dense / d["median_ms"]
        bound = 1 / ((1 - f) + f * r)
        rows.append(
            [
                *row(f"ratio {r}", d),
                fmt(d.get("optimizer_ms"), 2),
                f"{speed:.2f}x",
                f"{bound:.2f}x",
                f"{speed / bound:.2f}",
            ]
        )
    lines += [
        *markdown_table([*HEAD, "optimizer ms", "speed-up", "Amdahl bound", "of bound"], rows),
        "",
    ]
    extra = {k: v for k, v in st.items() if k.startswith(("no_decoder", "decoder_only"))}
    return [*lines, *markdown_table(HEAD, [row(k, v) for k, v in extra.items()]), ""]


def streaming_table(results: dict) -> list[str]:
    """Render table 3: streaming from shards vs GPU-resident batches."""
    s = results["sections"]
    if "streaming" not in s or "resident" not in s["streaming"]:
        return []
    st = s["streaming"]
    base = st["resident"].get("mean_ms")
    lines = [
        "### 3. Streaming from shards vs GPU-resident batches (operator stage, ratio 0.1)",
        "",
        "- mean = wall time of all timed steps / steps: the throughput cost of streaming",
        f"- the configurations take turns in {len(st['resident'].get('round_mean_ms', [0]))} "
        "rounds; each row is its median round, the last column all rounds' means",
        "- process CPU: the training process's CPU time per step, all its threads (a loader "
        "process's own is not counted); main-thread waits: voluntary context switches of the "
        "training thread per step (waits for the interpreter lock or the GPU)",
        "",
    ]
    rows = [
        [
            *row(k, v),
            fmt(v.get("mean_ms"), 2),
            fmt(v["mean_ms"] / base, 3) + "x" if "mean_ms" in v and base else "-",
            fmt(v.get("process_cpu_ms"), 1),
            fmt(v.get("main_waits"), 1),
            ", ".join(fmt(m, 2) for m in v.get("round_mean_ms", [])),
        ]
        for k, v in st.items()
        if is_result(v)
    ]
    extra = ["process CPU ms", "main-thread waits", "round means ms"]
    return [*lines, *markdown_table([*HEAD, "mean ms", "mean vs resident", *extra], rows), ""]


def three_ways_table(results: dict) -> list[str]:
    """Render table 4: dense, on-the-fly and precomputed sparse queries."""
    s = results["sections"]
    if "three_ways" not in s:
        return []
    rows = [row(k, v) for k, v in s["three_ways"].items() if is_result(v)]
    return [
        "### 4. Three ways to get sparse queries (operator stage, ratio 0.1, streaming from zarr)",
        "",
        *markdown_table(HEAD, rows),
        "",
    ]


def compiled_table(results: dict) -> list[str]:
    """Render table 5: eager vs torch.compile steps."""
    s = results["sections"]
    if "compiled" not in s:
        return []
    rows = [
        [*row(k, v), fmt(v.get("compile_and_run_seconds"), 1)]
        for k, v in s["compiled"].items()
        if is_result(v)
    ]
    return [
        "### 5. torch.compile (operator and codec stage, resident batches)",
        "",
        *markdown_table([*HEAD, "compile + run s"], rows),
        "",
    ]


def copies_table(results: dict) -> list[str]:
    """Render table 6: host-to-GPU copies on the training stream or a stream of their own."""
    s = results["sections"]
    if "copies" not in s or "1.0" not in s["copies"]:
        return []
    rows = []
    for ratio, r in s["copies"].items():
        if not isinstance(r, dict):  # the section's own entries (its seconds)
            continue
        base = r["resident"]["mean_ms"]
        for name in ("resident", "training stream", "side stream"):
            if name in r:
                ms = r[name]["mean_ms"]
                rounds = ", ".join(fmt(m, 2) for m in r[name]["round_mean_ms"])
                rows.append([f"ratio {ratio}", fmt(r["batch_mib"], 2), name, fmt(ms, 2),
                             f"{ms / base:.3f}x", rounds])  # fmt: skip
    return [
        "### 6. Host-to-GPU copies: on the training stream or a stream of their own",
        "",
        "- the operator step (eager) fed from pinned host batches, no synchronisation between "
        "steps; mean = wall time of all steps / steps, median of the rounds",
        "",
        *markdown_table(
            ["config", "batch MiB", "copy on", "mean ms", "vs resident", "round means ms"], rows
        ),
        "",
    ]


def report(results: dict) -> str:
    """Render the whole markdown report: environment, then tables 0 to 6."""
    lines = ["## Training-step benchmark (GPU)", "", *results["environment"], ""]
    lines += setup_table(results)
    lines += decoder_step_table(results)
    for stage in ("operator", "codec"):
        lines += stage_steps_table(results, stage)
    lines += streaming_table(results)
    lines += three_ways_table(results)
    lines += compiled_table(results)
    lines += copies_table(results)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="docs/bench")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, to check the script on a CPU"
    )
    parser.add_argument(
        "--report", default=None, help="only render this bench_train.json to markdown"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--stream-steps", type=int, default=100)
    parser.add_argument(
        "--stream-rounds", type=int, default=3, help="turns of the streaming section"
    )
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--trajectories", type=int, default=40)
    parser.add_argument("--steps-per-traj", type=int, default=10)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--latent-dim", type=int, default=128)
    parser.add_argument("--workers", type=int, default=LoaderConfig.workers)
    parser.add_argument(
        "--time-budget", type=float, default=480.0, help="seconds; later sections are skipped"
    )
    parser.add_argument(
        "--sections",
        default="decoder_step,operator_steps,codec_steps,streaming,three_ways,compiled,copies",
    )
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return
    if args.smoke:
        args.steps, args.stream_steps, args.warmup, args.batch = 3, 3, 1, 4
        args.stream_rounds = 1
        args.resolution, args.trajectories, args.steps_per_traj = 32, 10, 4
        args.width, args.tokens, args.latent_dim, args.workers = 32, 8, 16, 1
    bench = Bench(args)
    bench.section("setup", bench.setup)
    for name in args.sections.split(","):
        if name in ("operator_steps", "codec_steps"):
            bench.section(name, lambda n=name: bench.stage_steps(n.split("_")[0]))
        else:
            bench.section(name, getattr(bench, name))
    text = report(bench.results)
    (bench.out / "bench_train.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
