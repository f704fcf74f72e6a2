"""Plot a training run's loss and validation nRMSE curves to PNG.

ups-plot-run RUN_DIR [--out RUN_DIR/curves.png]
(in a checkout also python tools/plot_run.py ...)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def load_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (is {run} a training run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict], prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(prefix):
                steps, values = out.setdefault(key.removeprefix(prefix), ([], []))
                steps.append(record["step"])
                values.append(value)
    return out


def plot(records: list[dict], out: Path, title: str) -> None:
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_val = fig.subplots(1, 2)
    for name, (steps, values) in series(records, "train/").items():
        ax_loss.plot(steps, values, label=name)
    ax_loss.set(
        xlabel="step", ylabel="loss (normalised units)", yscale="log", title="training losses"
    )
    for name, (steps, values) in series(records, "val/").items():
        style = "--" if name.startswith("persistence") else "-o"
        ax_val.plot(steps, values, style, label=name, markersize=3)
    ax_val.set(
        xlabel="step", ylabel="nRMSE (dense val grid, physical)", yscale="log", title="validation"
    )
    for ax in (ax_loss, ax_val):
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="an ups-train output directory")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN/curves.png)")
    args = parser.parse_args(argv)
    out = args.out or args.run / "curves.png"
    plot(load_metrics(args.run), out, str(args.run))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
