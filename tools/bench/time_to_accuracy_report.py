"""The time-to-accuracy study's analysis and report: from the results file that
bench_time_to_accuracy.py writes, the times each configuration takes to reach the dense runs'
accuracy, the accuracy tables, the goals, the budget ladder and the plots, as markdown. Only
reads results, so a report can be rendered again without training (``--report``)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from bench_common import markdown_table
from time_to_accuracy_configs import CONFIGS, SHARD_SETS, dense_tail_epochs

CONVERGED_TAIL = 0.2  # convergence: over the last 20 % of a run's steps ...
CONVERGED_GAIN = 0.01  # ... its validation nRMSE improved by less than 1 %
# the plots' shared pieces: the seconds axis and the dense target's dashed line
SECONDS_LABEL = "training seconds (refreshes included; validation and warm-up excluded)"
TARGET_LINE = {"color": "black", "linewidth": 0.7, "linestyle": (0, (4, 4))}


def values_at(curve: list[dict], x_key: str, x: float, key: str = "model_h1") -> float | None:
    """The curve's ``key`` at ``x`` (linear between evaluations); None outside the curve."""
    xs = [p[x_key] for p in curve]
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, [p[key] for p in curve]))


def time_to(curve: list[dict], target: float, x_key: str = "train_seconds") -> float | None:
    """Training seconds (or, with ``x_key="step"``, steps) at which the validation nRMSE first
    reaches ``target`` (linear between the evaluation before and the one that reaches it); None
    if it never does."""
    previous = None
    for point in curve:
        value, x = point["model_h1"], point[x_key]
        if value <= target:
            if previous is None:
                return x
            v0, x0 = previous["model_h1"], previous[x_key]
            return x0 + (x - x0) * (v0 - target) / (v0 - value)
        previous = point
    return None


def improvement(curve: list[dict], steps: int) -> float | None:
    """Relative gain of the validation nRMSE over the last CONVERGED_TAIL of the steps."""
    before = values_at(curve, "step", (1 - CONVERGED_TAIL) * steps)
    if before is None or not curve:
        return None
    return (before - curve[-1]["model_h1"]) / before


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def converged(record: dict) -> bool | None:
    gain = improvement(record["curve"], record["steps"])
    return None if gain is None else gain < CONVERGED_GAIN


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float], digits: int = 4) -> str:
    """Mean ± standard deviation over seeds; one seed's value alone (it has no spread)."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")


@dataclass
class Group:
    """The finished runs of one PDE at one step count, and the dense runs' reference numbers."""

    pde: str
    steps: int
    runs: dict[str, list[dict]]  # configuration -> its runs
    unfinished: list[dict] = field(default_factory=list)  # runs a sitting ended: curves so far

    @property
    def dense(self) -> list[dict]:
        return self.runs.get("dense", [])

    @property
    def dense_val(self) -> float | None:
        """The dense runs' final validation nRMSE: the accuracy to reach."""
        return (
            statistics.mean(r["curve"][-1]["model_h1"] for r in self.dense) if self.dense else None
        )

    @property
    def dense_seconds(self) -> float | None:
        return statistics.mean(r["train_seconds"] for r in self.dense) if self.dense else None

    def times(self, config: str, factor: float) -> tuple[list[float], int]:
        """Each run's time to factor x the dense final validation nRMSE (those that reach it),
        and how many runs there are."""
        target = (self.dense_val or 0.0) * factor
        runs = self.runs.get(config, [])
        found = [t for r in runs if (t := time_to(r["curve"], target)) is not None]
        return found, len(runs)

    def seed_mean_curve(self, config: str) -> list[dict]:
        """The seeds' mean validation curve, the one the times are read from and the plot
        draws: at each step every run validated at (the seeds validate at the same steps), the
        mean training seconds, and the mean and range (min, max) of the nRMSE."""
        by_step = [{p["step"]: p for p in r["curve"]} for r in self.runs.get(config, [])]
        steps = sorted(set.intersection(*(set(c) for c in by_step))) if by_step else []
        curve = []
        for step in steps:
            values = [c[step]["model_h1"] for c in by_step]
            seconds = statistics.mean(c[step]["train_seconds"] for c in by_step)
            curve.append(
                {
                    "step": step,
                    "train_seconds": seconds,
                    "model_h1": statistics.mean(values),
                    "range": (min(values), max(values)),
                }
            )
        return curve

    @cached_property
    def mean_curves(self) -> dict[str, list[dict]]:
        """Each configuration's ``seed_mean_curve``, built once: the time table, the goals, the
        ladder and the plot all read them (the runs do not change once grouped)."""
        return {name: self.seed_mean_curve(name) for name in self.runs}

    def mean_time(self, config: str, factor: float, x_key: str = "train_seconds") -> float | None:
        """Training seconds (or steps) at which the seeds' mean curve first reaches factor x the
        dense final validation nRMSE (the mean of the dense runs' last points, which the dense
        mean curve ends at): one seed's noise can leave it short of a mean it is level with,
        the mean curve cannot."""
        return time_to(self.mean_curves.get(config, []), (self.dense_val or 0.0) * factor, x_key)

    def val_at(self, config: str, seconds: float) -> list[float | None]:
        return [values_at(r["curve"], "train_seconds", seconds) for r in self.runs.get(config, [])]


def warmup(record: dict) -> float:
    """A run's warm-up: its training seconds at the first validation less the time its steps
    take at the pace of the next validation interval. It is mostly the first step's
    compilation, which takes ~10 s on a warm compiler cache and ~45 s on a cold one (the same
    configuration, another sitting), so it says where a run fell, not what its sampler costs."""
    curve = record["curve"]
    if len(curve) < 2:
        return 0.0
    (s0, t0), (s1, t1) = ((p["step"], p["train_seconds"]) for p in curve[:2])
    return max(0.0, t0 - s0 * (t1 - t0) / (s1 - s0))


def steady(record: dict) -> dict:
    """The record with its warm-up left out of every time (kept as ``warmup_seconds``)."""
    w = warmup(record)
    curve = [{**p, "train_seconds": p["train_seconds"] - w} for p in record["curve"]]
    return {
        **record,
        "curve": curve,
        "train_seconds": record["train_seconds"] - w,
        "warmup_seconds": w,
    }


def groups(results: dict) -> list[Group]:
    """The finished runs by PDE and step count, their times without the warm-up (``steady``),
    with the curves so far of the unfinished runs of the same PDE and step count."""
    finished = [steady(r) for r in results["runs"] if "error" not in r]
    unfinished = [steady(r) for r in results.get("unfinished", [])]
    keys = sorted({(r["pde"], r["steps"]) for r in finished})
    out = []
    for pde, steps in keys:
        runs: dict[str, list[dict]] = {}
        for name in CONFIGS:
            mine = [
                r for r in finished if (r["pde"], r["steps"], r["config"]) == (pde, steps, name)
            ]
            if mine:
                runs[name] = sorted(mine, key=lambda r: r["seed"])
        cut = [r for r in unfinished if (r["pde"], r["steps"]) == (pde, steps)]
        out.append(Group(pde, steps, runs, cut))
    return out


# ---------------------------------------------------------------- report


def render(results: dict, out: Path) -> str:
    """The markdown report (and one plot per PDE and step count, written into ``out``)."""
    lines = [
        "# Time to accuracy: sparse vs dense training of the operator stage",
        "",
        *results["environment"],
        *sittings_lines(results.get("sittings", [])),
        "",
        "Every configuration trains the operator stage (latent operator + decoder fine-tuning) of "
        "one shared codec for the same number of steps, validated on the val split on the way "
        "and tested at the end on the test split (dense grid, physical space, nRMSE; one-step "
        "and latent rollouts of 4 and 16 steps). Training seconds (`train_seconds` of "
        "train.py) count the training loop, loader waits included (the 'loader wait s' "
        "column: the training thread's waits for its next batch, '-' for runs made before "
        "train.py logged it; a data-parallel run's in its own seconds on its GPUs; and of "
        "them, the 'of it stalled s' column: the GPU's time without work because of the loader, "
        "its idle time while a batch was not ready and the batches' copies, timed with CUDA "
        "events: a wait while the GPU was still busy with earlier steps stalls nothing; '-' "
        "before train.py logged it), and the error-based refreshes; validation, checkpoints, "
        "start-up and the test are outside them (the 'outside s' column: the processes' wall-clock minus training seconds, "
        "and of it the validations' own seconds, logged by train.py since the second pass; "
        "'-' where a sitting was killed before it logged a run's wall-clock). Every time "
        "below leaves out each run's warm-up (the 'warm-up s' column: its training seconds at "
        "the first validation less its steps at the pace of the next interval; mostly the "
        "first step's compilation, ~10 s on a warm compiler cache and ~45 s on a cold one, so "
        "it depends on the sitting, not on the configuration). ± is the "
        "standard deviation over seeds (a value without it is one seed's). Convergence: a run "
        "converged when its one-step "
        f"validation nRMSE improved by less than {CONVERGED_GAIN:.0%} over its last "
        f"{CONVERGED_TAIL:.0%} of steps.",
        "",
    ]
    failed = [r for r in results["runs"] if "error" in r]
    if failed:
        names = ", ".join(f"{r['pde']} {r['config']} seed {r['seed']}" for r in failed)
        lines += [f"**Failed runs** (rerun to retry): {names}.", ""]
    lines += unfinished_table(results.get("unfinished", []))
    every = groups(results)
    for group in every:
        lines += render_group(group, results, out)
    finished = dict.fromkeys(g.pde for g in every)  # the PDEs with finished runs, in order
    for pde in finished:
        lines += ladder(results, [g for g in every if g.pde == pde], out)
    for pde in results.get("setup", {}):
        if pde not in finished:
            lines += no_runs_yet(results, pde)
    return "\n".join(lines) + "\n"


def no_runs_yet(results: dict, pde: str) -> list[str]:
    """A PDE set up with no finished run yet: what its runs will share (the codec above all,
    which ties every later sitting to it) and the dense pace measured for them."""
    setup = results["setup"][pde]
    longest = max(map(int, setup["epochs_by_steps"]))
    lines = [f"## {setup['title']}: no finished runs yet", ""]
    lines += setup_lines(setup, results["settings"][pde], longest)[:-1]  # its blank line last
    pace = results.get("dense_pace", {}).get(pde)
    if pace:
        lines.append(
            f"- one-GPU dense pace, which data-parallel dense runs are timed at: "
            f"{pace['seconds_per_step'] * 1000:.1f} ms a step on {pace['gpu']}"
        )
    return [*lines, ""]


def unfinished_table(unfinished: list[dict]) -> list[str]:
    """Runs a sitting ended before they finished: where their curves had got to. They are in
    none of the analysis below; a rerun resumes them where their checkpoints are kept."""
    if not unfinished:
        return []
    lines = [
        "**Unfinished runs** (a sitting ended first; not in the tables below, dotted in the "
        "plots; a rerun resumes them from their checkpoints where those are kept):",
        "",
        "| PDE | configuration | seed | steps done | training s so far (warm-up out) "
        "| val one-step, last | as of |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(unfinished, key=lambda r: (r["pde"], r["steps"], r["config"], r["seed"])):
        last = steady(r)["curve"][-1]
        lines.append(
            f"| {r['pde']} | {r['config']} | {r['seed']} | {last['step']} of {r['steps']} "
            f"| {last['train_seconds']:.0f} | {last['model_h1']:.4f} | {r['updated']} |"
        )
    return [*lines, ""]


def sittings_lines(sittings: list[list[str]]) -> list[str]:
    """Each invocation of the study on this file (the lines above are the latest one's). A
    sitting whose host was lost mid-run may have left nothing: its run was redone later."""
    if len(sittings) < 2:
        return []
    lines = [f"- the study ran in {len(sittings)} sittings:"]
    for lines_of_one in sittings:
        fields = dict(line[2:].split(": ", 1) for line in lines_of_one if ": " in line)
        lines.append(f"  - {fields.get('date', '?')}: {fields.get('command', '?')}")
    return lines


def render_group(group: Group, results: dict, out: Path) -> list[str]:
    setup = results.get("setup", {}).get(group.pde, {})
    title = setup.get("title", group.pde)
    lines = [f"## {title}, {group.steps} steps", ""]
    lines += setup_lines(setup, results.get("settings", {}).get(group.pde, {}), group.steps)
    lines += warnings(group, pace_gpu(results, group.pde))
    if group.dense:
        lines += goals(group)
    lines += accuracy_table(group)
    lines += refresh_lines(group)
    if group.dense:
        lines += time_table(group)
    plot = out / f"bench_time_to_accuracy_{group.pde}_{group.steps}.png"
    draw(group, title, plot)
    lines += [f"![validation nRMSE against training seconds and against steps]({plot.name})", ""]
    return lines


def setup_lines(setup: dict, settings: dict, steps: int) -> list[str]:
    """What the runs of ``steps`` shared: data, codec, shard sets, and the options of every run."""
    if not setup:
        return []
    # results made before the budget ladder held one run length's epochs
    epochs = setup.get("epochs_by_steps", {}).get(str(steps), setup["epochs"])
    # the sets' k_e are recorded for the longest runs' sets (a cosine schedule's differ)
    longest = f" (of the {setup['epochs']}-epoch sets)" if epochs != setup["epochs"] else ""
    codec = setup["codec"]
    trained = (
        f"trained here ({codec['steps']} steps, {codec['train_seconds']:.0f} s"
        + (f" on {codec['gpu']}" if "gpu" in codec else "")
        + f", test reconstruction nRMSE {codec['test_recon_nrmse']:.4f})"
        + ("; later sittings were given this file with --codec" if codec.get("given") else "")
        if "steps" in codec
        else "given with --codec"
    )
    ratios = ", ".join(
        f"{name} {statistics.mean(s['k_per_epoch']) / s['num_points']:.3f}"
        for name, s in setup["sets"].items()
    )
    tail = any(SHARD_SETS[name].dense_tail for name in setup["sets"])
    given = setup.get("data_file")
    source = f"{given['name']} (sha256 {given['sha256'][:12]})" if given else "generated"
    return [
        f"- data: {source}, {setup['trajectories']} trajectories x {setup['snapshots']} snapshots "
        f"at resolution {setup['resolution']}, trajectory-disjoint train/val/test splits",
        f"- codec: {trained}; sha256 {codec['sha256'][:12]}",
        f"- latent shard sets: {epochs} epochs of query sets each "
        f"({setup['batches_per_epoch']} batches per epoch, no wrapping)"
        + (f", the cosine set's last {dense_tail_epochs(epochs)} dense" if tail else "")
        + f"; mean k/N per set{longest}: {ratios}",
        f"- every run: batch {settings['batch']}, lr {settings['lr']} (cosine decay over the "
        f"run), validation (one-step) every {settings['eval_every']} "
        f"steps on up to {settings['eval_trajectories']} val trajectories, error-based refreshes every "
        f"{settings['refresh_every']} epochs, compile {str(settings['compile']).lower()}"
        # results made before --compile-mode compiled in torch.compile's default mode
        + (f" (mode {settings.get('compile_mode', 'default')})" if settings["compile"] else ""),
        "",
    ]


def pace_gpu(results: dict, pde: str) -> str | None:
    """The GPU the results file's one-GPU dense pace of ``pde`` was measured on, if it has one."""
    return results.get("dense_pace", {}).get(pde, {}).get("gpu")


def timed_on(record: dict, file_pace_gpu: str | None) -> list[str]:
    """The GPUs whose pace a run's seconds are in. A data-parallel dense run's seconds are its
    steps at a one-GPU dense pace, measured on one card (``one_gpu_pace_gpu``; for runs made
    before it was kept, ``file_pace_gpu``: the card of the results file's pace, the one they were
    timed at), whatever cards it trained on; any other run's seconds are its own GPUs'."""
    if record.get("gpus_per_run", 1) > 1:
        return [record.get("one_gpu_pace_gpu") or file_pace_gpu or "unknown"]
    return record.get("gpus", [])


def warnings(group: Group, file_pace_gpu: str | None) -> list[str]:
    """Warnings about what the group's numbers mix; ``file_pace_gpu``: the GPU the results file's
    one-GPU dense pace was measured on."""
    out = []
    every = [r for rs in group.runs.values() for r in rs]
    gpus = sorted({gpu for r in every for gpu in timed_on(r, file_pace_gpu)})
    if len(gpus) > 1:
        out.append(
            f"- **Warning**: runs on different devices ({', '.join(gpus)}); their wall-clocks do not compare."
        )
    for key, what in (("codec_sha256", "codecs"), ("data_sha256", "data files")):
        if len({r[key] for r in every}) > 1:
            out.append(
                f"- **Warning**: runs from different {what}; their accuracies do not compare."
            )
    resumed = sum(r["starts"] > 1 for r in every)
    if resumed:
        out.append(
            f"- {resumed} run(s) resumed from a checkpoint (the 'starts' column). A resumed "
            "start's first step pays the warm-up (with --compile the compilation) an "
            "uninterrupted run pays once, and waits for the loader to start again; the step's "
            "excess over a steady step and that wait "
            f"({sum(r.get('resume_warmup_seconds', 0.0) for r in every):.0f} s in all; runs "
            "before the second pass logged no wait, and theirs stays in) are left out of the "
            "training seconds and counted outside them."
        )
    wide = [r for r in group.dense if r.get("gpus_per_run", 1) > 1]
    if wide:
        out.append(
            f"- {len(wide)} dense run(s) trained data-parallel (torchrun, the same global "
            "batches as one GPU, so the same steps). Their seconds here are their steps at the "
            "one-GPU dense pace, measured by a short dense run on one GPU first:"
        )
    hosts: dict[tuple, list[dict]] = {}  # each pace, and each kind of host the runs took
    for r in wide:
        key = (
            r["one_gpu_seconds_per_step"],
            timed_on(r, file_pace_gpu)[0],
            r["gpus_per_run"],
            r["gpus"][0],
        )
        hosts.setdefault(key, []).append(r)
    for (pace, pace_on, gpus, host), runs in hosts.items():
        measured = statistics.mean(
            r["measured_train_seconds"] - r["measured_warmup_seconds"] for r in runs
        )
        speed = group.steps * pace / measured  # against one GPU of the pace's card
        scaling = (
            f", {speed:.2f}x the pace of one GPU ({speed / gpus:.0%} of linear scaling)"
            if host == pace_on
            else " (other cards than the pace's: no scaling figure)"
        )
        out.append(
            f"  - {len(runs)} run(s) on {gpus} x {host}, timed at {pace * 1000:.1f} ms a step "
            f"(measured on {pace_on}): {measured:.0f} s of their own after their warm-up"
            f"{scaling}."
        )
    if not group.dense:
        out.append("- No dense runs yet: no time-to-accuracy numbers.")
    elif not all(converged(r) for r in group.dense):
        gains = ", ".join(percent(improvement(r["curve"], r["steps"])) for r in group.dense)
        out.append(
            f"- **Warning: the dense runs did not converge** (validation gain over the last "
            f"{CONVERGED_TAIL:.0%} of steps: {gains}): a converged dense model sets a lower "
            "target, so the times to reach the dense accuracy below are lower bounds."
        )
    return [*out, ""] if out else []


def goals(group: Group) -> list[str]:
    """The issue's goals, met or missed from the data."""
    rows = [goal_fast(group)]
    rows += [goal_error(group, ratio) for ratio in ("0.1", "0.3")]
    rows.append(goal_cosine(group))
    rows = [row for row in rows if row is not None]
    if not rows:
        return []
    return ["### Goals", "", *markdown_table(["goal", "measured", ""], rows), ""]


def goal_fast(group: Group) -> list[str] | None:
    """(a) The best sparse configuration reaches the dense accuracy in <= 1/3 of dense's time
    (on the validation curve: the test metrics exist only at the end of a run)."""
    dense_s = group.dense_seconds
    best = None
    for name in group.runs:
        if name == "dense":
            continue
        seconds = group.mean_time(name, 1.0)
        if seconds is not None and (best is None or seconds < best[1]):
            best = (name, seconds)
    goal = (
        "(a) the best sparse configuration reaches the dense final accuracy (validation curve) "
        "in <= 1/3 of dense wall-clock"
    )
    if best is None:
        return [
            goal,
            "no sparse configuration's mean curve over seeds reached the dense runs' final "
            "validation nRMSE",
            "missed",
        ]
    name, seconds = best
    test = {
        n: statistics.mean(r["test"]["model_h1"] for r in group.runs[n]) for n in (name, "dense")
    }
    seeds = len(group.runs[name])
    over = "one seed" if seeds == 1 else f"mean curve over {seeds} seeds"
    measured = (
        f"{name}: {seconds:.0f} s ({over}) to the dense final val nRMSE "
        f"{group.dense_val:.4f}, against "
        f"dense's {dense_s:.0f} s ({seconds / dense_s:.2f}x); its final test one-step "
        f"{test[name]:.4f} vs dense {test['dense']:.4f}"
    )
    return [goal, measured, "met" if seconds <= dense_s / 3 else "missed"]


def goal_error(group: Group, ratio: str) -> list[str] | None:
    """(b) At equal wall-clock, error-based sets beat uniform ones at the same ratio by >= 5 %,
    with a seed spread smaller than the gap. Equal wall-clock: the latest time every run of
    both configurations reached, where every curve has a value."""
    error, uniform = f"error {ratio}", f"uniform {ratio}"
    if error not in group.runs or uniform not in group.runs:
        return None
    goal = f"(b) at equal wall-clock error {ratio} beats uniform {ratio} by >= 5 %, spread < gap"
    both = group.runs[error] + group.runs[uniform]
    seconds = min(r["curve"][-1]["train_seconds"] for r in both)
    e, u = group.val_at(error, seconds), group.val_at(uniform, seconds)
    if None in e or None in u:  # a curve starts (its first validation) after another ends
        return [goal, f"no wall-clock every run's validation curve covers ({seconds:.0f} s)", "-"]
    (me, se), (mu, su) = mean_std(e), mean_std(u)
    gap = mu - me
    measured = (
        f"val one-step at {seconds:.0f} s: error {fmt(e)}, uniform {fmt(u)} "
        f"({gap / mu:+.1%} for error)"
    )
    if gap < 0.05 * mu:
        return [goal, measured, "missed"]
    if min(len(e), len(u)) < 2:  # one seed has no spread to set against the gap
        return [goal, measured, "not shown (one seed)"]
    return [goal, measured, "met" if max(se, su) < gap else "missed"]


def goal_cosine(group: Group) -> list[str] | None:
    """(c) The cosine schedule with a dense tail ends within 1.0x of dense's test accuracy in
    less wall-clock."""
    name = "cosine 1.0->0.2 + dense tail"
    if name not in group.runs:
        return None
    cos, dense = group.runs[name], group.dense
    tests_c = [r["test"]["model_h1"] for r in cos]
    tests_d = [r["test"]["model_h1"] for r in dense]
    test_c, test_d = statistics.mean(tests_c), statistics.mean(tests_d)
    level = sum(t <= test_d for t in tests_c)  # seeds at or under dense's mean
    secs_c = statistics.mean(r["train_seconds"] for r in cos)
    secs_d = group.dense_seconds or 0.0
    measured = (
        f"test one-step {fmt(tests_c)} vs dense {fmt(tests_d)} ({test_c / test_d:.3f}x; "
        f"seeds at or under dense's mean: {level}/{len(cos)}) in {secs_c:.0f} s vs {secs_d:.0f} s"
    )
    met = test_c <= test_d and secs_c < secs_d
    return [
        f"(c) {name} ends within 1.0x of dense test accuracy at less wall-clock",
        measured,
        "met" if met else "missed",
    ]


def accuracy_table(group: Group) -> list[str]:
    head = ["configuration", "seeds", "train s", "warm-up s", "refresh s", "loader wait s",
            "of it stalled s", "outside s", "of it validation s", "starts", "samples/s",
            "test one-step", "test h4", "test h16", "converged"]  # fmt: skip
    rows = []
    for name, runs in group.runs.items():
        test = {
            k: [r["test"][k] for r in runs if k in r["test"]]
            for k in ("model_h1", "model_h4", "model_h16")
        }
        conv = [converged(r) for r in runs]
        rows.append([
            name, len(runs), fmt([r["train_seconds"] for r in runs], 1),
            f"{statistics.mean(r['warmup_seconds'] for r in runs):.0f}",
            f"{statistics.mean(r['refresh_seconds'] for r in runs):.0f}",
            mean_of_known([r.get("loader_wait_seconds") for r in runs]),
            mean_of_known([r.get("loader_stall_seconds") for r in runs]),
            mean_of_known([r["outside_seconds"] for r in runs]),
            mean_of_known([r.get("validation_seconds") for r in runs]),
            sum(r["starts"] for r in runs),
            f"{statistics.mean(r['samples_per_s'] for r in runs):.0f}",
            fmt(test["model_h1"]), fmt(test["model_h4"]), fmt(test["model_h16"]),
            f"{sum(c is True for c in conv)}/{len(conv)}",
        ])  # fmt: skip
    return ["### Final accuracy (test split)", "", *markdown_table(head, rows), ""]


def ladder(results: dict, rungs: list[Group], out: Path) -> list[str]:
    """One PDE's runs at several step counts (``--steps A B ...``): what each longer run gains
    (convergence across budgets, which a cosine schedule's last 20 % alone cannot show: its
    learning rate anneals there at any length), and how soon each run reaches the final
    validation nRMSE of the longest dense runs; plotted on one time axis."""
    if len(rungs) < 2:
        return []
    title = results.get("setup", {}).get(rungs[0].pde, {}).get("title", rungs[0].pde)
    reference = max((g for g in rungs if g.dense), key=lambda g: g.steps, default=None)
    target = reference.dense_val if reference else None
    head = ["configuration", "steps", "seeds", "train s", "final val one-step",
            "gain over the run before", "test one-step"]  # fmt: skip
    if target is not None:
        head.append(f"s to dense {reference.steps}-step val ({target:.4f})")
    rows = []
    for name in CONFIGS:
        before: tuple[int, float] | None = None  # the previous rung's steps and mean final val
        for group in (g for g in rungs if name in g.runs):  # ascending steps
            runs = group.runs[name]
            final = statistics.mean(r["curve"][-1]["model_h1"] for r in runs)
            gain = "-"
            if before is not None:
                steps, was = before
                gain = f"{(was - final) / was:.1%} (vs {steps})"
            before = group.steps, final
            row = [
                name, group.steps, len(runs), fmt([r["train_seconds"] for r in runs], 1),
                fmt([r["curve"][-1]["model_h1"] for r in runs]), gain,
                fmt([r["test"]["model_h1"] for r in runs]),
            ]  # fmt: skip
            if target is not None:
                reached = time_to(group.mean_curves[name], target)
                row.append("not reached" if reached is None else f"{reached:.1f}")
            rows.append(row)
    return [
        f"## {title}: the budget ladder",
        "",
        "Each configuration at each step count (every run's learning rate decays over its own "
        "steps). 'gain over the run before': how much lower the final validation nRMSE ends "
        "than at the next smaller step count (seed means); "
        + (
            "the last column reads the seeds' mean curve, as the time table does."
            if target is not None
            else "no dense runs yet, so no times to dense's accuracy."
        ),
        "",
        *markdown_table(head, rows),
        "",
        *draw_ladder(rungs, reference, title, out),
    ]


def refresh_lines(group: Group) -> list[str]:
    """Where the error-based runs' refresh seconds went, for the runs that logged it."""
    out = []
    for name, runs in group.runs.items():
        logged = [r for r in runs if r.get("refresh_stage_seconds")]
        if not logged:
            continue
        stages = logged[0]["refresh_stage_seconds"]
        mean = {stage: statistics.mean(r["refresh_stage_seconds"][stage] for r in logged)
                for stage in stages}  # fmt: skip
        refresh = statistics.mean(r["refresh_seconds"] for r in logged)
        parts = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in mean.items())
        out.append(f"- {name}: refreshes {refresh:.1f} s per run ({len(logged)} run(s)); {parts}")
    if not out:
        return []
    return [
        "Where the refreshes' seconds go (summed over a run's refreshes; read: waiting for a "
        "shard, error and plan on the main thread, write: summed over the writer threads, "
        "behind the rest):",
        "",
        *out,
        "",
    ]


def mean_of_known(values: list[float | None]) -> str:
    """The mean of the runs' seconds; '-' where one has none (validation seconds: it predates
    their logging; outside seconds: a sitting of it was killed before it logged its wall-clock)."""
    if any(v is None for v in values):
        return "-"
    return f"{statistics.mean(values):.0f}"


def time_table(group: Group) -> list[str]:
    dense_s = group.dense_seconds or 0.0
    target = group.dense_val or 0.0
    head = [
        "configuration",
        f"s to dense val ({target:.4f})",
        "speed-up",
        "seeds reaching it",
        f"s to 1.05x dense val ({1.05 * target:.4f})",
        "speed-up (1.05x)",
        "seeds reaching 1.05x",
        f"val one-step at dense's {dense_s:.0f} s",
        "steps to dense val",
    ]
    dense_to = {factor: group.mean_time("dense", factor) for factor in (1.0, 1.05)}
    rows = []
    for name, runs in group.runs.items():
        row = [name]
        for factor in (1.0, 1.05):
            seconds = group.mean_time(name, factor)
            found, n = group.times(name, factor)
            if seconds is None:
                row += ["not reached", "-"]
            else:
                speed = f"{dense_to[factor] / seconds:.2f}x" if dense_to[factor] else "-"
                row += [f"{seconds:.1f}", speed]
            row.append(f"{len(found)}/{n}" + (f" ({fmt(found, 1)} s)" if found else ""))
        at = group.val_at(name, dense_s)
        if all(v is not None for v in at):
            row.append(fmt(at))
        else:
            ends = statistics.mean(r["curve"][-1]["train_seconds"] for r in runs)
            final = fmt([r["curve"][-1]["model_h1"] for r in runs])
            row.append(f"- (ends at {ends:.0f} s, at {final})")
        steps = group.mean_time(name, 1.0, "step")
        row.append("not reached" if steps is None else f"{steps:,.0f}")
        rows.append(row)
    return [
        "### Time to the dense runs' final validation nRMSE",
        "",
        "The target: the mean of the dense runs' final validation nRMSE (and 1.05x of it). Time "
        "to it: the first crossing of the configuration's mean curve over seeds (at each "
        "validation step, the seeds' mean seconds and mean nRMSE; linear between validations). "
        "A single seed's curve, as noisy as the seeds' spread, misses a mean it is level with "
        "about half the time; the 'seeds reaching it' columns count those that cross on their "
        "own, with their mean ± std seconds. Speed-up: the dense mean curve's time to the same "
        "target over the configuration's (for the 1.0x target that is where dense's mean curve "
        "first reaches its own final value: at its end, or before it where the curve was flat). "
        "The validation nRMSE at dense's wall-clock is interpolated; a run that ended sooner "
        "has none, and its own final value is given instead (it reached that in less time; a "
        "longer run, with its learning rate decayed over more steps, is what would say more). "
        "Steps to dense val: the step at which the same mean curve first reaches the 1.0x "
        "target. It is the half of the time a host does not set: the time is those steps at "
        "the run's pace, and where the step is bound by the host (Burgers 1D) that pace differs "
        "from host to host and from sitting to sitting.",
        "",
        *markdown_table(head, rows),
        "",
    ]


def draw_ladder(rungs: list[Group], reference: Group | None, title: str, out: Path) -> list[str]:
    """Every rung's mean validation curve on one training-seconds axis (a configuration's
    colour, its longer rungs bolder, each end marked), with the reference dense runs' final
    validation nRMSE dashed: where a longer sparse budget crosses it, and how soon."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    lengths = sorted({g.steps for g in rungs})
    for name in CONFIGS:
        for group in (g for g in rungs if name in g.runs):
            curve = group.mean_curves[name]
            if not curve:
                continue
            bold = (lengths.index(group.steps) + 1) / len(lengths)  # (0, 1]: the longest 1
            x = [p["train_seconds"] for p in curve]
            y = [p["model_h1"] for p in curve]
            label = f"{name}, {group.steps} steps ({len(group.runs[name])})"
            ax.plot(
                x,
                y,
                color=CONFIGS[name].colour,
                linestyle=CONFIGS[name].style,
                linewidth=0.6 + 1.4 * bold,
                alpha=0.35 + 0.65 * bold,
                marker="o",
                markevery=[len(x) - 1],  # the run's end
                label=label,
            )
    if reference is not None and reference.dense_val is not None:
        ax.axhline(
            reference.dense_val, **TARGET_LINE, label=f"dense {reference.steps}-step final val"
        )
    ax.set(
        yscale="log",
        xscale="log",
        ylabel="validation one-step nRMSE (mean over seeds)",
        xlabel=SECONDS_LABEL,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.suptitle(f"{title}, operator stage: the budget ladder")
    fig.tight_layout()
    path = out / f"bench_time_to_accuracy_{rungs[0].pde}_ladder.png"
    fig.savefig(path, dpi=120)
    return [f"![every rung's validation nRMSE against training seconds]({path.name})", ""]


def draw(group: Group, title: str, path: Path) -> None:
    """Validation one-step nRMSE against training seconds (left) and against steps (right):
    one line per configuration (the mean over seeds, shaded from the lowest seed to the
    highest: on a log axis a mean - std below zero would shade down to the axis), log y; the
    dense target and 1.05x of it dashed. The steps panel shows how much each configuration
    learns per step, so the seconds panel's gaps read as what each step costs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5.5))
    FigureCanvasAgg(fig)
    by_seconds, by_steps = fig.subplots(1, 2, sharey=True)
    xlabels = {
        "train_seconds": SECONDS_LABEL,
        "step": "operator steps",
    }
    for ax, x_key in ((by_seconds, "train_seconds"), (by_steps, "step")):
        for name, runs in group.runs.items():
            curve = group.mean_curves[name]
            if not curve:
                continue
            x = [p[x_key] for p in curve]
            mean = np.array([p["model_h1"] for p in curve])
            low, high = np.array([p["range"] for p in curve]).T
            config = CONFIGS[name]
            ax.plot(
                x, mean, color=config.colour, linestyle=config.style, label=f"{name} ({len(runs)})"
            )
            ax.fill_between(x, low, high, color=config.colour, alpha=0.15, linewidth=0)
        for run in group.unfinished:
            ax.plot(
                [p[x_key] for p in run["curve"]],
                [p["model_h1"] for p in run["curve"]],
                color=CONFIGS[run["config"]].colour,
                linestyle=":",
                linewidth=1.0,
                label=f"{run['config']} seed {run['seed']} (unfinished, "
                f"step {run['curve'][-1]['step']})",
            )
        if group.dense_val is not None:
            for factor in (1.0, 1.05):
                ax.axhline(
                    group.dense_val * factor,
                    **TARGET_LINE,
                    label="dense final val, 1.05x" if factor == 1.0 else None,
                )
        ax.set(yscale="log", xlabel=xlabels[x_key])
        ax.grid(alpha=0.3, which="both")
    by_seconds.set(ylabel="validation one-step nRMSE", title="against training seconds")
    by_steps.set(title="against steps")
    by_seconds.legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"{title}, operator stage, {group.steps} steps (mean over seeds, shaded: their range)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
