"""Build a shard set: encode full grids, importance maps, every epoch's query sets -> zarr / tars.

ups-build-shards --config burgers1d_shards [key=value ...]     (a shipped config, by name)
ups-build-shards --config my_build.yaml [key=value ...]         (or a YAML path)
    (in a checkout also python tools/build_shards.py --config configs/burgers1d_shards.yaml ...)
    e.g. data.path=data/burgers1d.h5 out=shards/b format=both encoder=runs/codec/codec.pt
         epochs=20 sampler.kind=gradient schedule.kind=cosine seed=0
Several processes: --rank R --world-size W (or torchrun's environment, e.g.
torchrun --nproc_per_node 4 -m ups.cli.build_shards ...); rank 0 writes the manifest.
"""

from __future__ import annotations

import sys

from pipeline.build import STAGES, BuildConfig, run_build
from pipeline.cli import fail, parse_config
from pipeline.config import ConfigError
from pipeline.records import ShardError
from pipeline.sources.pdebench import DataError
from ups.cli import CONFIGS
from ups.models.checkpoint import CheckpointError
from ups.models.codec import load_encoder


def print_summary(summary: dict) -> None:
    seconds = summary.get("seconds", {})
    snaps = summary.get("snapshots", 0)
    print(
        f"rank {summary.get('rank', 0)}/{summary.get('world_size', 1)} on {summary.get('device', '-')}: "
        f"{summary.get('shards', 0)} shards ({summary.get('skipped', 0)} already done), {snaps} snapshots built"
    )
    if seconds:
        print(f"{'stage':<12}{'seconds':>10}{'snapshots/s':>14}")
        for stage in STAGES:
            if stage in seconds:
                rate = snaps / seconds[stage] if seconds[stage] > 0 else float("inf")
                print(f"{stage:<12}{seconds[stage]:>10.2f}{rate:>14.1f}")
        waits = [f"{k} {seconds[k]:.2f} s" for k in ("read wait", "write wait") if k in seconds]
        if waits:
            print("of the total, the GPU stages waited: " + ", ".join(waits))
        around = [
            f"{k} {seconds[k]:.2f} s"
            for k in ("setup", "start", "wait", "finalize")
            if k in seconds
        ]
        if around:
            print("around the stages: " + ", ".join(around))
    manifest = summary.get("manifest")
    if manifest:
        for fmt, prefix in (("zarr", "zarr/"), ("wds", "wds/")):
            if fmt in manifest.formats:
                total = sum(v.bytes for k, v in manifest.files.items() if k.startswith(prefix))
                print(f"{fmt:<5} {total / 1e6:10.2f} MB")
        q = manifest.query_bytes
        stored = ", ".join(f"{fmt} {q[fmt]:.0f}" for fmt in ("zarr", "tar") if fmt in q)
        print(
            f"query sets, bytes per snapshot-epoch: {stored}; entropy bound {q['entropy_bound']:.0f}"
        )
        print(f"sample_set_id {manifest.sample_set_id}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BuildConfig, argv, __doc__, CONFIGS)
    try:
        summary = run_build(cfg, load_encoder=load_encoder)
    except (ShardError, ConfigError, DataError, CheckpointError) as err:
        fail(str(err))
    except OSError as err:  # a full disk, a read-only directory: finished shards are kept
        fail(
            f"{err.filename or cfg.out}: {err.strerror or err}; the build stopped unfinished, "
            "rerun the same command to resume it"
        )
    except KeyboardInterrupt:
        print(
            "interrupted; finished shards are kept: rerun the same command to resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    print_summary(summary)


if __name__ == "__main__":
    main()
