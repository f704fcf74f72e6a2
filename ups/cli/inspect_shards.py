"""Check a shard set and summarise it; optionally plot one snapshot's query sets.

ups-inspect PATH_OR_URL [--split train] [--layer latest] [--plot OUT.png]
    [--snapshot I] [--epochs 0,1,2] [--timeout-s 30] [--retries 3] [--backoff-s 0.5]
(in a checkout also python tools/inspect_shards.py ...)

Checks the manifest (schema version, required keys, consistent counts), the shape of one record
per split and format against it, and the sha256 of every file it lists; prints a summary
(sample_set_id, encoder, grid and channels, splits, epochs and k_e, bytes per format, query-set
bytes against the entropy bound). Exit status 0 when everything verifies, 1 with one line per
bad file or key otherwise, 2 with one ``error: ...`` line for bad arguments or a set that cannot
be opened or read (no manifest, a refused or edited one, a server that does not answer within
--timeout-s after the retries).

Layers of adaptive query sets (pipeline/layers.py, written by ups-refresh) hold
train query sets only: with --split train (the default) the summary lists the chain of layers
read, oldest first (id, parent, epochs [a, b), k_e, the model and error they come from, the
importance options, the creation time where the record keeps one, the size) and which source
each epoch's sets come from; their files are verified and their first shard's shapes checked
like the set's. --layer picks the chain:
"latest" (default: the set's only chain; none behind a URL, which cannot be listed), "none"
(the set's own query sets only), or a layer id or a prefix of 8+ characters.

--plot draws the effective query sets of --epochs (an epoch a layer covers is labelled with
it); by default the first three epochs and the first epoch of every layer read. Every layer
giving the sets of a plotted epoch adds a row: for the snapshot, the model's per-point error,
the layer's q (q_error) next to the gradient sampler's q of the same alpha on the normalised
fields (q_gradient), and the points drawn for the first plotted epoch it gives.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from pipeline.config import ConfigError
from pipeline.layers import LayerReader
from pipeline.manifest import Manifest, read_manifest
from pipeline.records import ShardError, layer_schema, trajectory_ids
from pipeline.shards import ShardSet, open_shards
from pipeline.storage import RemoteConfig, is_url


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
                block = open_shards(location, split, fmt, remote, layer=None).read_shard(0)
            except ShardError as err:
                problems.append(str(err))
                continue
            where = f"{location}: {fmt} '{split}' shard 0"
            problems += _shape_problems(block.arrays(), expected, where, "the manifest")
    return problems


def _shape_problems(arrays: dict, expected: dict, where: str, source: str) -> list[str]:
    """One line per array of ``expected`` (name -> (shape, dtype) per snapshot) that ``arrays``
    lacks or holds with another shape or dtype."""
    problems = []
    for name, (shape, dtype) in expected.items():
        got = arrays.get(name)
        if got is None or got.shape[1:] != shape or got.dtype != np.dtype(dtype):
            found = "absent" if got is None else f"{got.shape[1:]} {got.dtype}"
            problems.append(f"{where}: '{name}' is {found}, {source} implies {shape} {dtype}")
    return problems


def check_layer_shapes(shards: ShardSet) -> list[str]:
    """Read the first shard of every layer read, in every format it has, and compare its arrays
    to the layer record schema."""
    m = shards.manifest
    if not shards.shards:
        return []
    shard = shards.shards[0]
    expected_ids = trajectory_ids(shard.trajectories, shards.steps)
    problems = []
    for layer in shards.layers:
        record = layer.record
        expected = layer_schema(tuple(m.data.grid), record.k_per_epoch)
        for fmt in record.formats:
            try:
                reader = LayerReader(shards.location, record, m, fmt, shards.remote)
                arrays = reader.read(shard, expected_ids).arrays()
            except ShardError as err:
                problems.append(str(err))
                continue
            where = f"{layer.location}: {fmt} shard 0"
            problems += _shape_problems(arrays, expected, where, "the layer")
    return problems


def _mb(manifest: Manifest, prefix: str) -> tuple[float, int]:
    entries = [v for k, v in manifest.files.items() if k.startswith(prefix)]
    return sum(v.bytes for v in entries) / 1e6, len(entries)


def _short(layer_id: str) -> str:
    return f"{layer_id[:8]}..."


def _ks(ks: list[int]) -> str:
    return str(ks[0]) if min(ks) == max(ks) else f"{ks[0]}..{ks[-1]}"


def epoch_sources(shards: ShardSet) -> str:
    """Which source each epoch's sets come from, runs of epochs joined: "0: base, 1-2: layer
    09dd75df..., 3: base"."""
    runs: list[tuple[int, int, str]] = []
    for epoch in range(shards.epochs):
        layer = shards.layer_of(epoch)
        source = "base" if layer is None else f"layer {_short(layer.record.id)}"
        if runs and runs[-1][2] == source:
            runs[-1] = (runs[-1][0], epoch, source)
        else:
            runs.append((epoch, epoch, source))
    return ", ".join(f"{a}: {s}" if a == b else f"{a}-{b}: {s}" for a, b, s in runs)


def layer_lines(shards: ShardSet, option: str | None) -> list[str]:
    """The summary's lines on the layers of adaptive sets read (:attr:`ShardSet.layers`)."""
    if shards.split != "train":
        return [
            f"layers         none (layers hold train query sets; this is split '{shards.split}')"
        ]
    if option is None:
        return ["layers         none read (--layer none: the set's own query sets only)"]
    if not shards.layers:
        if option == "latest" and is_url(shards.location):
            return [
                "layers         none found (a set behind a URL cannot be listed; name one with "
                "--layer ID)"
            ]
        return ["layers         none"]
    lines = [f"layers         {len(shards.layers)} read (--layer {option}), oldest first"]
    for number, layer in enumerate(shards.layers, 1):
        r = layer.record
        parent = "base" if r.parent is None else r.parent[:16]
        model = r.model
        sha = str(model.get("sha256", ""))[:12]
        error = dict(r.error)
        kind = error.pop("kind", "?")
        params = ", ".join(f"{k} {v}" for k, v in sorted(error.items()))
        imp = r.importance
        mb = sum(f.bytes for f in r.files.values()) / 1e6
        lines += [
            f"layer {number:<8} {r.id[:16]}, parent {parent}, epochs [{r.epochs[0]}, "
            f"{r.epochs[1]}), k_e {_ks(r.k_per_epoch)}",
            f"               model {model.get('stage')} step {model.get('step')} (sha256 {sha}), "
            f"error {kind}" + (f" ({params})" if params else ""),
            f"               importance power {imp.power:g}, alpha {imp.alpha:g}, mix "
            f"{imp.mix:g}; {mb:.2f} MB in {len(r.files)} files",
        ]
    lines.append(f"epoch sources  {epoch_sources(shards)}")
    return lines


def summary(shards: ShardSet, layer: str | None = "latest") -> str:
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
    lines += layer_lines(shards, layer)
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
        "--layer",
        default="latest",
        help="layers of adaptive sets to read (train split): latest (default), none (the set's "
        "own sets only), or a layer id or a prefix of 8+ characters",
    )
    parser.add_argument(
        "--plot", metavar="OUT.png", help="write a PNG of one snapshot's query sets and q"
    )
    parser.add_argument(
        "--snapshot", type=int, default=0, help="snapshot index within the split (default: 0)"
    )
    parser.add_argument(
        "--epochs",
        help="comma-separated epochs to plot (default: the first three and the first epoch of "
        "every layer read)",
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
    if args.layer == "none":
        args.layer = None
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
    shards = open_shards(location, args.split, args.format, args.remote, layer=args.layer)
    print(summary(shards, args.layer))
    problems = shards.verify()
    if not problems:
        problems = check_record_shapes(location, manifest, args.remote)
        problems += check_layer_shapes(shards)
    if problems:
        print(f"verify         FAILED: {len(problems)} problem(s)")
        print("\n".join(f"BAD  {p}" for p in problems), file=sys.stderr)
        return 1
    layer_files = sum(len(layer.record.files) for layer in shards.layers)
    counts = ""
    if shards.layers:
        counts = (
            f" ({len(manifest.files)} of the set, {layer_files} of {len(shards.layers)} "
            f"layer{'s' if len(shards.layers) > 1 else ''})"
        )
    print(
        f"verify         OK: {len(manifest.files) + layer_files} files match their sha256{counts}"
    )
    if args.plot:
        epochs = args.epochs
        if epochs is None:  # the first three, and where each layer read begins
            first = [layer.record.epochs[0] for layer in shards.layers]
            epochs = sorted({*range(min(3, shards.epochs)), *first})
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
        from pipeline.plots import layer_epochs, plot_query_sets

        out = plot_query_sets(shards, args.snapshot, epochs, args.plot)
        rows = [
            f"layer {_short(layer.record.id)} (epoch {epoch})"
            for layer, epoch in layer_epochs(shards, epochs)
        ]
        print(
            f"plot           {out}, epochs {epochs}"
            + (f"; rows for {', '.join(rows)}" if rows else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
