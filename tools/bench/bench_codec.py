"""How good the model gets on NS 2D 128x128: codec reconstruction, then operator one-step error
against persistence, per configuration, against steps and seconds.

Every decoder loss of the operator stage decodes through the codec, so its reconstruction error
is the floor of every operator's one-step error. Each configuration runs on its own GPU: train a
codec on the field-only shards (validation reconstruction nRMSE logged on the way), then, with
``--operator-steps``, build latent shards from it (gradient sets, k/N = ``--ratio``) and train
the operator stage on them; the dense test metrics of both stages are reported (physical space,
next to persistence u_{t+h} = u_t).

The field shards hold ``--epochs`` query sets (uniform, k/N = ``--ratio``), reused cyclically,
so the decoder sees other points of each training snapshot in later epochs.
Each finished configuration is appended to OUT/bench_codec.json at once; a rerun skips it.

    python tools/bench/bench_codec.py --out-dir docs/bench --operator-steps 4000   # GPU machine
    python tools/bench/bench_codec.py --smoke --out-dir /tmp/codec                 # tiny, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import (
    ROOT,
    build_field_shards,
    environment_lines,
    gpu_slots,
    markdown_table,
    read_jsonl,
    run_in_slots,
)

from pipeline.schedules import ScheduleConfig
from pipeline.sources.generate import generate

# name -> train.py overrides on top of BASE, for both stages
CONFIGS = {
    "T64 D64 w128": [],
    "T256 D64 w128": ["codec.encoder.num_tokens=256"],
    "T256 D64 w256": [
        "codec.encoder.num_tokens=256",
        "codec.encoder.dim=256",
        "codec.decoder.dim=256",
        "operator.dim=256",
    ],
    "T256 D128 w256 dec4": [
        "codec.encoder.num_tokens=256",
        "codec.encoder.latent_dim=128",
        "codec.encoder.dim=256",
        "codec.decoder.dim=256",
        "codec.decoder.depth=4",
        "operator.dim=256",
    ],
    "T256 D64 w256 lr2e-3": [
        "codec.encoder.num_tokens=256",
        "codec.encoder.dim=256",
        "codec.decoder.dim=256",
        "operator.dim=256",
        "optim.lr=2e-3",
    ],
}
BASE = [
    "codec.encoder.patch=8",
    "codec.encoder.dim=128",
    "codec.encoder.depth=2",
    "codec.encoder.heads=4",
    "codec.encoder.num_tokens=64",
    "codec.encoder.latent_dim=64",
    "codec.decoder.dim=128",
    "codec.decoder.depth=3",
    "codec.decoder.heads=4",
    "operator.dim=128",
    "operator.depth=4",
    "operator.heads=4",
    "progress=false",
    "tensorboard=false",
    "loader.workers=4",
    "loader.wrap_epochs=true",
    "epochs=1000000",
    "eval_trajectories=8",
    "checkpoint_every=1000000",
]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def setup(args: argparse.Namespace, work: Path) -> Path:
    """Generated NS 2D data -> field-only shards (built once; a rerun reuses them)."""
    fields = work / "fields"
    if (fields / "manifest.json").exists():
        return fields
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = generate(
        "ns2d", work / "ns.h5", args.trajectories, args.steps, args.resolution, seed=0,
        device=device, progress=False,
    )  # fmt: skip
    build_field_shards(data, fields, args.epochs, ScheduleConfig(start_ratio=args.ratio), device)
    return fields


def val_curve(run: Path, key: str) -> list[dict]:
    return [
        {"step": m["step"], "train_seconds": m["train_seconds"], "val": m[key]}
        for m in read_jsonl(run / "metrics.jsonl")
        if key in m
    ]


def run_config(name: str, gpu: int, args: argparse.Namespace, fields: Path, work: Path) -> dict:
    """Codec, then (``--operator-steps``) latent shards and the operator, on GPU ``gpu``."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
    root = work / "runs" / slug(name)
    log = work / f"{slug(name)}.log"
    common = [
        *BASE, f"batch_size={args.batch}", f"optim.lr={args.lr}", *CONFIGS[name],
        f"eval_every={args.eval_every}", "overwrite=true",
        *(["device=cpu", "loader.workers=1", "loader.process=false"] if args.smoke else []),
    ]  # fmt: skip
    record: dict = {
        "config": name,
        "overrides": CONFIGS[name],
        "codec_steps": args.codec_steps,
        "operator_steps": args.operator_steps,
    }
    started = time.perf_counter()

    def call(tool: str, *options: str) -> None:
        with open(log, "a") as f:
            subprocess.run(
                [sys.executable, str(ROOT / "tools" / tool), *options],
                env=env, stdout=f, stderr=subprocess.STDOUT, check=True,
            )  # fmt: skip

    try:
        call(
            "train.py", *common, "stage=codec", f"shards={fields}", f"out={root / 'codec'}",
            f"max_steps={args.codec_steps}",
        )  # fmt: skip
        record["codec"] = {
            "curve": val_curve(root / "codec", "val/recon_nrmse"),
            "test": json.loads((root / "codec" / "test_metrics.json").read_text()),
            "train_seconds": val_curve(root / "codec", "val/recon_nrmse")[-1]["train_seconds"],
        }
        if args.operator_steps:
            latents = root / "latents"
            call(
                "build_shards.py", f"data.path={work / 'ns.h5'}", f"out={latents}",
                f"encoder={root / 'codec' / 'codec.pt'}", "format=zarr", "sampler.kind=gradient",
                f"schedule.start_ratio={args.ratio}", f"epochs={args.epochs}",
                "trajectories_per_shard=4", "progress=false", "overwrite=true",
                *(["device=cpu"] if args.smoke else []),
            )  # fmt: skip
            call(
                "train.py", *common, "stage=operator", f"shards={latents}",
                f"codec_checkpoint={root / 'codec' / 'codec.pt'}", f"out={root / 'operator'}",
                f"max_steps={args.operator_steps}",
            )  # fmt: skip
            curve = val_curve(root / "operator", "val/model_h1")
            record["operator"] = {
                "curve": curve,
                "test": json.loads((root / "operator" / "test_metrics.json").read_text()),
                "train_seconds": curve[-1]["train_seconds"],
            }
    except subprocess.CalledProcessError:
        record["error"] = log.read_text()[-2000:]
    record["wall_seconds"] = time.perf_counter() - started
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="docs/bench")
    parser.add_argument("--work", default=None, help="data, shards and runs (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on a CPU")
    parser.add_argument("--trajectories", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="snapshots per trajectory")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=20, help="query sets per shard set")
    parser.add_argument("--ratio", type=float, default=0.3, help="k/N of the query sets")
    parser.add_argument("--codec-steps", type=int, default=6000)
    parser.add_argument("--operator-steps", type=int, default=0, help="0: the codec only")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    if args.smoke:
        args.trajectories, args.steps, args.resolution = 12, 6, 32
        args.codec_steps, args.operator_steps = 20, min(args.operator_steps, 20)
        args.epochs, args.batch, args.eval_every = 2, 8, 10
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "bench_codec.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    results.update(environment=environment_lines(), args=vars(args))
    done = {  # a configuration is done at its step counts
        r["config"]
        for r in results["runs"]
        if "error" not in r and run_key(r) == (r["config"], args.codec_steps, args.operator_steps)
    }
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_codec_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fields = setup(args, work)
    print(f"setup {time.perf_counter() - started:.0f} s: {fields}", flush=True)

    todo = [name for name in args.configs if name not in done]

    def start(name: str, gpu: int) -> dict:
        print(f"started {name} on GPU {gpu}", flush=True)
        return run_config(name, gpu, args, fields, work)

    def finished(name: str, record: dict) -> None:  # saved as it finishes: a killed sweep keeps it
        key = (name, args.codec_steps, args.operator_steps)
        results["runs"] = [r for r in results["runs"] if run_key(r) != key] + [record]
        results_path.write_text(json.dumps(results, indent=1))
        print(f"finished {name}: {summary(record)}", flush=True)

    run_in_slots(todo, gpu_slots(), start, finished)
    report = render(results)
    (out / "bench_codec.md").write_text(report)
    print(report)


def run_key(record: dict) -> tuple[str, int, int]:
    return record["config"], record["codec_steps"], record["operator_steps"]


def summary(record: dict) -> str:
    if "error" in record:
        return "failed: " + record["error"][-300:]
    text = f"test recon {record['codec']['test']['recon_nrmse']:.4f}"
    if "operator" in record:
        test = record["operator"]["test"]
        text += f", one-step {test['model_h1']:.4f} (persistence {test['persistence_h1']:.4f})"
    return text


def render(results: dict) -> str:
    rows = []
    for r in results["runs"]:
        steps = f"{r['codec_steps']} / {r['operator_steps']}"
        if "error" in r:
            rows.append([r["config"], steps, "failed", "", "", "", ""])
            continue
        codec = r["codec"]
        row = [
            r["config"],
            steps,
            f"{codec['test']['recon_nrmse']:.4f}",
            f"{codec['train_seconds']:.0f}",
            " ".join(f"{c['val']:.3f}" for c in codec["curve"][1::2]),
        ]
        if "operator" in r:
            test = r["operator"]["test"]
            row.append(f"{r['operator']['train_seconds']:.0f}")
            row.append(
                ", ".join(
                    f"h{h} {test[f'model_h{h}']:.4f} / {test[f'persistence_h{h}']:.4f} "
                    f"({test[f'model_h{h}'] / test[f'persistence_h{h}']:.2f}x)"
                    for h in (1, 4, 16)
                    if f"model_h{h}" in test
                )
            )
        else:
            row += ["", ""]
        rows.append(row)
    header = [
        "configuration",
        "codec / operator steps",
        "codec test recon nRMSE",
        "codec train s",
        "codec val recon (every 2nd eval)",
        "operator train s",
        "operator test nRMSE / persistence",
    ]
    return (
        "\n".join(
            [
                "# Model quality on NS 2D",
                "",
                *results["environment"],
                "",
                *markdown_table(header, rows),
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
