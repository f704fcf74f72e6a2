"""tools/inspect_shards.py on layers of adaptive query sets: the summary lists the chain read and
each epoch's source, --layer picks it, --plot adds a row per layer (error, q_error next to
q_gradient, the drawn points). Real data: a tiny codec trained on generated fields, a layer
written from its checkpoint by tools/refresh_queries.py."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import INSPECT, ROOT, run_tool
from test_train import build, config  # a tiny model on the CPU, small shard sets

from pipeline.plots import gradient_q, layer_epochs, plot_layer
from pipeline.shards import open_shards
from pipeline.sources.generate import generate
from ups.training.refresh import RefreshConfig, refresh_from_checkpoint
from ups.training.train import train

# each module fixture trains a codec and refreshes a layer: the fast lane leaves them out
pytestmark = pytest.mark.slow

REFRESH = ROOT / "tools" / "refresh_queries.py"
_spec = importlib.util.spec_from_file_location("inspect_cli", INSPECT)
inspect_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(inspect_cli)


def refresh(shards: Path, checkpoint: Path, epochs: str) -> str:
    """Write a layer with the tool, as a user does; returns its id."""
    result = run_tool(
        REFRESH,
        shards,
        "--checkpoint",
        checkpoint,
        "--epochs",
        epochs,
        "device=cpu",
        "progress=false",
    )
    assert result.returncode == 0, result.stderr
    layer_id = result.stdout.split()[1]
    assert (shards / "layers" / layer_id / "layer.json").is_file()
    return layer_id


def inspect(*args: object, capsys) -> tuple[int, str, str]:
    """tools/inspect_shards.py in this process (the plots and summaries are what is tested)."""
    code = inspect_cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000  # axes, lines or images and markers, not an empty canvas
    return struct.unpack(">II", data[16:24])  # IHDR: width, height


@pytest.fixture(scope="module")
def layered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Burgers fields, gradient-sampled over 4 epochs -> a codec trained 2 epochs -> a layer of
    epochs [1, 3) from its checkpoint."""
    root = tmp_path_factory.mktemp("layered")
    data = generate(
        "burgers1d", root / "b.h5", trajectories=8, steps=6, resolution=64, seed=1, progress=False
    )
    shards = build(data, root / "fields", epochs=4, kind="gradient", ratio=0.25)
    run = root / "codec"
    train(config("stage=codec", f"shards={shards}", f"out={run}", "epochs=2", "batch_size=8"))
    checkpoint = run / "checkpoint.pt"
    layer_id = refresh(shards, checkpoint, "1:3")
    return {"root": root, "shards": shards, "checkpoint": checkpoint, "layer": layer_id}


def test_summary_lists_the_layer_and_plot_adds_its_row(layered, tmp_path, capsys):
    shards, layer_id = layered["shards"], layered["layer"]
    record = json.loads((shards / "layers" / layer_id / "layer.json").read_text())
    manifest = json.loads((shards / "manifest.json").read_text())
    png = tmp_path / "out.png"
    result = run_tool(INSPECT, shards, "--plot", png)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "layers         1 read (--layer latest)" in out
    assert f"layer 1        {layer_id[:16]}, parent base, epochs [1, 3)" in out
    assert (
        f"model codec step {record['model']['step']} (sha256 {record['model']['sha256'][:12]})"
        in out
    )
    assert "error codec-reconstruction" in out and "importance power 0.5, alpha 0.3, mix 0" in out
    assert f"epoch sources  0: base, 1-2: layer {layer_id[:8]}..., 3: base" in out
    set_files, layer_files = len(manifest["files"]), len(record["files"])
    assert (
        f"verify         OK: {set_files + layer_files} files match their sha256 "
        f"({set_files} of the set, {layer_files} of 1 layer)"
    ) in out
    assert f"rows for layer {layer_id[:8]}... (epoch 1)" in out
    with_layer = png_size(png)
    # the same plot from the base set only: no layer row, so a shorter picture
    base_png = tmp_path / "base.png"
    code, out, err = inspect(shards, "--layer", "none", "--plot", base_png, capsys=capsys)
    assert code == 0, err
    assert with_layer[1] > png_size(base_png)[1]


def test_layer_option_picks_the_chain(layered, capsys):
    shards, layer_id = layered["shards"], layered["layer"]
    code, out, err = inspect(shards, "--layer", "none", capsys=capsys)
    assert code == 0, err
    assert "layers         none read (--layer none" in out
    assert layer_id[:16] not in out and "epoch sources" not in out
    assert "of the set" not in out  # only the set's files verified
    code, out, err = inspect(shards, "--layer", layer_id[:10], capsys=capsys)
    assert code == 0, err
    assert f"layer 1        {layer_id[:16]}" in out
    code, out, err = inspect(shards, "--split", "val", capsys=capsys)
    assert code == 0, err
    assert "layers         none (layers hold train query sets; this is split 'val')" in out
    code, out, err = inspect(shards, "--layer", "0" * 12, capsys=capsys)
    assert code == 2 and out.strip() == ""
    assert err.startswith("error: ") and "no layers match" in err


def test_layer_panels_hold_the_layers_arrays(layered, tmp_path):
    """q_gradient is the gradient sampler's q on the normalised fields: for this gradient-built
    set (alpha 0.3) the base set's own q; the drawn points are the layer's epoch's."""
    shards = open_shards(layered["shards"])
    assert shards.layer_ids == [layered["layer"]]
    record = shards.snapshot(5)
    np.testing.assert_allclose(
        gradient_q(shards, record["fields"], 0.3), record["importance"], rtol=1e-5, atol=1e-9
    )
    assert [(layer.record.id, e) for layer, e in layer_epochs(shards, [0, 1, 2, 3])] == [
        (layered["layer"], 1)
    ]
    assert layer_epochs(shards, [0, 3]) == []
    assert png_size(plot_layer(shards, 5, 2, tmp_path / "layer.png"))[0] > 0
    with pytest.raises(ValueError, match="base set's query sets"):
        plot_layer(shards, 5, 0, tmp_path / "none.png")


def test_a_chain_of_two_layers(layered, tmp_path, capsys):
    """A second layer on the first ([2, 4)): the newest covering an epoch gives its sets; --layer
    with the first's id reads the first only; the plot gets a row per layer."""
    shards = tmp_path / "fields"
    shutil.copytree(layered["shards"], shards)
    first = layered["layer"]
    second = refresh_from_checkpoint(
        RefreshConfig(
            shards=str(shards),
            checkpoint=str(layered["checkpoint"]),
            epochs="2:4",
            device="cpu",
            progress=False,
        )
    )
    png = tmp_path / "chain.png"
    code, out, err = inspect(shards, "--plot", png, capsys=capsys)
    assert code == 0, err
    assert "layers         2 read (--layer latest), oldest first" in out
    assert f"layer 2        {second[:16]}, parent {first[:16]}, epochs [2, 4)" in out
    sources = f"epoch sources  0: base, 1: layer {first[:8]}..., 2-3: layer {second[:8]}..."
    assert sources in out
    assert "of 2 layers)" in out
    assert f"rows for layer {first[:8]}... (epoch 1), layer {second[:8]}... (epoch 2)" in out
    png_size(png)
    code, out, err = inspect(shards, "--layer", first, capsys=capsys)
    assert code == 0, err
    assert f"epoch sources  0: base, 1-2: layer {first[:8]}..., 3: base" in out
    assert second[:16] not in out


def test_inspect_plots_a_2d_layer(ns_file, tmp_path):
    """A 32x32 field-only set, a codec trained one epoch, a layer of epochs [0, 2): images of the
    error, q_error and q_gradient, and the points scattered on the field."""
    shards = build(ns_file, tmp_path / "ns", epochs=3, kind="uniform", ratio=0.2)
    run = tmp_path / "codec"
    train(config("stage=codec", f"shards={shards}", f"out={run}", "epochs=1", "batch_size=8"))
    layer_id = refresh(shards, run / "checkpoint.pt", "0:2")
    png = tmp_path / "ns.png"
    result = run_tool(INSPECT, shards, "--plot", png, "--snapshot", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "32x32 (2D, N=1024)" in out
    assert f"layer 1        {layer_id[:16]}, parent base, epochs [0, 2)" in out
    assert f"epoch sources  0-1: layer {layer_id[:8]}..., 2: base" in out
    assert f"rows for layer {layer_id[:8]}... (epoch 0)" in out
    width, height = png_size(png)
    assert width > 1000 and height > 600  # four 2D panels across, two rows
