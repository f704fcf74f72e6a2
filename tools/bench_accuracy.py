"""Accuracy study on NS 2D 128x128: dense vs uniform vs stratified vs gradient importance.

One run on one GPU: generate data, train one codec, build one latent shard set per sampler
configuration from it, then train the operator stage (latent operator + decoder fine-tuning)
with each configuration and several seeds, and report test nRMSE on the dense test grid in
physical space (one-step and rollout at 1/4/16, next to persistence):

* at equal steps: every configuration trains the same number of steps;
* at equal wall-clock: selected sparse configurations train for the wall-clock seconds the dense
  runs took (more steps, since their steps are cheaper).

Results go to OUT/bench_accuracy.json after every run; ``--report`` renders the markdown table
and the plot (nRMSE against training seconds).

    python tools/bench_accuracy.py --out-dir docs/bench            # on a GPU
    python tools/bench_accuracy.py --smoke --out-dir /tmp/acc       # tiny, on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
from bench_common import environment_lines, markdown_table

from pipeline.build import BuildConfig, run_build
from pipeline.samplers import SamplerConfig
from pipeline.schedules import ScheduleConfig
from pipeline.shards import open_shards
from ups.config import load_config
from ups.data.generate import generate
from ups.data.splits import DataConfig
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
EQUAL_TIME = ("gradient 0.3", "gradient 0.1", "uniform 0.1")
METRICS = ("model_h1", "model_h4", "model_h16", "recon_nrmse")


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
        self.started = time.perf_counter()

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
            f"batch_size={a.batch}", "eval_trajectories=4", "optim.warmup_steps=50", "eval_every=1000000",
        ]  # fmt: skip

    def setup(self) -> None:
        a = self.args
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
        fields = self.build(
            "fields", None, SamplerConfig(kind="uniform"), ScheduleConfig(start_ratio=0.3)
        )
        cfg = load_config(
            TrainConfig,
            None,
            [
                *self.model_overrides(),
                "stage=codec",
                f"shards={fields}",
                f"out={self.tmp / 'codec'}",
                f"max_steps={a.codec_steps}",
                "optim.lr=1e-3",
            ],
        )
        trainer = Trainer(cfg)
        codec_metrics = trainer.fit()
        self.codec = self.tmp / "codec" / "codec.pt"
        self.results["setup"] = {
            "codec_test": codec_metrics,
            "codec_train_seconds": trainer.train_seconds,
            "codec_steps": a.codec_steps,
        }
        self.shards = {}
        for name, spec in CONFIGS.items():
            if spec is not None:
                kind, schedule = spec
                self.shards[name] = self.build(
                    name, self.codec, SamplerConfig(kind=kind), ScheduleConfig(**schedule)
                )
        self.shards["dense"] = self.shards["gradient 0.3"]  # dense training reads the same fields
        self.results["setup"]["k_per_epoch"] = {
            name: open_shards(path).k_per_epoch for name, path in self.shards.items()
        }
        self.save()

    def build(
        self, name: str, encoder: Path | None, sampler: SamplerConfig, schedule: ScheduleConfig
    ) -> str:
        out = self.tmp / ("shards_" + "".join(c if c.isalnum() else "_" for c in name))
        run_build(
            BuildConfig(
                data=DataConfig(path=str(self.data)),
                out=str(out),
                encoder=None if encoder is None else str(encoder),
                epochs=self.args.epochs,
                sampler=sampler,
                schedule=schedule,
                trajectories_per_shard=4,
                progress=False,
            )
        )
        return str(out)

    def run(self, name: str, seed: int, steps: int, budget: str) -> dict:
        overrides = [
            *self.model_overrides(),
            "stage=operator",
            f"shards={self.shards[name]}",
            f"codec_checkpoint={self.codec}",
        ]
        run_dir = self.tmp / "runs" / f"{budget}_{len(self.results['runs'])}"
        overrides += [
            f"out={run_dir}",
            f"seed={seed}",
            f"loader.seed={seed}",
            f"max_steps={steps}",
            f"epochs={10**6}",
        ]
        overrides += ["loss.mode=dense"] if name == "dense" else []
        record = {"config": name, "seed": seed, "budget": budget, "steps": steps}
        try:
            trainer = Trainer(load_config(TrainConfig, None, overrides))
            record["test"] = trainer.fit()
            record["train_seconds"] = trainer.train_seconds
        except Exception as err:  # record and continue: one failed run must not lose the study
            record["error"] = f"{type(err).__name__}: {err}"
            print(traceback.format_exc())
        self.results["runs"].append(record)
        self.save()
        print(
            json.dumps({k: v for k, v in record.items() if k != "test"}),
            {k: round(v, 4) for k, v in record.get("test", {}).items()},
            flush=True,
        )
        return record

    def main(self) -> None:
        a = self.args
        self.setup()
        for name in CONFIGS:
            for seed in range(a.seeds):
                self.run(name, seed, a.train_steps, "equal_steps")
        dense_seconds = statistics.mean(
            r["train_seconds"]
            for r in self.results["runs"]
            if r["config"] == "dense" and "train_seconds" in r
        )
        for name in EQUAL_TIME:
            times = [
                r["train_seconds"]
                for r in self.results["runs"]
                if r["config"] == name and r["budget"] == "equal_steps" and "train_seconds" in r
            ]
            steps = int(a.train_steps * dense_seconds / statistics.mean(times))
            for seed in range(a.seeds):
                if time.perf_counter() - self.started > a.time_budget:
                    self.results["skipped"] = "equal wall-clock runs cut short by the time budget"
                    self.save()
                    return
                self.run(name, seed, steps, "equal_time")


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name in CONFIGS:
        for budget, marker in (("equal_steps", "o"), ("equal_time", "s")):
            s = summarise(runs, name, budget)
            if s and "model_h1" in s:
                ax.errorbar(
                    s["seconds"],
                    s["model_h1"][0],
                    yerr=s["model_h1"][1],
                    fmt=marker,
                    label=f"{name} ({budget.replace('_', ' ')})",
                    capsize=3,
                )
    ax.set(
        xlabel="training wall-clock seconds (GPU)",
        ylabel="test one-step nRMSE (dense grid, physical)",
        xscale="log",
        title="NS 2D 128x128, operator stage",
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
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--steps-per-traj", type=int, default=16)
    parser.add_argument(
        "--epochs", type=int, default=20, help="precomputed query sets (reused cyclically after)"
    )
    parser.add_argument("--codec-steps", type=int, default=1500)
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--latent-dim", type=int, default=64)
    parser.add_argument("--time-budget", type=float, default=500.0)
    args = parser.parse_args()
    if args.report:
        plot = Path(args.plot) if args.plot else None
        print(report(json.loads(Path(args.report).read_text()), plot))
        return
    if args.smoke:
        args.resolution, args.trajectories, args.steps_per_traj, args.epochs = 32, 12, 6, 3
        args.codec_steps, args.train_steps, args.seeds, args.batch = 10, 6, 2, 8
        args.width, args.tokens, args.latent_dim = 32, 8, 16
    study = Study(args)
    study.main()
    text = report(study.results)
    (study.out / "bench_accuracy.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
