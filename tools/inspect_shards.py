"""Check a shard set and summarise it; optionally plot one snapshot's query sets.

python tools/inspect_shards.py PATH_OR_URL [--split train] [--plot OUT.png] [--snapshot I]
    [--epochs 0,1,2] [--timeout-s 30] [--retries 3] [--backoff-s 0.5]

Checks the manifest (schema version, required keys, consistent counts), the shape of one record
per split and format against it, and the sha256 of every file it lists; prints a summary
(sample_set_id, encoder, grid and channels, splits, epochs and k_e, bytes per format, query-set
bytes against the entropy bound). Exit status 0 when everything verifies, 1 with one line per
bad file or key otherwise, 2 with one ``error: ...`` line for bad arguments or a set that cannot
be opened or read (no manifest, a refused or edited one, a server that does not answer within
--timeout-s after the retries).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from pipeline.config import ConfigError
from pipeline.manifest import Manifest, read_manifest
from pipeline.records import ShardError
from pipeline.shards import ShardSet, open_shards
from pipeline.storage import RemoteConfig


def check_manifest(manifest: Manifest) -> list[str]:
    """Problems with the manifest's counts (its schema and types are checked on reading)."""
    problems = []
    if len(manifest.k_per_epoch) != manifest.epochs:
        problems.append(
            f"manifest.json: {len(manifest.k_per_epoch)} k_per_epoch entries for {manifest.epochs} epochs"
        )
    for split, entry in manifest.splits.items():
        counted = sum(s.count for s in entry.shards)
        expected = len(entry.trajectories) * entry.snapshots_per_trajectory
        if not counted == entry.num_snapshots == expected:
            problems.append(
                f"manifest.json: split '{split}' counts disagree (shards {counted}, "
                f"num_snapshots {entry.num_snapshots}, trajectories x steps {expected})"
            )
        for shard in entry.shards:
            if "wds" in manifest.formats and shard.tar not in manifest.files:
                problems.append(f"manifest.json: {shard.tar} is not among the listed files")
    return problems


def check_record_shapes(
    location: str, manifest: Manifest, remote: RemoteConfig | None = None
) -> list[str]:
    """Read the first shard of every split in every format and compare its arrays to the
    record schema the manifest implies."""
    expected = manifest.record_schema()
    problems = []
    for split, entry in manifest.splits.items():
        if not entry.shards:
            continue
        for fmt in manifest.formats:
            try:
                block = open_shards(location, split, fmt, remote).read_shard(0)
            except ShardError as err:
                problems.append(str(err))
                continue
            arrays = block.arrays()
            for name, (shape, dtype) in expected.items():
                got = arrays.get(name)
                if got is None or got.shape[1:] != shape or got.dtype != np.dtype(dtype):
                    found = "absent" if got is None else f"{got.shape[1:]} {got.dtype}"
                    problems.append(
                        f"{location}: {fmt} '{split}' shard 0: '{name}' is {found}, the manifest implies {shape} {dtype}"
                    )
    return problems


def _mb(manifest: Manifest, prefix: str) -> tuple[float, int]:
    entries = [v for k, v in manifest.files.items() if k.startswith(prefix)]
    return sum(v.bytes for v in entries) / 1e6, len(entries)


def summary(shards: ShardSet) -> str:
    m = shards.manifest
    data, cfg = m.data, m.config
    n = m.num_points
    lines = [
        f"shard set      {shards.location}",
        f"schema         version {m.schema_version}, {m.tool}, created {m.created}",
        f"sample_set_id  {m.sample_set_id}",
        f"manifest       id {shards.manifest_id}",
    ]
    enc, lat = m.encoder, m.latent
    if enc is None or lat is None:
        lines.append("encoder        none (field-only shards)")
    else:
        lines.append(
            f"encoder        {enc.path} (sha256 {enc.sha256[:16]}), latent {lat.tokens} x {lat.dim} {lat.dtype}"
        )
    grid = "x".join(str(g) for g in data.grid)
    lines += [
        f"data           {data.path} (sha256 {data.sha256[:16]})",
        f"grid           {grid} ({len(data.grid)}D, N={n}), channels {data.channels}, periodic {data.periodic}, dt {data.dt}",
    ]
    sampler = cfg["sampler"]
    lines.append(
        f"sampler        {sampler['kind']} (alpha {sampler['alpha']}, beta {sampler['beta']}), "
        f"schedule {cfg['schedule']['kind']}, seed {cfg['seed']}"
    )
    ks = m.k_per_epoch
    ratios = " ".join(f"{k / n:.2f}" for k in ks)
    lines.append(f"epochs         {m.epochs}, k_e {ks}")
    lines.append(f"               k_e / N {ratios}")
    for split, entry in m.splits.items():
        lines.append(
            f"split {split:<8} {len(entry.trajectories)} trajectories x {entry.snapshots_per_trajectory} "
            f"snapshots = {entry.num_snapshots} snapshots in {len(entry.shards)} shards"
        )
    for fmt, prefix in (("zarr", "zarr/"), ("wds", "wds/")):
        if fmt in m.formats:
            mb, count = _mb(m, prefix)
            lines.append(f"format {fmt:<7} {mb:.2f} MB in {count} files")
    q = m.query_bytes
    bound = q["entropy_bound"]
    stored = []
    for fmt in ("zarr", "tar"):
        if fmt in q:
            ratio = f" = {q[fmt] / bound:.2f}x" if bound > 0 else ""
            stored.append(f"{fmt} {q[fmt]:.1f}{ratio}")
    lines.append(
        f"query sets     bytes per snapshot-epoch: {', '.join(stored)} the entropy bound {bound:.1f}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "location", help="shard set directory or URL (file://, http(s)://, s3://, ...)"
    )
    parser.add_argument("--split", default="train", help="split to plot (default: train)")
    parser.add_argument(
        "--format", default="auto", choices=("auto", "zarr", "wds"), help="format to plot from"
    )
    parser.add_argument(
        "--plot", metavar="OUT.png", help="write a PNG of one snapshot's query sets and q"
    )
    parser.add_argument(
        "--snapshot", type=int, default=0, help="snapshot index within the split (default: 0)"
    )
    parser.add_argument(
        "--epochs", help="comma-separated epochs to plot (default: the first three)"
    )
    defaults = RemoteConfig()
    remote = parser.add_argument_group("remote sets (http(s)://, s3://, ...)")
    remote.add_argument(
        "--timeout-s",
        type=float,
        default=defaults.timeout_s,
        help=f"seconds without an answer before a request is abandoned (default: {defaults.timeout_s:g})",
    )
    remote.add_argument(
        "--retries",
        type=int,
        default=defaults.retries,
        help=f"tries after the first failed one (default: {defaults.retries})",
    )
    remote.add_argument(
        "--backoff-s",
        type=float,
        default=defaults.backoff_s,
        help=f"wait before the first retry, doubling (default: {defaults.backoff_s:g})",
    )
    args = parser.parse_args(argv)
    try:
        args.remote = RemoteConfig(args.timeout_s, args.retries, args.backoff_s)
    except ConfigError as err:
        parser.error(str(err).replace("option 'loader.remote.", "option '--").replace("_", "-"))
    if args.epochs is not None:
        try:
            args.epochs = [int(e) for e in args.epochs.split(",") if e.strip()]
        except ValueError:
            parser.error(f"--epochs: expected comma-separated integers, got {args.epochs!r}")
        if not args.epochs:
            parser.error("--epochs: expected at least one epoch")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return inspect(args)
    except ShardError as err:  # a set that cannot be opened or read: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2


def inspect(args: argparse.Namespace) -> int:
    location = str(args.location).rstrip("/")
    manifest = read_manifest(location, args.remote)
    problems = check_manifest(manifest)
    if problems:
        print("\n".join(f"BAD  {p}" for p in problems), file=sys.stderr)
        return 1
    shards = open_shards(location, args.split, args.format, args.remote)
    print(summary(shards))
    problems = shards.verify()
    if not problems:
        problems = check_record_shapes(location, manifest, args.remote)
    if problems:
        print(f"verify         FAILED: {len(problems)} problem(s)")
        print("\n".join(f"BAD  {p}" for p in problems), file=sys.stderr)
        return 1
    print(f"verify         OK: {len(manifest.files)} files match their sha256")
    if args.plot:
        epochs = list(range(min(3, shards.epochs))) if args.epochs is None else args.epochs
        bad = [e for e in epochs if not 0 <= e < shards.epochs]
        if bad:
            print(
                f"error: --epochs {bad}: the set has query sets for epochs 0..{shards.epochs - 1}",
                file=sys.stderr,
            )
            return 2
        if not 0 <= args.snapshot < len(shards):
            print(
                f"error: --snapshot {args.snapshot}: split '{args.split}' has snapshots 0..{len(shards) - 1}",
                file=sys.stderr,
            )
            return 2
        from pipeline.plots import plot_query_sets

        out = plot_query_sets(shards, args.snapshot, epochs, args.plot)
        print(f"plot           {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
