"""Benchmark the query samplers and the query-set codec; print a markdown table and write it.

Throughput: snapshots/s of what build_shards does per snapshot for one epoch -- the sampling
distribution q from the fields, then one query set -- on CPU, and on CUDA when available.
Storage: bytes per snapshot-epoch of the zstd bitmask codec against the entropy bound
log2(C(N, k)) / 8.

    python tools/bench/bench_samplers.py --out docs/bench_samplers.md
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import environment_lines
from numcodecs import Zstd

from pipeline.formats.zarr import ZSTD_LEVEL
from pipeline.keys import snapshot_keys
from pipeline.query_codec import encode_sets, entropy_bound_bytes, query_slots
from pipeline.samplers import SAMPLER_KINDS, SamplerConfig, make_sampler


def demo_fields(batch: int, size: int, seed: int) -> torch.Tensor:
    """(batch, 1, size, size) float32: a third each of sharp fronts, smooth waves, white noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.arange(size, dtype=torch.float32) / size
    xx, yy = torch.meshgrid(x, x, indexing="ij")
    angle, shift = torch.rand(2, batch, 1, 1, generator=gen)
    slant = torch.cos(math.pi * angle) * xx + torch.sin(math.pi * angle) * yy
    front = torch.tanh(60 * (slant - shift))
    wave = torch.sin(2 * math.pi * (3 * slant + shift))
    noise = torch.randn(batch, size, size, generator=gen)
    kind = torch.arange(batch)[:, None, None] % 3
    return torch.where(kind == 0, front, torch.where(kind == 1, wave, noise))[:, None]


def snapshots_per_second(kind: str, fields: torch.Tensor, ratio: float, repeats: int) -> float:
    """Throughput of probabilities + one epoch's sample on fields' device (warmed up, synchronised)."""
    sampler = make_sampler(SamplerConfig(kind=kind))
    grid = tuple(fields.shape[2:])
    k = round(ratio * math.prod(grid))
    keys = snapshot_keys(0, range(len(fields)), 0, device=fields.device)

    def step() -> None:
        q = sampler.probabilities(fields, [False, False])
        sampler.sample(q, k, keys, grid)

    step()
    if fields.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if fields.is_cuda:
        torch.cuda.synchronize()
    return repeats * len(fields) / (time.perf_counter() - start)


def throughput_table(args: argparse.Namespace) -> list[str]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cpu_fields = demo_fields(args.batch, args.size, args.seed)
    lines = [
        f"### Throughput: {args.size}x{args.size}, 1 channel, batch {args.batch}, ratio {args.ratio}",
        "",
        "| sampler | " + " | ".join(f"{d.upper()} snapshots/s" for d in devices) + " |",
        "| --- |" + " ---: |" * len(devices),
    ]
    for kind in SAMPLER_KINDS:
        rates = [
            snapshots_per_second(kind, cpu_fields.to(d), args.ratio, args.repeats) for d in devices
        ]
        lines.append(f"| {kind} | " + " | ".join(f"{r:,.0f}" for r in rates) + " |")
    return lines


def zarr_bytes(indices: torch.Tensor, n_points: int, slot) -> float:
    """Mean bytes of one coded set once zarr's zstd has compressed it (the codes are fixed-size)."""
    rows = encode_sets(indices.sort(dim=1).values.cpu(), n_points, slot).numpy()
    return float(np.mean([len(Zstd(level=ZSTD_LEVEL).encode(row)) for row in rows]))


def codec_table(args: argparse.Namespace) -> list[str]:
    n = args.size * args.size
    fronts = demo_fields(3 * args.codec_sets, args.size, args.seed)[::3]  # the front fields
    lines = [
        f"### Query-set storage: N = {n}, bytes per snapshot-epoch (mean of {args.codec_sets} sets)",
        "",
        "The code (pipeline/query_codec.py) is fixed-size for an (N, k): the tars hold it as it is;",
        "zarr compresses it with zstd, which gains little.",
        "",
        "| ratio | k | entropy bound | code | coded (tars) | / bound | zarr, uniform | zarr, gradient | raw bitmask |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    keys = snapshot_keys(args.seed, range(len(fronts)), 0)
    for ratio in (0.02, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.75, 0.9):
        k = round(ratio * n)
        bound = entropy_bound_bytes(n, k)
        slot = query_slots(n, [k])[0]
        sizes = []
        for kind in ("uniform", "gradient"):
            sampler = make_sampler(SamplerConfig(kind=kind))
            q = sampler.probabilities(fronts, [False, False])
            sizes.append(zarr_bytes(sampler.sample(q, k, keys, (args.size, args.size)), n, slot))
        code = slot.code + (" (complement)" if slot.complement else "")
        lines.append(
            f"| {ratio} | {k} | {bound:,.0f} | {code} | {slot.nbytes:,} | "
            f"{slot.nbytes / bound:.3f} | {sizes[0]:,.0f} | {sizes[1]:,.0f} | {(n + 7) // 8:,} |"
        )
    return lines


def header() -> list[str]:
    return [
        "# Sampler benchmark",
        "",
        *environment_lines(),
        "- throughput = `probabilities` + one `sample` (one epoch) per snapshot, fields already on "
        "the device; CPU timings are for relative comparison only (docs/design.md, section 10)",
        "- storage: the per-epoch code of `pipeline.query_codec` (Elias-Fano or a bitmask, of the "
        "complement above N/2); the bound is log2(C(N, k)) / 8 bytes, for uniformly random sets",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="grid side (fields are size x size)")
    parser.add_argument("--batch", type=int, default=64, help="snapshots per batch")
    parser.add_argument("--ratio", type=float, default=0.1, help="k / N for the throughput draw")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed batches per sampler and device"
    )
    parser.add_argument(
        "--codec-sets", type=int, default=8, help="sets per ratio for the storage table"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/bench_samplers.md"))
    args = parser.parse_args()
    text = "\n".join([*header(), *throughput_table(args), "", *codec_table(args)]) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
