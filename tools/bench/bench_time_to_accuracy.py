"""How much sooner does sparse (query-based) training reach the accuracy dense training gives?

The operator stage (latent operator + decoder fine-tuning) of one shared codec, trained by every
configuration for the same ``--steps`` with several seeds, validated every ``--eval-every``
steps; the study reads each run's validation nRMSE against its training wall-clock:

* the time each configuration takes to reach the dense runs' final validation nRMSE (and 1.05x
  of it), and the speed-up that gives over dense;
* its validation nRMSE at the dense runs' final wall-clock, and its final test nRMSE (one-step,
  rollout h4 and h16) on the dense test grid in physical space;
* whether each run converged: its one-step validation nRMSE improved by less than 1 % over its
  last 20 % of steps. When the dense runs did not, a converged dense model would set a lower
  target, and the times to reach it are lower bounds.

``--steps A B ...`` (a budget ladder) trains every configuration at each length; the report then
adds, per PDE, what each longer run gains and how soon each run reaches the longest dense
runs' final validation nRMSE, in a table and a plot of every rung on one time axis: convergence
across budgets, which the last-20 % rule cannot show under a schedule that anneals over any
run's last 20 %.

Setup, in ``--work`` and reused by a rerun: the data (``--pde``: NS 2D 128x128 or Burgers 1D at
PDEBench's 1024 points, generated; or ``--data FILE``, a PDEBench HDF5 file of your own, whose
grid, trajectories and snapshots then set the study's, and ``--pde`` its models), field-only
shards, one codec (or ``--codec PATH``), and one latent shard set per sampler configuration and
run length from it, each holding exactly the epochs its runs need (``loader.wrap_epochs=false``:
the error-based refreshes replace stored epochs' sets, and the cosine schedule's dense tail falls
on the runs' last epochs). The codec the study trains usually comes out bit for bit the same
on the same GPU model, but not always (likely since the compiler picks some reductions'
kernels by timing them, which can change their summation order), and never on another model:
keep its file and pass it with ``--codec`` to every later sitting. A sitting on another model
without it is refused before any work, and a codec trained again that differs is refused once
its setup is done.

Runs go one per GPU (on a CPU one at a time), each a ``tools/train.py`` process. With
``--dense-gpus N`` the dense runs go first, each under torchrun on N GPUs, and are timed at the
one-GPU dense pace a short probe run measures (torchrun ranks take the same global batches, so
the same steps, as one process). Each finished run is added to OUT/bench_time_to_accuracy.json
at once, and each running run's curve so far is kept there at every progress line
('unfinished', shown by the report), so a sitting that ends mid-run still says where the run
got to; a rerun of the same command skips finished runs and resumes interrupted ones exactly
from their last checkpoint (``resume=``), so the study can run over several sittings of one
machine (the checkpoints stay in ``--work``): ``--time-limit`` stops it cleanly before a sitting
ends (a run's checkpoint is written at every validation). ``--report`` renders without training.
Studies on several hosts, or side by side on one (each on its own GPUs through
CUDA_VISIBLE_DEVICES, with its own ``--out-dir`` and the same ``--codec``; the second started
once the first's setup is done, where they share ``--work``), leave one results file each;
``--merge`` adds their runs to ``--out-dir``'s, refusing runs of other settings, of another
codec or data file, and a run finished in both with other numbers. A study, or a merge, that
would add runs on another GPU model than the results file's is refused: wall-clocks are what the
study compares (``--mixed-devices`` adds them anyway, and the report warns).

This file runs the study; what it compares is in time_to_accuracy_configs.py, and the analysis and
report of its results in time_to_accuracy_report.py.

    python tools/bench/bench_time_to_accuracy.py --out-dir docs/bench --time-limit 500  # 4 GPUs, rerun until done
    python tools/bench/bench_time_to_accuracy.py --smoke --out-dir /tmp/tta --work /tmp/tta_work  # tiny, CPU
    python tools/bench/bench_time_to_accuracy.py --pde ns2d --data 2D_CFD_128.hdf5 --out-dir runs/mine  # your data
    python tools/bench/bench_time_to_accuracy.py --report docs/bench/bench_time_to_accuracy.json
    python tools/bench/bench_time_to_accuracy.py --out-dir docs/bench --merge host2/bench_time_to_accuracy.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_common import (
    ROOT,
    build_field_shards,
    environment_lines,
    gpu_slots,
    read_jsonl,
    repo_relative,
    run_in_slots,
    say,
)
from time_to_accuracy_configs import (
    CONFIGS,
    PDES,
    SHARD_SETS,
    SMOKE,
    SMOKE_MODEL,
    dense_tail_epochs,
    step_kin,
)
from time_to_accuracy_report import pace_gpu, render, timed_on, warmup

from pipeline.loader import BatchSpec, LoaderConfig, ShardLoader
from pipeline.schedules import ScheduleConfig
from pipeline.shards import open_shards
from pipeline.sources.generate import generate
from pipeline.sources.pdebench import DataError, PDEBenchFile
from pipeline.storage import file_sha256, write_atomic

RESULTS = "bench_time_to_accuracy.json"
PACE_STEPS = 300  # the one-GPU dense pace probe of --dense-gpus (at most the runs' steps)
# return codes of a run ended by Ctrl-C or a kill (SIGINT, SIGTERM): it resumes next time
INTERRUPTED = {130, 143, -signal.SIGINT, -signal.SIGTERM}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


# ---------------------------------------------------------------- subprocesses


class Children:
    """The tool's running subprocesses, so that a time limit or a signal ends them cleanly.

    ``stop`` sends SIGINT: train.py then exits at once and its last checkpoint stays for the
    rerun; a build keeps its finished shards. After ``stop`` no new process starts.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.stopping = threading.Event()

    def call(self, command: list[str], env: dict[str, str], log: Path) -> int | None:
        """Run ``command`` to its end, its output appended to ``log``: its return code, or None
        when it was stopped (``stop``, Ctrl-C, a kill) and should resume on the next run."""
        with self._lock, open(log, "a") as out:
            if self.stopping.is_set():
                return None
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
            self._procs.add(proc)
        code = proc.wait()
        with self._lock:
            self._procs.discard(proc)
        return None if self.stopping.is_set() or code in INTERRUPTED else code

    def stop(self, reason: str, grace: float = 60.0) -> None:
        """Interrupt every running process (SIGINT), then kill those still there after ``grace``."""
        with self._lock:
            if self.stopping.is_set():
                return
            self.stopping.set()
            procs = list(self._procs)
        say(f"{reason}: stopping {len(procs)} running process(es)")
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


class Stopped(Exception):
    """The setup was stopped (time limit or signal) before it finished; a rerun goes on."""


def tool(name: str, *options: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / name), *options]


def slot_env(slot: int, slots: int) -> dict[str, str]:
    """A subprocess on GPU ``slot`` of the GPUs this study sees (so two studies can share a
    host through CUDA_VISIBLE_DEVICES), with its share of the CPU cores for torch's threads."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    gpu = visible[slot] if slot < len(visible) and visible[slot].strip() else str(slot)
    threads = max(1, (os.cpu_count() or 1) // slots)
    return {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "OMP_NUM_THREADS": str(threads)}


def wide_env(gpus: int, slots: int) -> dict[str, str]:
    """A data-parallel run on the first ``gpus`` GPU slots, each rank with a slot's share of
    the CPU cores."""
    envs = [slot_env(slot, slots) for slot in range(gpus)]
    visible = ",".join(env["CUDA_VISIBLE_DEVICES"] for env in envs)
    return {**envs[0], "CUDA_VISIBLE_DEVICES": visible}


# ---------------------------------------------------------------- setup


@dataclass
class Setup:
    """What every run of one PDE shares: the data, the codec and the latent shard sets."""

    data: Path
    data_sha256: str
    codec: Path
    codec_sha256: str
    epochs: dict[int, int]  # a run's steps -> the epochs of query sets its latent shard sets hold
    sets: dict[tuple[str, int], Path]  # (shard set name, epochs) -> the set
    info: dict  # what the report says about it


def model_options(args: argparse.Namespace, stage: str) -> list[str]:
    """train.py options of a stage's model: the PDE's overrides, then (--smoke) the tiny ones,
    which win; and no progress bars or TensorBoard files."""
    pde = PDES[args.pde]
    model = pde.codec if stage == "codec" else pde.operator
    return ["progress=false", "tensorboard=false", *model, *(SMOKE_MODEL if args.smoke else ())]


def setup(args: argparse.Namespace, children: Children, slots: int) -> Setup:
    """Data -> field shards -> codec -> one latent shard set per sampler configuration; every
    step is skipped when its output is complete, and a stopped build or codec resumes."""
    pde = PDES[args.pde]
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.data:  # the user's file, read where it is; its content names the work folder
        data = Path(args.data)
        data_sha = file_sha256(data)
        root = Path(args.work) / f"{args.pde}_{slug(data.stem)}_{data_sha[:12]}"
    else:
        root = (
            Path(args.work) / f"{args.pde}_{args.resolution}_{args.trajectories}x{args.snapshots}"
        )
        data = root / "data.h5"
        if not data.exists():
            say(f"generating {args.pde} data: {data}")
            generate(
                args.pde, data, args.trajectories, args.snapshots, args.resolution, seed=0,
                device=device, progress=False,
            )  # fmt: skip
        data_sha = file_sha256(data)
    root.mkdir(parents=True, exist_ok=True)
    fields = root / "fields"
    if not (fields / "manifest.json").exists():
        say(f"building field shards: {fields}")
        schedule = ScheduleConfig(start_ratio=args.field_ratio, multiple=multiple(args))
        build_field_shards(data, fields, args.field_epochs, schedule, device)
    if device == "cuda":
        torch.cuda.empty_cache()  # the GPU's memory is for the runs
    codec, codec_info = train_codec(args, root, fields, children)
    codec_sha = file_sha256(codec)
    batches = ShardLoader(
        open_shards(str(fields)), LoaderConfig(process=False), batch_size=args.batch,
        spec=BatchSpec(window=1),  # the operator stage's examples: (u_t, u_{t+1}) pairs
    ).batches_per_epoch  # fmt: skip
    # each run length (--steps) its own sets, holding exactly its epochs: a run resumes on the
    # set it began with whatever other lengths a later sitting asks for, and the cosine set's
    # dense tail falls on that length's last epochs
    epochs = {steps: math.ceil(steps / batches) for steps in args.steps}
    needed = sorted({CONFIGS[name].shards for name in args.configs}, key=list(SHARD_SETS).index)
    sets = {}
    for count in sorted(set(epochs.values()), reverse=True):
        where = root / "latents" / f"{codec_sha[:12]}_e{count}"
        built = build_latents(args, where, data, codec, needed, count, children, slots)
        sets |= {(name, count): path for name, path in built.items()}
    longest = epochs[max(args.steps)]
    info = {
        "title": pde.title,
        # a file of the user's: its name (not where it lies on their machine) and content
        **({"data_file": {"name": data.name, "sha256": data_sha}} if args.data else {}),
        "resolution": args.resolution,
        "trajectories": args.trajectories,
        "snapshots": args.snapshots,
        "codec": {"path": repo_relative(str(codec)), "sha256": codec_sha, **codec_info},
        "batches_per_epoch": batches,
        "epochs": longest,
        "epochs_by_steps": {str(steps): count for steps, count in epochs.items()},
        "wrap_epochs": False,
        "sets": {},
    }
    for name in needed:  # the longest run's base sets: error-based runs add layers of their own
        shards = open_shards(str(sets[name, longest]), layer=None)
        info["sets"][name] = {
            "k_per_epoch": list(shards.k_per_epoch),
            "num_points": shards.manifest.num_points,
        }
    return Setup(data, data_sha, codec, codec_sha, epochs, sets, info)


def remember_setup(results: dict, args: argparse.Namespace, shared: Setup) -> None:
    """This sitting's setup in the results file, added to what earlier sittings kept there: a
    sitting sets up only the shard sets and lengths its own runs need, and the report describes
    every set and length the file's runs used."""
    saved = results.setdefault("setup", {}).get(args.pde, {})
    info = dict(shared.info)
    earlier = saved.get("codec", {})
    if args.codec and earlier.get("sha256") == shared.codec_sha256:
        # the codec an earlier sitting trained, kept and given back: keep how it was trained
        info["codec"] = {**earlier, "given": True}
    for name in ("sets", "epochs_by_steps"):
        info[name] = {**saved.get(name, {}), **info[name]}
    results["setup"][args.pde] = info


def multiple(args: argparse.Namespace) -> int:
    """schedule.multiple: the PDE's, or small on the tiny smoke grids so the ratios stay near."""
    return 8 if args.smoke else PDES[args.pde].multiple


def train_codec(
    args: argparse.Namespace, root: Path, fields: Path, children: Children
) -> tuple[Path, dict]:
    """The shared codec: ``--codec``, or the one trained here on GPU 0 (resumed if stopped)."""
    if args.codec:
        codec = Path(args.codec)
        if not codec.is_file():
            raise SystemExit(f"--codec {codec}: no such file")
        return codec, {"given": True}
    out = root / f"codec_{args.codec_steps}"
    codec = out / "codec.pt"
    if not codec.exists():
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = out / "checkpoint.pt"
        say(f"training the codec ({args.codec_steps} steps): {out}")
        command = tool(
            "train.py", "--config", f"{args.pde}_codec", f"shards={fields}", f"out={out}",
            f"max_steps={args.codec_steps}", "epochs=1000000", "loader.wrap_epochs=true",
            f"eval_every={args.codec_eval_every}", *model_options(args, "codec"),
            f"resume={checkpoint}" if checkpoint.exists() else "overwrite=true",
        )  # fmt: skip
        code = children.call(command, slot_env(0, 1), out / "train.log")
        if code is None:
            raise Stopped("the codec's training")
        if code != 0:
            raise SystemExit(f"codec training failed ({out / 'train.log'}):\n{tail(out)}")
    test = json.loads((out / "test_metrics.json").read_text())
    val = [m for m in read_jsonl(out / "metrics.jsonl") if "val/recon_nrmse" in m]
    return codec, {
        "steps": val[-1]["step"],
        "train_seconds": val[-1]["train_seconds"],
        "test_recon_nrmse": test["recon_nrmse"],
        "gpu": gpu_name(0),  # where a later sitting can train the same codec (check_codec_card)
    }


def tail(run_dir: Path, chars: int = 2000) -> str:
    log = run_dir / "train.log"
    return log.read_text()[-chars:] if log.exists() else ""


def build_latents(
    args: argparse.Namespace,
    root: Path,
    data: Path,
    codec: Path,
    names: list[str],
    epochs: int,
    children: Children,
    slots: int,
) -> dict[str, Path]:
    """One latent shard set per name, built one per GPU; a finished set is reused, a stopped
    build goes on from its finished shards."""
    root.mkdir(parents=True, exist_ok=True)
    sets = {name: root / slug(name) for name in names}
    todo = [name for name in names if not (sets[name] / "manifest.json").exists()]

    def build(name: str, slot: int) -> int | None:
        spec = SHARD_SETS[name]
        schedule = [
            f"schedule.start_ratio={spec.start_ratio}",
            f"schedule.multiple={multiple(args)}",
        ]
        if spec.end_ratio is not None:
            schedule += ["schedule.kind=cosine", f"schedule.end_ratio={spec.end_ratio}"]
        if spec.dense_tail:
            schedule.append(f"schedule.dense_tail_epochs={dense_tail_epochs(epochs)}")
        say(f"building latent shards '{name}' on GPU {slot}: {sets[name]}")
        return children.call(
            tool(
                "build_shards.py", f"data.path={data}", f"out={sets[name]}", f"encoder={codec}",
                "format=zarr", f"sampler.kind={spec.sampler}", *schedule, f"epochs={epochs}",
                "trajectories_per_shard=4", "progress=false",
                *(["device=cpu"] if args.smoke else []),
            ),
            slot_env(slot, slots),
            root / f"{slug(name)}.log",
        )  # fmt: skip

    def built(name: str, code: int | None) -> None:
        if code not in (0, None):
            log = (root / f"{slug(name)}.log").read_text()[-2000:]
            raise SystemExit(f"building the latent shards '{name}' failed:\n{log}")

    run_in_slots(todo, slots, build, built, stop=children.stopping.is_set)
    if children.stopping.is_set():
        raise Stopped("the latent shard builds")
    return sets


# ---------------------------------------------------------------- runs


@dataclass(frozen=True)
class Job:
    config: str
    seed: int
    steps: int

    def __str__(self) -> str:
        return f"{self.config} seed {self.seed} ({self.steps} steps)"


class Study:
    """The runs of one invocation: which are left, where they run, and the results file."""

    def __init__(
        self,
        args: argparse.Namespace,
        setup: Setup,
        results: dict,
        out: Path,
        children: Children,
        slots: int,
        deadline: float | None = None,
    ):
        self.args, self.setup, self.results, self.out = args, setup, results, out
        self.children, self.slots = children, slots
        self.deadline = deadline  # time.monotonic() of the time limit, if any
        self.lock = threading.Lock()
        self.saving = threading.Lock()  # the results file: finished runs, unfinished curves
        self.running: dict[Job, tuple[int, Path]] = {}  # job -> (GPU, run directory)
        # runs of other settings or another codec never resume each other's checkpoints
        digest = hashlib.sha256(json.dumps(settings(args), sort_keys=True).encode()).hexdigest()
        self.runs_root = setup.data.parent / "runs" / f"{setup.codec_sha256[:12]}_{digest[:8]}"

    def run_dir(self, job: Job) -> Path:
        return self.runs_root / f"{slug(job.config)}_seed{job.seed}_steps{job.steps}"

    def wide(self, job: Job) -> bool:
        return wide(self.args, job)

    def command(self, job: Job, options: list[str], slot: int) -> tuple[list[str], dict[str, str]]:
        """train.py and its environment: on GPU ``slot``, or under torchrun on --dense-gpus."""
        if not self.wide(job):
            return tool("train.py", *options), slot_env(slot, self.slots)
        # --local-addr: the ranks meet at the loopback address, not at the host's name, which
        # need not resolve (a container's often does not; the ranks then wait until timeout)
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--local-addr=127.0.0.1", f"--nproc-per-node={self.args.dense_gpus}"]  # fmt: skip
        return [*launch, str(ROOT / "tools" / "train.py"), *options], wide_env(
            self.args.dense_gpus, self.slots
        )

    def options(self, job: Job, run_dir: Path, fresh: bool = False) -> list[str]:
        """train.py's options for a run: the shipped operator config, the study's sizes, the
        configuration's own options, and resume= when an earlier sitting left a checkpoint
        (unless ``fresh``)."""
        a, config = self.args, CONFIGS[job.config]
        checkpoint = run_dir / "checkpoint.pt"
        resume = checkpoint.exists() and not fresh
        epochs = self.setup.epochs[job.steps]
        return [
            "--config", f"{a.pde}_operator",
            f"shards={self.setup.sets[config.shards, epochs]}", f"codec_checkpoint={self.setup.codec}",
            f"out={run_dir}", f"seed={job.seed}", f"loader.seed={job.seed}",
            f"max_steps={job.steps}", f"epochs={epochs}", "loader.wrap_epochs=false",
            f"batch_size={a.batch}", f"optim.lr={a.lr}", f"eval_every={a.eval_every}",
            f"checkpoint_every={a.eval_every}", f"eval_trajectories={a.eval_trajectories}",
            # the curves follow the one-step error; the test does h4, h16 and the reconstruction
            "eval_horizons=[1]", "eval_reconstruction=false",
            *model_options(a, "operator"), *config.options,
            *([f"adaptive.refresh_every={a.refresh_every}"] if config.refresh else []),
            *(["compile=true", f"compile_mode={a.compile_mode}"] if a.compile else []),
            f"resume={checkpoint}" if resume else "overwrite=true",
        ]  # fmt: skip

    def train(self, job: Job, slot: int) -> dict | None:
        """One run on GPU ``slot``, resumed if an earlier sitting began it: its record, or None
        when it was stopped (it resumes next time)."""
        run_dir = self.run_dir(job)
        run_dir.mkdir(parents=True, exist_ok=True)
        segments = run_dir / "segments.json"
        resumed = (run_dir / "checkpoint.pt").exists()
        if self.args.finish_in_time and self.deadline is not None:
            needed, left = self.seconds_to_go(job, run_dir), self.deadline - time.monotonic()
            if needed is not None and needed > left:
                say(
                    f"not starting {job}: it needs about {needed:.0f} s, "
                    f"{left:.0f} s are left (--finish-in-time)"
                )
                return None
            if needed is None:  # no finished run of its kind: the time limit may stop it
                say(
                    f"starting {job} with no estimate of its time (--finish-in-time: no run "
                    f"of its kind has finished); {left:.0f} s are left"
                )
        if not resumed:  # a fresh start: nothing of an earlier attempt counts
            segments.unlink(missing_ok=True)
            (run_dir / "train.log").unlink(missing_ok=True)
        options = self.options(job, run_dir)
        last = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "val/model_h1" in m]
        where = f"resuming after step {last[-1]}" if resumed and last else "from the start"
        gpus = f"GPUs 0-{self.args.dense_gpus - 1}" if self.wide(job) else f"GPU {slot}"
        say(f"start {job} on {gpus} ({where})")
        # each start of the run (a sitting), kept beside it: the record sums them at the end.
        # Written before the start, its wall-clock after: a sitting killed before it could log
        # that leaves a segment without one, and the run's wall-clock is then unknown
        done = json.loads(segments.read_text()) if segments.exists() else []
        done.append({"wall_seconds": None, "resumed": resumed, "gpu": gpu_name(slot)})
        write_atomic(segments, json.dumps(done).encode())
        with self.lock:
            self.running[job] = (slot, run_dir)
        started = time.perf_counter()
        command, env = self.command(job, options, slot)
        try:
            code = self.children.call(command, env, run_dir / "train.log")
        finally:
            with self.lock:
                del self.running[job]
        done[-1].update(wall_seconds=time.perf_counter() - started, code=code)
        write_atomic(segments, json.dumps(done).encode())
        if code is None:
            say(f"stopped {job}: it resumes on the next run")
            return None
        record = {
            "pde": self.args.pde,
            "config": job.config,
            "seed": job.seed,
            "steps": job.steps,
        }
        if code != 0:
            return {**record, "error": tail(run_dir)}
        record |= self.collect(job, run_dir, done)
        return self.on_one_gpu(record) if self.wide(job) else record

    def on_one_gpu(self, record: dict) -> dict:
        """A data-parallel dense run on the one-GPU time axis the other runs use: torchrun ranks
        train on the same global batches as one process (train.py), so its steps are the
        one-GPU run's, and each step is given the one-GPU dense pace the probe measured. Its
        own seconds on several GPUs stay beside them."""
        measured = self.results["dense_pace"][self.args.pde]
        pace = measured["seconds_per_step"]
        return {
            **record,
            "curve": at_pace(record["curve"], pace),
            "train_seconds": record["steps"] * pace,
            "gpus_per_run": self.args.dense_gpus,
            "measured_train_seconds": record["train_seconds"],
            "measured_warmup_seconds": warmup(record),  # mostly compilation, on every rank
            "one_gpu_seconds_per_step": pace,
            "one_gpu_pace_gpu": measured["gpu"],
        }

    def measure_dense_pace(self) -> bool:
        """The one-GPU dense pace (seconds per step) that data-parallel dense runs are timed
        at, measured once per PDE and results file by a short dense run on GPU 0 of this host:
        the steps after its first third (compilation). False when it was stopped."""
        stored = self.results.get("dense_pace", {}).get(self.args.pde)
        if stored is not None:
            say(
                f"timing the data-parallel dense runs at the results file's one-GPU dense pace, "
                f"{stored['seconds_per_step'] * 1000:.1f} ms a step, measured on {stored['gpu']}"
            )
            return True
        run_dir = self.runs_root / "dense_pace"
        run_dir.mkdir(parents=True, exist_ok=True)
        longest = max(self.args.steps)
        steps = min(PACE_STEPS, longest)
        options = self.options(Job("dense", 0, longest), run_dir, fresh=True)
        # the runs' own log_every: a log line costs a host sync, which the pace should include
        options += [f"max_steps={steps}", f"eval_every={steps}", f"checkpoint_every={steps}"]
        say(f"measuring the one-GPU dense pace on GPU 0 ({steps} steps)")
        code = self.children.call(tool("train.py", *options), slot_env(0, self.slots),
                                  run_dir / "train.log")  # fmt: skip
        if code is None:
            return False
        if code != 0:
            raise SystemExit(
                f"the dense pace probe failed ({run_dir / 'train.log'}):\n{tail(run_dir)}"
            )
        logged = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "samples_per_s" in m]
        first = next(m for m in logged if m["step"] >= steps // 3)
        last = logged[-1]
        pace = (last["train_seconds"] - first["train_seconds"]) / (last["step"] - first["step"])
        with self.saving:
            self.results.setdefault("dense_pace", {})[self.args.pde] = {
                "seconds_per_step": pace,
                "steps": [first["step"], last["step"]],
                "gpu": gpu_name(0),
            }
            save(self.out / RESULTS, self.results)
        say(f"one-GPU dense pace: {pace * 1000:.1f} ms a step")
        return True

    def seconds_to_go(self, job: Job, run_dir: Path) -> float | None:
        """The wall-clock a run still needs, less the share of steps an earlier sitting did:
        the mean of the finished runs of its configuration on as many GPUs; failing those, for
        a one-GPU run, the pace of the furthest curve a sitting left unfinished (a run its time
        limit stopped, its checkpoint gone with that machine) plus the finished one-GPU runs'
        mean seconds outside training; failing that too, the slowest mean of the finished
        one-GPU runs of its ``step_kin`` (the same ratios and options), plus, for an
        error-based configuration, the finished refreshing runs' mean refresh seconds; None
        when the file holds none of these."""
        gpus = self.args.dense_gpus if self.wide(job) else 1
        finished = [
            r
            for r in self.results["runs"]
            if "error" not in r
            and r["wall_seconds"] is not None
            and r.get("gpus_per_run", 1) == gpus
            and (r["pde"], r["steps"]) == (self.args.pde, job.steps)
        ]
        done = [r["wall_seconds"] for r in finished if r["config"] == job.config]
        begun = [
            r
            for r in self.results.get("unfinished", [])
            if r["curve"]
            and (r["pde"], r["config"], r["steps"]) == (self.args.pde, job.config, job.steps)
        ]
        if done:
            whole = statistics.mean(done)
        elif begun and gpus == 1:  # a data-parallel run's curve is timed at the one-GPU pace
            furthest = max(begun, key=steps_done)["curve"][-1]
            outside = [r["wall_seconds"] - r["train_seconds"] for r in finished]
            whole = furthest["train_seconds"] / furthest["step"] * job.steps
            whole += statistics.mean(outside) if outside else 0.0
        elif gpus == 1 and (kin := self.kin_seconds(job, finished)) is not None:
            whole = kin
        else:
            return None
        last = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if "val/model_h1" in m]
        share = 1 - last[-1] / job.steps if last and (run_dir / "checkpoint.pt").exists() else 1
        return whole * share

    @staticmethod
    def kin_seconds(job: Job, finished: list[dict]) -> float | None:
        """A never-run configuration's whole wall-clock, borrowed from its ``step_kin``'s
        finished runs (the slowest configuration's mean) and, if it refreshes, from the
        refreshing runs' refresh seconds; None when they have not run."""
        kin = {r["config"] for r in finished} & set(step_kin(job.config))
        if not kin:
            return None
        whole = max(
            statistics.mean(r["wall_seconds"] for r in finished if r["config"] == name)
            for name in kin
        )
        if CONFIGS[job.config].refresh:
            refreshes = [r["refresh_seconds"] for r in finished if CONFIGS[r["config"]].refresh]
            if not refreshes:
                return None
            whole += statistics.mean(refreshes)
        return whole

    def collect(self, job: Job, run_dir: Path, segments: list[dict]) -> dict:
        """A finished run's numbers, from its metrics.jsonl and test_metrics.json."""
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        rate = statistics.median(m["samples_per_s"] for m in metrics if "samples_per_s" in m)
        starts = [m for m in metrics if "start/first_step_seconds" in m]
        extra = resume_excess(metrics, self.args.batch)
        curve = val_curve(metrics, extra)
        refreshes = [m for m in metrics if "refresh/seconds" in m]
        waits = [m["loader_wait_seconds"] for m in metrics if "loader_wait_seconds" in m]
        stalls = [m["loader_stall_seconds"] for m in metrics if "loader_stall_seconds" in m]
        # a resumed start's wait for its first batch is left out, as from its training seconds
        refill = sum(m.get("start/first_batch_seconds", 0.0) for m in starts[1:])
        stages = ("read", "error", "plan", "write")  # logged by train.py since the third pass
        timed = [m["val_seconds"] for m in metrics if "val_seconds" in m]  # train.py logs them
        final = next(m for m in reversed(metrics) if any(k.startswith("test/") for k in m))
        trained = less_resume_excess(final, extra)
        lost = any(s["wall_seconds"] is None for s in segments)  # a sitting killed outright
        wall = None if lost else sum(s["wall_seconds"] for s in segments)
        return {
            "data_sha256": self.setup.data_sha256,
            "codec_sha256": self.setup.codec_sha256,
            "shards": CONFIGS[job.config].shards,
            "curve": curve,
            "test": json.loads((run_dir / "test_metrics.json").read_text()),
            "train_seconds": trained,
            "resume_warmup_seconds": sum(x for _, x in extra),  # left out of train_seconds
            # every start's first step (the analysis estimates the first start's warm-up)
            "first_step_seconds": [m["start/first_step_seconds"] for m in starts],
            "refresh_seconds": sum(m["refresh/seconds"] for m in refreshes),
            "refreshes": len(refreshes),
            "refresh_stage_seconds": {
                stage: sum(m[f"refresh/{stage}_seconds"] for m in refreshes) for stage in stages
            }
            if refreshes and all(f"refresh/{s}_seconds" in m for m in refreshes for s in stages)
            else None,
            "samples_per_s": rate,
            # waits for the next batch, part of train_seconds (None for runs made before
            # train.py logged them)
            "loader_wait_seconds": waits[-1] - refill if waits else None,
            # of them, the device's time without work because of the loader (its idle time
            # and the batches' copies on CUDA); a resumed start's first batch left out as above
            "loader_stall_seconds": max(stalls[-1] - refill, 0.0) if stalls else None,
            "wall_seconds": wall,  # None when a sitting's wall-clock was lost
            "outside_seconds": None if wall is None else wall - trained,
            "validation_seconds": sum(timed) if timed else None,  # part of the outside seconds
            "starts": max(len(segments), len(starts)),  # a killed sitting may leave no segment
            "gpus": sorted({s["gpu"] for s in segments}),
        }

    def finished(self, job: Job, record: dict | None) -> None:
        """Called under the pool's lock: add the record to the results file at once."""
        if record is None:  # stopped or not started: it runs next time
            return
        key = job_key(self.args, job)
        with self.saving:
            self.results["runs"] = [r for r in self.results["runs"] if run_key(r) != key]
            self.results["runs"].append(record)
            self.results["unfinished"] = [
                r for r in self.results.get("unfinished", []) if run_key(r) != key
            ]
            save(self.out / RESULTS, self.results)
        say(f"done {job}: {summary(record)}")

    def note_unfinished(self, job: Job, run_dir: Path, metrics: list[dict]) -> None:
        """Keep a running run's validation curve so far in the results file ('unfinished'), so
        a sitting that ends before the run does (its checkpoint stays on that machine) still
        leaves where it got to. Its record replaces this once it finishes; an earlier attempt's
        curve that got further (a sitting that ran it from the start too) stays until this one
        passes it."""
        curve = val_curve(metrics, resume_excess(metrics, self.args.batch))
        if not curve:
            return
        if self.wide(job):
            curve = at_pace(curve, self.results["dense_pace"][self.args.pde]["seconds_per_step"])
        record = {
            "pde": self.args.pde,
            "config": job.config,
            "seed": job.seed,
            "steps": job.steps,
            "data_sha256": self.setup.data_sha256,
            "codec_sha256": self.setup.codec_sha256,
            "curve": curve,
            "train_seconds": curve[-1]["train_seconds"],  # so far, to its last validation
            "updated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        key = job_key(self.args, job)
        with self.saving:
            with self.lock:
                if job not in self.running:
                    return  # it ended meanwhile: finished() keeps its record instead
            earlier = self.results.get("unfinished", [])
            if any(run_key(r) == key and steps_done(r) > steps_done(record) for r in earlier):
                return
            kept = [r for r in earlier if run_key(r) != key]
            self.results["unfinished"] = [*kept, record]
            save(self.out / RESULTS, self.results)

    def report_progress(self, stop: threading.Event) -> None:
        """Every --progress-every seconds, one line per running run (its step and latest
        validation), and its curve so far kept in the results file."""
        while not stop.wait(self.args.progress_every):
            with self.lock:
                running = dict(self.running)
            for job, (slot, run_dir) in running.items():
                metrics = read_jsonl(run_dir / "metrics.jsonl")
                steps = [m for m in metrics if "train_seconds" in m and "step" in m]
                val = [m for m in metrics if "val/model_h1" in m]
                if not steps:
                    say(f"  GPU {slot} {job}: starting")
                    continue
                text = f"step {steps[-1]['step']}/{job.steps}, "
                text += f"{steps[-1]['train_seconds']:.0f} s training"
                if val:
                    text += f", val h1 {val[-1]['val/model_h1']:.4f} at step {val[-1]['step']}"
                say(f"  GPU {slot} {job}: {text}")
                self.note_unfinished(job, run_dir, metrics)

    def run(self) -> None:
        """Every run left, one per GPU slot, with progress lines, until done or stopped."""
        jobs = todo(self.args, self.results)
        wanted = self.args.seeds * len(self.args.configs) * len(self.args.steps)
        say(f"{len(jobs)} of {wanted} run(s) to do, on {self.slots} GPU slot(s)")
        stop = threading.Event()
        monitor = threading.Thread(target=self.report_progress, args=(stop,), daemon=True)
        monitor.start()
        try:
            # the data-parallel runs first, one at a time on --dense-gpus GPUs, then the rest
            wide = [job for job in jobs if self.wide(job)]
            if wide and self.measure_dense_pace():
                for job in wide:
                    if self.children.stopping.is_set():
                        break
                    self.finished(job, self.train(job, 0))
            run_in_slots(
                [job for job in jobs if not self.wide(job)],
                self.slots,
                self.train,
                self.finished,
                stop=self.children.stopping.is_set,
            )
        finally:
            stop.set()


def job_key(args: argparse.Namespace, job: Job) -> tuple:
    return (args.pde, job.config, job.seed, job.steps)


def todo(args: argparse.Namespace, results: dict) -> list[Job]:
    """Runs not finished yet, seed-major (every configuration's first seed comes first), and
    within a seed the longest runs first, so the GPUs finish together."""
    finished = {run_key(r) for r in results["runs"] if "error" not in r}
    jobs = [
        Job(c, s, steps)
        for s in range(args.seeds)
        for steps in sorted(args.steps, reverse=True)
        for c in args.configs
    ]
    return [job for job in jobs if job_key(args, job) not in finished]


def wide(args: argparse.Namespace, job: Job) -> bool:
    """Whether the run trains data-parallel over --dense-gpus GPUs: the dense runs, whose
    step is the expensive one (a 24,000-step dense run outlasts one machine's sitting)."""
    return job.config == "dense" and args.dense_gpus > 1


def gpu_name(slot: int) -> str:
    return torch.cuda.get_device_name(slot) if torch.cuda.is_available() else "cpu"


def run_key(record: dict) -> tuple:
    return (record["pde"], record["config"], record["seed"], record["steps"])


def resume_excess(metrics: list[dict], batch: int) -> list[tuple[int, float]]:
    """(step, seconds) per resumed start, left out of a run's training seconds: a resumed start's
    first step pays the warm-up (with --compile the compilation) that an uninterrupted run pays
    once, and it waits for the loader's start and first shards; its excess over a steady step,
    and that wait."""
    rates = [m["samples_per_s"] for m in metrics if "samples_per_s" in m]
    starts = [m for m in metrics if "start/first_step_seconds" in m]
    if not rates or len(starts) < 2:
        return []
    step_seconds = batch / statistics.median(rates)
    return [
        (
            m["step"],
            max(0.0, m["start/first_step_seconds"] - step_seconds)
            + m.get("start/first_batch_seconds", 0.0),  # not logged before the second pass
        )
        for m in starts[1:]
    ]


def less_resume_excess(record: dict, excess: list[tuple[int, float]]) -> float:
    """A metrics record's training seconds less the resumed starts' excess up to its step."""
    return record["train_seconds"] - sum(x for step, x in excess if step <= record["step"])


def val_curve(metrics: list[dict], excess: list[tuple[int, float]]) -> list[dict]:
    """The validation points of a run's metrics: step, training seconds (``less_resume_excess``)
    and every val/ value."""
    return [
        {"step": m["step"], "train_seconds": less_resume_excess(m, excess)}
        | {k[4:]: v for k, v in m.items() if k.startswith("val/")}
        for m in metrics
        if "val/model_h1" in m
    ]


def at_pace(curve: list[dict], seconds_per_step: float) -> list[dict]:
    """A data-parallel run's curve on the one-GPU time axis: each step at the one-GPU pace."""
    return [{**p, "train_seconds": p["step"] * seconds_per_step} for p in curve]


def summary(record: dict) -> str:
    if "error" in record:
        return "failed: " + record["error"][-300:]
    test = record["test"]
    rollout = ", ".join(f"h{h} {test[f'model_h{h}']:.4f}" for h in (4, 16) if f"model_h{h}" in test)
    outside = record["outside_seconds"]
    return (
        f"{record['curve'][-1]['step']} steps, {record['train_seconds']:.0f} s training"
        + ("" if outside is None else f" (+{outside:.0f} s outside it)")
        + ", val h1 "
        f"{record['curve'][-1]['model_h1']:.4f}, test h1 {test['model_h1']:.4f} {rollout}"
    )


def save(path: Path, results: dict) -> None:
    write_atomic(path, json.dumps(results, indent=1).encode())  # a temp file, then a rename


def settings(args: argparse.Namespace) -> dict:
    """What every run of a PDE must share to be compared: a rerun with other values is refused."""
    names = ("resolution", "trajectories", "snapshots", "batch", "lr", "eval_every",
             "eval_trajectories", "refresh_every", "compile", "compile_mode", "smoke",
             "codec_steps")  # fmt: skip
    return {name: getattr(args, name) for name in names}


def check_inputs(results: dict, args: argparse.Namespace, shared: Setup, path: Path) -> None:
    """Refuse to add runs of this setup's codec or data to a file holding runs of others: their
    accuracies do not compare, and a finished run of another codec would count as this one's."""
    for key, mine, what in (
        ("codec_sha256", shared.codec_sha256, "codec"),
        ("data_sha256", shared.data_sha256, "data file"),
    ):
        others = sorted(inputs(results, args.pde, key) - {mine})
        if others:
            raise SystemExit(
                f"{path} holds {args.pde} runs of another {what} (sha256 {others[0][:12]}, "
                f"this setup's is {mine[:12]}); use another --out-dir, or --codec with the "
                "codec those runs used"
            )


def check_codec_card(results: dict, args: argparse.Namespace, path: Path) -> None:
    """Refuse, before any work, to train the codec of a results file's runs again on another
    GPU model. Trained again on the same model, the codec mostly came out bit for bit the same
    (H200 hosts of one and four GPUs trained one from the same data), but not always (2-GPU
    H200 hosts trained another, twice, likely since the compiler picks some reductions'
    configurations by timing them); on another model it never did (an H100 and an H200
    trained different ones). Runs of another codec do not compare (check_inputs refuses them
    after the setup)."""
    codec = results.get("setup", {}).get(args.pde, {}).get("codec", {})
    if args.codec or "gpu" not in codec or not inputs(results, args.pde, "codec_sha256"):
        return
    here = gpu_name(0)
    if here != codec["gpu"]:
        raise SystemExit(
            f"{path}: its {args.pde} runs' codec (sha256 {codec['sha256'][:12]}) was trained "
            f"on {codec['gpu']}, this machine's is {here}: a codec trained here would be "
            "another (its training repeats bit for bit, if at all, on the same GPU model). Pass "
            "that codec with --codec, or use another --out-dir"
        )


def check_settings(results: dict, args: argparse.Namespace, path: Path) -> None:
    """Refuse to mix runs of other settings into one results file."""
    saved = results.get("settings", {}).get(args.pde)
    now = settings(args)
    if saved is not None and saved != now:
        diff = [f"{k} {saved.get(k)} != {now[k]}" for k in now if saved.get(k) != now[k]]
        raise SystemExit(
            f"{path} holds {args.pde} runs made with other settings (saved != now: "
            f"{'; '.join(diff)}); rerun with the same options or use another --out-dir"
        )
    results.setdefault("settings", {})[args.pde] = now


def merge_results(into: dict, other: dict, source: Path, mixed_devices: bool = False) -> None:
    """Add the runs of another results file to ``into``: a study on another host, or one
    beside this one on other GPUs of the same host (CUDA_VISIBLE_DEVICES). A run finished in
    either file counts, once; an unfinished curve gives way to the run finished, or to a curve
    of it that got further. Refused (check_mergeable) before anything changes."""
    check_mergeable(into, other, source)
    for pde in {r["pde"] for r in records(other)}:
        check_devices(into, pde, devices(other, pde), f"{source} has runs on", mixed_devices)
    index = {run_key(r): i for i, r in enumerate(into["runs"])}
    for record in other["runs"]:
        i = index.get(run_key(record))
        if i is None:
            index[run_key(record)] = len(into["runs"])
            into["runs"].append(record)
        elif "error" in into["runs"][i] and "error" not in record:  # a failed attempt gives way
            into["runs"][i] = record
    done = {run_key(r) for r in records(into, unfinished=False)}
    furthest: dict[tuple, dict] = {}
    for record in [*into.get("unfinished", []), *other.get("unfinished", [])]:
        key, kept = run_key(record), furthest.get(run_key(record))
        if key not in done and (kept is None or steps_done(record) > steps_done(kept)):
            furthest[key] = record
    into["unfinished"] = list(furthest.values())
    sittings = into.setdefault("sittings", [])
    sittings += [s for s in other.get("sittings", []) if s not in sittings]
    sittings.sort(key=lambda lines: next((x for x in lines if x.startswith("- date:")), ""))
    for pde, settings_ in other.get("settings", {}).items():
        into.setdefault("settings", {}).setdefault(pde, settings_)
    for pde, pace in other.get("dense_pace", {}).items():
        into.setdefault("dense_pace", {}).setdefault(pde, pace)
    for pde, theirs in other.get("setup", {}).items():
        mine = into.setdefault("setup", {}).setdefault(pde, theirs)
        if mine is not theirs:  # both set it up: the union of their shard sets and lengths
            for name in ("sets", "epochs_by_steps"):
                mine[name] = {**theirs.get(name, {}), **mine.get(name, {})}
            if mine["codec"].get("given") and not theirs["codec"].get("given"):
                mine["codec"] = theirs["codec"]  # how the codec was trained, where that is known
    for name in ("environment", "args"):
        if name in other:
            into.setdefault(name, other[name])


def devices(results: dict, pde: str) -> set[str]:
    """The devices whose pace the results file's runs of ``pde`` are timed at: the GPUs they
    trained on, and for data-parallel dense runs the card of the one-GPU pace (timed_on)."""
    pace = pace_gpu(results, pde)
    return {gpu for r in records(results) if r["pde"] == pde for gpu in timed_on(r, pace)}


def sitting_devices(args: argparse.Namespace, results: dict, slots: int) -> set[str]:
    """The devices whose pace this sitting's runs will be timed at: this machine's GPUs, or,
    when it trains only data-parallel dense runs and the results file holds a one-GPU dense
    pace, that pace's card (the runs' seconds are their steps at it)."""
    pace = pace_gpu(results, args.pde)
    jobs = todo(args, results)
    if pace is not None and jobs and all(wide(args, job) for job in jobs):
        return {pace}
    return {gpu_name(slot) for slot in range(slots)} if torch.cuda.is_available() else {"cpu"}


def check_devices(results: dict, pde: str, new: set[str], source: str, mixed: bool) -> None:
    """Refuse runs on other devices than the results file's runs of ``pde`` (unless ``mixed``):
    the study compares wall-clocks, and those of other devices do not compare. Devices are
    those a run is timed on (devices(): a data-parallel dense run is timed at the one-GPU
    pace's card, so it may train on any). ``source`` says where the new runs come from
    ('this machine has')."""
    held = devices(results, pde)
    if held and not new <= held and not mixed:
        raise SystemExit(
            f"the results file holds {pde} runs on {', '.join(sorted(held))}, {source} "
            f"{', '.join(sorted(new))}: their wall-clocks do not compare. Use another "
            "--out-dir (a results file per device), or --mixed-devices to add them anyway (the "
            "report then warns)"
        )


def check_mergeable(into: dict, other: dict, source: Path) -> None:
    """Refuse a results file whose runs do not compare with these (another PDE setting, codec
    or data file), or that finished a run these finished too, with other numbers."""
    for pde, theirs in other.get("settings", {}).items():
        mine = into.get("settings", {}).get(pde, theirs)
        diff = [f"{k} {mine.get(k)} != {v}" for k, v in theirs.items() if mine.get(k) != v]
        if diff:
            raise SystemExit(
                f"{source} holds {pde} runs made with other settings (here != there: "
                f"{'; '.join(diff)}): they do not compare"
            )
    for key, what in (("codec_sha256", "codec"), ("data_sha256", "data file")):
        for pde in {r["pde"] for r in records(other)}:
            mine, theirs = inputs(into, pde, key), inputs(other, pde, key)
            if mine and theirs and mine != theirs:
                raise SystemExit(
                    f"{source} holds {pde} runs of another {what} (sha256 "
                    f"{', '.join(sorted(h[:12] for h in theirs))}, here "
                    f"{', '.join(sorted(h[:12] for h in mine))}): their accuracies do not compare"
                )
    for pde, theirs in other.get("setup", {}).items():
        mine = into.get("setup", {}).get(pde, theirs)
        if mine["codec"]["sha256"] != theirs["codec"]["sha256"]:
            raise SystemExit(
                f"{source} set {pde} up with another codec (sha256 "
                f"{theirs['codec']['sha256'][:12]}, here {mine['codec']['sha256'][:12]})"
            )
    mine_done = {run_key(r): r for r in records(into, unfinished=False)}
    for record in records(other, unfinished=False):
        here = mine_done.get(run_key(record))
        if here is not None and here != record:
            raise SystemExit(
                f"{source}: {run_name(record)} finished in both results files, with other "
                "numbers: a run counts once, so merge a copy without one of them"
            )


def read_results(path: Path) -> dict:
    """A results file given to --merge, or one clear error naming it."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--merge {path}: not a readable results file ({err})") from None
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        raise SystemExit(f"--merge {path}: not a results file of this study (no list of 'runs')")
    return results


def records(results: dict, unfinished: bool = True) -> list[dict]:
    """A results file's runs (finished, and unfinished ones too), less failed attempts."""
    kept = [*results["runs"], *(results.get("unfinished", []) if unfinished else [])]
    return [r for r in kept if "error" not in r]


def steps_done(record: dict) -> int:
    return record["curve"][-1]["step"] if record["curve"] else 0


def run_name(record: dict) -> str:
    return f"{record['pde']} {record['config']} seed {record['seed']} ({record['steps']} steps)"


def inputs(results: dict, pde: str, key: str) -> set[str]:
    """The codecs or data files (``key``: codec_sha256, data_sha256) of a PDE's runs."""
    return {r[key] for r in records(results) if r["pde"] == pde}


# ---------------------------------------------------------------- main


def interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a kill, the end of a sitting) ends the study as Ctrl-C does."""
    raise KeyboardInterrupt


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="docs/bench")
    parser.add_argument("--work", default="runs/bench_time_to_accuracy", help="data, shards, runs")
    parser.add_argument("--report", default=None, help="only render this results JSON (next to it)")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="RESULTS_JSON",
        help="only add the runs of these results files (a study on another host, or beside "
        "this one on other GPUs) to --out-dir's, and render it",
    )
    parser.add_argument(
        "--mixed-devices",
        action="store_true",
        help="add runs on other GPUs than the results file's (refused by default: their "
        "wall-clocks do not compare; the report then warns). Not needed for a sitting of "
        "data-parallel dense runs only, timed at the file's one-GPU dense pace",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on a CPU")
    parser.add_argument("--pde", default="ns2d", choices=list(PDES))
    parser.add_argument(
        "--data",
        default=None,
        help="a PDEBench-layout HDF5 file to study instead of generated data: its grid, "
        "trajectories and snapshots set the study's, --pde the models trained on it",
    )
    parser.add_argument("--resolution", type=int, default=None, help="default: the PDE's")
    parser.add_argument("--trajectories", type=int, default=None, help="default: 256")
    parser.add_argument(
        "--snapshots", type=int, default=None, help="per trajectory (> 16 for h16; default: 20)"
    )
    parser.add_argument(
        "--field-epochs", type=int, default=20, help="query sets of the codec's shards"
    )
    parser.add_argument(
        "--field-ratio", type=float, default=0.3, help="k/N of the codec's query sets"
    )
    parser.add_argument("--codec", default=None, help="a trained codec.pt to reuse")
    parser.add_argument("--codec-steps", type=int, default=None, help="default: the PDE's")
    parser.add_argument("--codec-eval-every", type=int, default=500)
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[6000],
        help="operator steps of every run; several (a budget ladder) train each configuration at "
        "each, and the report reads how much each longer run gains",
    )
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--eval-trajectories", type=int, default=32, help="validation trajectories")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--refresh-every", type=int, default=10, help="epochs, error-based sets")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile=true for every run (default: on a GPU, where torch.compile makes both the "
        "dense and the sparse steps faster, docs/benchmarks.md table 5; --no-compile: eager)",
    )
    parser.add_argument(
        "--compile-mode",
        default="reduce-overhead",
        choices=["default", "reduce-overhead"],
        help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs, which take the "
        "launch-bound k/N 0.1 step from 24 to 11 ms, docs/benchmarks.md)",
    )
    parser.add_argument("--gpus", type=int, default=0, help="GPU slots (0: every visible GPU)")
    parser.add_argument(
        "--dense-gpus",
        type=int,
        default=1,
        help="train the dense runs data-parallel (torchrun) on this many GPUs, before the other "
        "runs; they are timed at the one-GPU dense pace, measured first by a short run",
    )
    parser.add_argument(
        "--setup-only",
        action="store_true",
        help="prepare the data, codec and shard sets, print where they are, train no run",
    )
    parser.add_argument(
        "--time-limit", type=float, default=0, help="seconds; then stop cleanly (0: none)"
    )
    parser.add_argument(
        "--finish-in-time",
        action="store_true",
        help="start only runs that finished runs of their configuration (failing those, the "
        "pace of a curve it left unfinished, or the finished runs of a configuration of the same "
        "ratios) say end before --time-limit (a sitting whose machine is handed back after it: "
        "a run it stops starts again next time); a run with none of these (the first of the "
        "cosine schedule or of dense) starts, with a warning",
    )
    parser.add_argument(
        "--progress-every",
        type=float,
        default=30.0,
        help="seconds between the running runs' progress lines (each also keeps the run's "
        "curve so far in the results file)",
    )
    args = parser.parse_args()
    if args.progress_every <= 0:
        parser.error(f"--progress-every: seconds > 0 expected, got {args.progress_every}")
    if args.finish_in_time and not args.time_limit:
        parser.error("--finish-in-time needs --time-limit")
    if args.dense_gpus < 1:
        parser.error(f"--dense-gpus: an integer >= 1 expected, got {args.dense_gpus}")
    if min(args.steps) < 1 or len(set(args.steps)) != len(args.steps):
        parser.error(f"--steps: distinct positive integers expected, got {args.steps}")
    sizes = ("resolution", "trajectories", "snapshots")
    if args.data and any(getattr(args, name) is not None for name in sizes):
        parser.error("--resolution, --trajectories, --snapshots: not with --data (the file's)")
    if args.smoke:  # the smoke sizes, where an option does not say otherwise
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    if args.data:
        data_sizes(parser, args)
    if args.trajectories is None:
        args.trajectories = 256
    if args.snapshots is None:
        args.snapshots = 20
    if args.compile is None:  # each configuration at its fastest correct step
        args.compile = torch.cuda.is_available() and not args.smoke
    pde = PDES[args.pde]
    if args.resolution is None:
        args.resolution = pde.smoke_resolution if args.smoke else pde.resolution
    if args.codec_steps is None:
        args.codec_steps = pde.codec_steps
    return args


def data_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--data: the file's grid (of the --pde's rank, square), trajectories and snapshots become
    the study's, checked before any work."""
    try:
        with PDEBenchFile(args.data) as source:
            info = source.info
    except DataError as err:
        parser.error(f"--data: {err}")
    pde = PDES[args.pde]
    if info.ndim != pde.ndim or len(set(info.grid)) != 1:
        shape = "1D" if pde.ndim == 1 else f"square {pde.ndim}D"
        parser.error(
            f"--data {args.data}: a grid of {'x'.join(map(str, info.grid))} points; --pde "
            f"{args.pde} trains models on {shape} grids (--pde picks the models)"
        )
    if info.num_trajectories < 3:
        parser.error(
            f"--data {args.data}: {info.num_trajectories} trajectories; train, val and test "
            "splits need at least 3"
        )
    args.resolution, args.trajectories = info.grid[0], info.num_trajectories
    args.snapshots = info.num_steps


def write_report(results: dict, out: Path) -> None:
    """Render the results into ``out``/bench_time_to_accuracy.md and print the report."""
    report = render(results, out)
    (out / "bench_time_to_accuracy.md").write_text(report)
    print(report)


def main() -> None:
    args = parse_args()
    if args.report:
        path = Path(args.report)
        write_report(json.loads(path.read_text()), path.parent)
        return
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    results = json.loads(path.read_text()) if path.exists() else {"runs": []}
    if args.merge:
        for source in map(Path, args.merge):
            merge_results(results, read_results(source), source, args.mixed_devices)
        save(path, results)
        write_report(results, out)
        return
    check_settings(results, args, path)
    slots = args.gpus or gpu_slots()
    here = sitting_devices(args, results, slots)
    check_devices(results, args.pde, here, "this machine has", args.mixed_devices)
    check_codec_card(results, args, path)
    shown = {k: repo_relative(v) if isinstance(v, str) else v for k, v in vars(args).items()}
    results.update(environment=environment_lines(), args=shown)
    results.setdefault("sittings", []).append(results["environment"])
    signal.signal(signal.SIGTERM, interrupt)
    if torch.cuda.is_available() and args.dense_gpus > slots:
        raise SystemExit(f"--dense-gpus {args.dense_gpus}: this study has {slots} GPU slot(s)")
    children = Children()
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    if args.time_limit:
        timer = threading.Timer(args.time_limit, children.stop, args=("time limit reached",))
        timer.daemon = True
        timer.start()
    started = time.perf_counter()
    try:
        shared = setup(args, children, slots)
        say(f"setup {time.perf_counter() - started:.0f} s")
        if args.setup_only:  # the results file stays as it was
            say(f"codec: {shared.codec}")
            for (name, epochs), where in shared.sets.items():
                say(f"shard set {name} ({epochs} epochs): {where}")
            return
        check_inputs(results, args, shared, path)
        remember_setup(results, args, shared)
        save(path, results)
        Study(args, shared, results, out, children, slots, deadline).run()
    except Stopped as stopped:
        say(f"stopped during {stopped}: rerun the same command to go on")
    except KeyboardInterrupt:
        children.stop("interrupted")
        raise SystemExit(130) from None
    left = len(todo(args, results))
    write_report(results, out)
    say(f"{left} run(s) left" + (": rerun the same command to go on" if left else ""))


if __name__ == "__main__":
    main()
