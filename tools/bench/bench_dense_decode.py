"""What a dense decode costs, eager against ``torch.compile``: the error pass of a refresh.

An error-based refresh (``ups.adaptive.PointError``) decodes every training snapshot on the
whole grid, twice for the operator stage (the inverse term decodes z_s, the forward term
op(z_{s-1})), in batches of ``adaptive.batch`` under bf16 autocast. With ``compile=true`` the
step was compiled and this pass was not; the measurement below is why the trainer now compiles
a refresh's dense decode too (validation's, in float32 and outside the training seconds, stays
eager). This times the shipped NS 2D codec and operator (``ns2d_codec``, ``ns2d_operator``;
random weights: the cost does not depend on them) on one device, side by side: the eager decode
and operator, and both compiled (torch.compile, default mode), after a warm-up call that pays
the compilation. It prints a table and writes it to docs/bench_dense_decode.md and
docs/bench/bench_dense_decode.json (with ``--out``: both there).

    python tools/bench/bench_dense_decode.py                        # on a GPU
    python tools/bench/bench_dense_decode.py --quick --out /tmp/dd  # tiny, on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_common import ROOT, environment_lines, markdown_table, synchronize

from pipeline.config import load_config
from pipeline.sources.pdebench import DataInfo
from ups.models.codec import Codec
from ups.models.operator import LatentOperator
from ups.training.train import TrainConfig

CONFIGS = ROOT / "ups" / "configs"
HEADER = ["path", "eager ms", "compiled ms", "speed-up", "compile s",
          "compiled ms after a smaller batch", "its recompile s", "relative difference"]  # fmt: skip


def timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls, the device synchronised around each."""
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        tick = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - tick)
    return seconds


def measure(
    module: Callable[..., torch.Tensor], inputs: tuple, device: torch.device, repeats: int
) -> dict:
    """Milliseconds per call eager and compiled, the compilation's seconds, and the compiled
    graph after a smaller batch (a shard's last): torch.compile then recompiles once for
    dynamic shapes, and that graph serves every batch size from there on."""
    eager = module(*inputs)
    compiled_fn = torch.compile(module)
    first = timed(lambda: compiled_fn(*inputs), device, 1)[0]
    compiled = compiled_fn(*inputs)
    eager_s = statistics.median(timed(lambda: module(*inputs), device, repeats))
    compiled_s = statistics.median(timed(lambda: compiled_fn(*inputs), device, repeats))
    part = inputs[0].shape[0] * 3 // 4
    recompile = timed(lambda: compiled_fn(*(x[:part] for x in inputs)), device, 1)[0]
    dynamic_s = statistics.median(timed(lambda: compiled_fn(*inputs), device, repeats))
    return {
        "eager_ms": 1e3 * eager_s,
        "compiled_ms": 1e3 * compiled_s,
        "compile_s": first,
        "dynamic_ms": 1e3 * dynamic_s,
        "recompile_s": recompile,
        "relative_difference": float(
            (compiled.float() - eager.float()).norm() / eager.float().norm()
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", type=Path, default=None, help="write bench_dense_decode.{json,md} here")
    add("--batch", type=int, default=64, help="snapshots per decode (adaptive.batch)")
    add("--repeats", type=int, default=20, help="timed calls per path")
    add("--snapshots", type=int, default=4080, help="a refresh's training snapshots (study: 4080)")
    add("--quick", action="store_true", help="a 32x32 grid and a small model, on a CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = []
    grid = (128, 128)
    if args.quick:
        grid, args.batch, args.repeats = (32, 32), 4, 3
        overrides = ["codec.encoder.num_tokens=16", "codec.encoder.patch=8"]
    codec_cfg = load_config(TrainConfig, CONFIGS / "ns2d_codec.yaml", overrides).codec
    operator_cfg = load_config(TrainConfig, CONFIGS / "ns2d_operator.yaml").operator
    info = DataInfo(("vorticity",), grid, 0.05, 20, 1, (True, True), {"viscosity": 1e-3})
    torch.manual_seed(0)
    codec = Codec(codec_cfg, info).to(device).eval()
    tokens, latent = codec_cfg.encoder.num_tokens, codec_cfg.encoder.latent_dim
    # as build_models makes it: one input per PDE parameter, coordinates of the grid's rank
    operator = LatentOperator(operator_cfg, latent, tokens, len(info.params), info.ndim)
    operator = operator.to(device).eval()
    z = torch.randn(args.batch, tokens, latent, device=device)  # (B, T, D)
    dt = torch.full((args.batch,), info.dt, device=device)
    params = torch.tensor([list(info.params.values())], device=device).expand(args.batch, -1)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    inputs = {"decode_grid": (z,), "operator": (z, dt, params)}
    modules = {"decode_grid": codec.decode_grid, "operator": operator}
    results, rows = {}, []
    with torch.no_grad(), autocast:
        for name, module in modules.items():
            results[name] = r = measure(module, inputs[name], device, args.repeats)
            rows.append(
                [name, f"{r['eager_ms']:.1f}", f"{r['compiled_ms']:.1f}",
                 f"{r['eager_ms'] / r['compiled_ms']:.2f}x", f"{r['compile_s']:.1f}",
                 f"{r['dynamic_ms']:.1f}", f"{r['recompile_s']:.1f}",
                 f"{r['relative_difference']:.1e}"]
            )  # fmt: skip
    # a refresh: every snapshot decoded twice (inverse and forward terms), the operator once
    batches = args.snapshots / args.batch
    refresh = {
        kind: batches * (2 * results["decode_grid"][f"{kind}_ms"] + results["operator"][f"{kind}_ms"])
        / 1e3
        for kind in ("eager", "compiled", "dynamic")
    }  # fmt: skip
    lines = [
        "# Dense decode: eager against torch.compile (a refresh's error pass)",
        "",
        *environment_lines(),
        f"- the shipped ns2d_codec and ns2d_operator, grid {grid[0]}x{grid[1]}, batch "
        f"{args.batch} snapshots, {'bf16 autocast' if device.type == 'cuda' else 'float32'}, "
        f"median of {args.repeats} calls",
        "",
        *markdown_table(HEADER, rows),
        "",
        f"A refresh's error pass over {args.snapshots} training snapshots (two decodes and one "
        f"operator call per snapshot): {refresh['eager']:.2f} s eager, "
        f"{refresh['compiled']:.2f} s compiled ({refresh['dynamic']:.2f} s once a smaller "
        "batch has made the graph dynamic).",
    ]
    text = "\n".join(lines)
    print(text)
    docs = ROOT / "docs"
    md, js = (docs, docs / "bench") if args.out is None else (args.out, args.out)
    js.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: str(v) for k, v in vars(args).items() if k != "out"}, "paths": results}
    (js / "bench_dense_decode.json").write_text(
        json.dumps({**record, "refresh_seconds": refresh}, indent=1) + "\n"
    )
    (md / "bench_dense_decode.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
