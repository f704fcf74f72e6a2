"""Accuracy study on NS 2D 128x128: dense vs uniform vs stratified vs gradient importance.

One run on the GPUs of one machine: generate data, train one codec, build one latent shard set
per sampler configuration from it, then train the operator stage (latent operator + decoder
fine-tuning) with each configuration and several seeds, and report test nRMSE on the dense test
grid in physical space (one-step and rollout at 1/4/16, next to persistence):

* at equal steps: every configuration trains ``--train-steps`` steps;
* at equal wall-clock: each constant-ratio sparse run then resumes (exact resume from its
  checkpoint) and trains on until its training seconds match the dense runs' mean.

The learning rate is constant after warm-up (``optim.min_lr_ratio=1``), so the equal-steps
model is the same run's state at step ``--train-steps``, not a shorter schedule. The query sets
span exactly the equal-steps run (the cosine schedule reaches its dense tail there); longer runs
reuse them cyclically, which is why the cosine schedule is compared at equal steps only.

Runs are spread over the visible GPUs, one worker process per GPU. Results go to
OUT/bench_accuracy.json after every run; ``--report`` renders the markdown table and the plot.

    python tools/bench/bench_accuracy.py --out-dir docs/bench            # on a GPU machine
    python tools/bench/bench_accuracy.py --smoke --out-dir /tmp/acc       # tiny, on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from bench_common import environment_lines, markdown_table

from pipeline.build import BuildConfig, run_build
from pipeline.config import load_config
from pipeline.loader import BatchSpec, LoaderConfig, ShardLoader
from pipeline.samplers import SamplerConfig
from pipeline.schedules import ScheduleConfig
from pipeline.shards import open_shards
from pipeline.sources.generate import generate
from pipeline.sources.splits import DataConfig
from ups.models.codec import load_encoder
from ups.training.train import TrainConfig, Trainer

# name -> (sampler kind, schedule overrides); "dense" trains with loss.mode=dense
CONFIGS = {
    "dense": None,
    "uniform 0.3": ("uniform", {"start_ratio": 0.3}),
    "stratified 0.3": ("stratified", {"start_ratio": 0.3}),
    "gradient 0.3": ("gradient", {"start_ratio": 0.3}),
    "uniform 0.1": ("uniform", {"start_ratio": 0.1}),
    "stratified 0.1": ("stratified", {"start_ratio": 0.1}),
    "gradient 0.1": ("gradient", {"start_ratio": 0.1}),
    "gradient cosine 0.8->0.2 + dense tail": (
        "gradient",
        {"kind": "cosine", "start_ratio": 0.8, "end_ratio": 0.2, "dense_tail_epochs": 2},
    ),
}
EQUAL_TIME = tuple(n for n, spec in CONFIGS.items() if spec and "kind" not in spec[1])
METRICS = ("model_h1", "model_h4", "model_h16", "recon_nrmse")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def run_job(job: dict) -> dict:
    """Train one (configuration, seed) run; the record holds its test metrics and seconds."""
    record = {k: job[k] for k in ("config", "seed", "budget", "steps")}
    try:
        trainer = Trainer(load_config(TrainConfig, None, job["overrides"]))
        record["test"] = trainer.fit()
        record["train_seconds"] = trainer.train_seconds
    except Exception as err:  # record and continue: one failed run must not lose the study
        record["error"] = f"{type(err).__name__}: {err}"
        print(traceback.format_exc(), flush=True)
    return record


def warm_up(job: dict, scratch: Path) -> None:
    """A short unrecorded run first, so that no timed run pays for CUDA and kernel warm-up."""
    overrides = [o for o in job["overrides"] if not o.startswith("resume=")]
    run_job({**job, "overrides": [*overrides, f"out={scratch}", "max_steps=20", "overwrite=true"]})


def worker(job_file: Path) -> None:
    """Run a list of jobs on this process's GPU, appending each record to JOB_FILE.out.jsonl."""
    spec = json.loads(job_file.read_text())
    if spec["jobs"]:
        warm_up(spec["jobs"][0], job_file.with_suffix(".warmup"))
    for job in spec["jobs"]:
        record = (
            run_job(job)
            if time.time() < spec["deadline"]
            else {
                **{k: job[k] for k in ("config", "seed", "budget", "steps")},
                "error": "skipped: time budget",
            }
        )
        with open(f"{job_file}.out.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


class Study:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_acc_"))
        self.results: dict = {
            "environment": environment_lines(),
            "args": vars(args),
            "runs": [],
            "setup": {},
        }
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.gpus = args.gpus or max(1, torch.cuda.device_count())
        self.deadline = time.time() + args.time_budget

    def save(self) -> None:
        (self.out / "bench_accuracy.json").write_text(
            json.dumps(self.results, indent=1, default=str)
        )

    def model_overrides(self) -> list[str]:
        a = self.args
        return [
            "codec.encoder.patch=8", f"codec.encoder.dim={a.width}", "codec.encoder.depth=2", "codec.encoder.heads=4",
            f"codec.encoder.num_tokens={a.tokens}", f"codec.encoder.latent_dim={a.latent_dim}",
            f"codec.decoder.dim={a.width}", "codec.decoder.depth=3", "codec.decoder.heads=4",
            f"operator.dim={a.width}", "operator.depth=4", "operator.heads=4",
            "progress=false", "tensorboard=false", "loader.workers=4", "loader.wrap_epochs=true",
            f"batch_size={a.batch}", "eval_trajectories=4", "optim.warmup_steps=50",
            "optim.min_lr_ratio=1.0", "eval_every=1000000", "checkpoint_every=1000000",
        ]  # fmt: skip

    def setup(self) -> None:
        a = self.args
        started = time.perf_counter()
        self.data = generate(
            "ns2d",
            self.tmp / "ns.h5",
            a.trajectories,
            a.steps_per_traj,
            a.resolution,
            seed=0,
            device=self.device,
            progress=False,
        )
        fields = self.build("fields", None, SamplerConfig(kind="uniform"), {"start_ratio": 0.3}, 1)
        cfg = load_config(
            TrainConfig,
            None,
            [
                *self.model_overrides(),
                "stage=codec",
                f"shards={fields}",
                f"out={self.tmp / 'codec'}",
                f"max_steps={a.codec_steps}",
                f"epochs={10**6}",  # the field shards hold one query set, reused cyclically
                "optim.min_lr_ratio=0.05",  # the codec trains on a cosine schedule
            ],
        )
        trainer = Trainer(cfg)
        codec_metrics = trainer.fit()
        self.codec = self.tmp / "codec" / "codec.pt"
        # query sets for exactly the epochs of the equal-steps runs
        pairs = BatchSpec(window=1)  # the operator stage's examples: (u_t, u_{t+1}) pairs
        no_process = LoaderConfig(process=False)
        batches = ShardLoader(
            open_shards(fields), no_process, batch_size=a.batch, spec=pairs
        ).batches_per_epoch
        epochs = max(4, math.ceil(a.train_steps / batches))  # the cosine schedule needs a few
        self.shards = {}
        for name, spec in CONFIGS.items():
            if spec is not None:
                kind, schedule = spec
                self.shards[name] = self.build(
                    name, self.codec, SamplerConfig(kind=kind), schedule, epochs
                )
        self.shards["dense"] = self.shards["gradient 0.3"]  # dense training reads the same fields
        self.results["setup"] = {
            "codec_test": codec_metrics,
            "codec_train_seconds": trainer.train_seconds,
            "codec_steps": trainer.step,  # steps actually trained
            "batches_per_epoch": batches,
            "k_per_epoch": {
                name: open_shards(path).k_per_epoch for name, path in self.shards.items()
            },
            "gpus": self.gpus,
            "setup_seconds": time.perf_counter() - started,
        }
        self.save()

    def build(
        self, name: str, encoder: Path | None, sampler: SamplerConfig, schedule: dict, epochs: int
    ) -> str:
        out = self.tmp / ("shards_" + slug(name))
        run_build(
            BuildConfig(
                data=DataConfig(path=str(self.data)),
                out=str(out),
                format="zarr",
                encoder=None if encoder is None else str(encoder),
                epochs=epochs,
                sampler=sampler,
                schedule=ScheduleConfig(**schedule),
                trajectories_per_shard=4,
                progress=False,
            ),
            load_encoder=load_encoder,
        )
        return str(out)

    def job(self, name: str, seed: int, steps: int, budget: str) -> dict:
        run_dir = self.tmp / "runs" / f"{slug(name)}_seed{seed}"
        overrides = [
            *self.model_overrides(),
            "stage=operator",
            f"shards={self.shards[name]}",
            f"codec_checkpoint={self.codec}",
            f"out={run_dir}",
            f"seed={seed}",
            f"loader.seed={seed}",
            f"max_steps={steps}",
            f"epochs={10**6}",
        ]
        overrides += ["loss.mode=dense"] if name == "dense" else []
        overrides += [f"resume={run_dir / 'checkpoint.pt'}"] if budget == "equal_time" else []
        return {
            "config": name,
            "seed": seed,
            "budget": budget,
            "steps": steps,
            "overrides": overrides,
        }

    def execute(self, jobs: list[dict]) -> None:
        """Run jobs, in-process on one device, else spread over one worker process per GPU."""
        if self.gpus == 1:
            if jobs:
                warm_up(jobs[0], self.tmp / "warmup")
            for job in jobs:
                record = (
                    run_job(job)
                    if time.time() < self.deadline
                    else {**job, "error": "skipped: time budget"}
                )
                record.pop("overrides", None)
                self.results["runs"].append(record)
                self.save()
            return
        files = []
        for gpu in range(self.gpus):
            path = self.tmp / f"jobs_{len(self.results['runs'])}_{gpu}.json"
            path.write_text(json.dumps({"jobs": jobs[gpu :: self.gpus], "deadline": self.deadline}))
            files.append(path)
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(path)],
                env={
                    **os.environ,
                    "CUDA_VISIBLE_DEVICES": str(gpu),
                    "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // self.gpus)),
                },
            )
            for gpu, path in enumerate(files)
        ]
        before = list(self.results["runs"])
        while True:
            done = all(p.poll() is not None for p in procs)
            merged = []
            for path in files:
                out = Path(f"{path}.out.jsonl")
                if out.exists():
                    merged += [json.loads(line) for line in out.read_text().splitlines()]
            self.results["runs"] = before + merged
            self.save()
            if done:
                return
            time.sleep(5)

    def main(self) -> None:
        a = self.args
        self.setup()
        # dense first, then the rest, interleaved so that each GPU gets a similar load
        self.execute(
            [
                self.job(name, seed, a.train_steps, "equal_steps")
                for name in CONFIGS
                for seed in range(a.seeds)
            ]
        )
        runs = [r for r in self.results["runs"] if "train_seconds" in r]

        def seconds(name: str) -> list[float]:
            return [r["train_seconds"] for r in runs if r["config"] == name]

        if not seconds("dense"):
            return
        dense = statistics.mean(seconds("dense"))
        self.execute(
            [
                self.job(
                    name,
                    seed,
                    max(a.train_steps, int(a.train_steps * dense / statistics.mean(seconds(name)))),
                    "equal_time",
                )
                for name in EQUAL_TIME
                if seconds(name)
                for seed in range(a.seeds)
            ]
        )


# ---------------------------------------------------------------- report


def summarise(runs: list[dict], config: str, budget: str) -> dict | None:
    done = [r for r in runs if r["config"] == config and r["budget"] == budget and "test" in r]
    if not done:
        return None
    out = {
        "n": len(done),
        "steps": done[0]["steps"],
        "seconds": statistics.mean(r["train_seconds"] for r in done),
    }
    for m in (*METRICS, "persistence_h1", "persistence_h4", "persistence_h16"):
        values = [r["test"][m] for r in done if m in r["test"]]
        if values:
            out[m] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def report(results: dict, plot: Path | None = None) -> str:
    runs = results["runs"]
    setup = results.get("setup", {})
    lines = [
        "## Accuracy study (GPU): operator stage on NS 2D, dense vs sparse samplers",
        "",
        *results["environment"],
        "",
    ]
    if "codec_test" in setup:
        lines += [
            f"- codec (stage 1, {setup['codec_steps']} steps, uniform 0.3): test reconstruction nRMSE {setup['codec_test']['recon_nrmse']:.4f}",
            "",
        ]
    if "k_per_epoch" in setup:
        ks = {name: sorted(set(v)) for name, v in setup["k_per_epoch"].items()}
        lines += [f"- k_e per configuration: {ks}", ""]
    head = [
        "configuration",
        "seeds",
        "steps",
        "train s",
        "one-step nRMSE",
        "rollout h4",
        "rollout h16",
        "recon",
        "one-step / dense",
    ]
    for budget, title in (
        ("equal_steps", "Equal steps"),
        ("equal_time", "Equal wall-clock (the dense runs' training seconds)"),
    ):
        dense = summarise(runs, "dense", "equal_steps")
        rows = []
        for name in CONFIGS:
            s = (
                summarise(runs, name, budget)
                if not (budget == "equal_time" and name == "dense")
                else dense
            )
            if s is None:
                continue

            def ms(m, s=s):
                return f"{s[m][0]:.4f} ± {s[m][1]:.4f}" if m in s else "-"

            rel = (
                f"{s['model_h1'][0] / dense['model_h1'][0]:.3f}"
                if dense and "model_h1" in s
                else "-"
            )
            rows.append(
                [
                    name,
                    s["n"],
                    s["steps"],
                    f"{s['seconds']:.1f}",
                    ms("model_h1"),
                    ms("model_h4"),
                    ms("model_h16"),
                    ms("recon_nrmse"),
                    rel,
                ]
            )
        if rows:
            lines += [f"### {title}", "", *markdown_table(head, rows), ""]
    if dense := summarise(runs, "dense", "equal_steps"):
        p = [
            f"h{h} {dense[f'persistence_h{h}'][0]:.4f}"
            for h in (1, 4, 16)
            if f"persistence_h{h}" in dense
        ]
        lines += [f"Persistence (u_t+h = u_t) on the same test split: {', '.join(p)}.", ""]
    if plot is not None and runs:
        draw(runs, plot)
        lines += [f"![nRMSE against training seconds]({plot.name})", ""]
    return "\n".join(lines)


def draw(runs: list[dict], path: Path) -> None:
    """One colour per configuration: o at equal steps, s at equal wall-clock, joined by a line."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = colormaps["tab10"].colors
    for i, name in enumerate(CONFIGS):
        points = [
            (s["seconds"], *s["model_h1"], marker)
            for budget, marker in (("equal_steps", "o"), ("equal_time", "s"))
            if (s := summarise(runs, name, budget)) and "model_h1" in s
        ]
        if not points:
            continue
        colour = colours[i % len(colours)]
        ax.plot([p[0] for p in points], [p[1] for p in points], color=colour, alpha=0.5)
        for j, (x, y, err, marker) in enumerate(points):
            ax.errorbar(
                x, y, yerr=err, fmt=marker, color=colour, capsize=3, label=name if j == 0 else None
            )
    ax.set(
        xlabel="training wall-clock seconds (GPU); o: equal steps, s: equal wall-clock",
        ylabel="test one-step nRMSE (dense grid, physical)",
        title="NS 2D 128x128, operator stage (mean ± std over seeds)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="docs/bench")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--report", default=None, help="only render this bench_accuracy.json")
    parser.add_argument("--plot", default=None, help="with --report: PNG path for the plot")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--trajectories", type=int, default=48)
    parser.add_argument("--steps-per-traj", type=int, default=20, help="> 16 for the h16 rollout")
    parser.add_argument("--codec-steps", type=int, default=1500)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument(
        "--time-budget", type=float, default=500.0, help="seconds; later runs are skipped"
    )
    parser.add_argument(
        "--gpus", type=int, default=0, help="worker processes, one per GPU (0: every visible GPU)"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker))
        return
    if args.report:
        plot = Path(args.plot) if args.plot else None
        print(report(json.loads(Path(args.report).read_text()), plot))
        return
    if args.smoke:
        args.resolution, args.trajectories, args.steps_per_traj = 32, 12, 6
        args.codec_steps, args.train_steps, args.seeds, args.batch = 10, 6, 2, 8
        args.width, args.tokens, args.latent_dim = 32, 8, 16
    study = Study(args)
    study.main()
    text = report(study.results)
    (study.out / "bench_accuracy.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
