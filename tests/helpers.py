"""Shared test helpers: running the tools, HDF5 files in PDEBench's three layouts, a tiny
(untrained) codec checkpoint for a data file, an HTTP server, the loader stream's preparations."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.sources.splits import DataConfig, NormStats
from pipeline.stream import ShardStream
from ups.models.codec import Codec, CodecConfig, save_codec
from ups.models.decoder import DecoderConfig
from ups.models.encoder import EncoderConfig

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "tools" / "build_shards.py"
TRAIN = ROOT / "tools" / "train.py"
INSPECT = ROOT / "tools" / "inspect_shards.py"
# One torch thread per process: these tests run several processes on a 2-core machine, where
# OpenMP threads of concurrent processes spin against each other (a 100x slowdown was measured).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_tool(script: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a tool as a user does, in its own process; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def manifest_of(root: Path) -> dict:
    return json.loads((Path(root) / "manifest.json").read_text())


# HDF5 files in PDEBench's three layouts, of random values
RNG = np.random.default_rng(0)


def write_1d(path, n=3, t=5, x=16, t_entries=None):
    with h5py.File(path, "w") as f:
        f["tensor"] = RNG.normal(size=(n, t, x)).astype(np.float32)
        f["x-coordinate"] = np.linspace(0, 1, x, dtype=np.float32)
        f["t-coordinate"] = np.arange(t_entries or t + 1, dtype=np.float32) * 0.05
    return path


def write_cfd(path, n=2, t=4, h=8, w=6):
    with h5py.File(path, "w") as f:
        for key in ("density", "pressure", "Vx", "Vy"):
            f[key] = RNG.normal(size=(n, t, h, w)).astype(np.float32)
        f["x-coordinate"] = np.linspace(0, 1, h, dtype=np.float32)
        f["y-coordinate"] = np.linspace(0, 1, w, dtype=np.float32)
        f["t-coordinate"] = np.arange(t + 1, dtype=np.float32) * 0.01
    return path


def write_grouped(path, n=3, t=4, h=8, w=8, c=2):
    with h5py.File(path, "w") as f:
        for i in range(n):
            g = f.create_group(f"{i:04d}")
            g["data"] = RNG.normal(size=(t, h, w, c)).astype(np.float32)
            g["grid/x"] = np.linspace(0, 1, h, dtype=np.float32)
            g["grid/y"] = np.linspace(0, 1, w, dtype=np.float32)
            g["grid/t"] = np.arange(t, dtype=np.float32) * 0.5
    return path


TINY_CODEC = CodecConfig(
    EncoderConfig(patch=8, dim=32, depth=1, num_tokens=8, latent_dim=16),
    DecoderConfig(dim=32, depth=1),
)


def record_preparations(monkeypatch) -> list[tuple[int, int, int]]:
    """(shard, epoch, the epoch the stream was in) of every shard the loader's stream prepares
    for an epoch from now on, in the order it asks; streams in this process (threads) only."""
    prepared: list[tuple[int, int, int]] = []
    original = ShardStream._prepare

    def recording(self, shard, epoch):
        prepared.append((shard, epoch, self.epoch))
        return original(self, shard, epoch)

    monkeypatch.setattr(ShardStream, "_prepare", recording)
    return prepared


def groups_of_shards(stream: ShardStream, epochs) -> Counter:
    """How often each (shard, epoch) is in a group of the stream's partitions: once, or twice
    where two partitions split the shard."""
    return Counter(
        (shard, epoch)
        for epoch in epochs
        for p in range(stream.partitions)
        for group in stream._groups(epoch, p)
        for shard, _, _ in group
    )


def tiny_codec_checkpoint(
    data_path: str | Path, out: str | Path, grid: tuple[int, ...] | None = None, seed: int = 0
) -> Path:
    """Save an untrained tiny codec for ``data_path`` (train-split norm stats) at ``out``.

    ``grid`` builds it for another grid than the data's, to test the mismatch check. Untrained
    weights are fine for format tests: the latents are still a deterministic function of the fields.
    """
    source, splits = DataConfig(path=str(data_path)).open()
    norm = NormStats.from_trajectories(source, splits["train"], progress=False)
    info = source.info if grid is None else dataclasses.replace(source.info, grid=tuple(grid))
    torch.manual_seed(seed)
    save_codec(out, Codec(TINY_CODEC, info), norm)
    return Path(out)


@contextlib.contextmanager
def serve_directory(directory: Path):
    """Serve ``directory`` over HTTP on 127.0.0.1 (a real server in a thread); yields the base URL."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class HostileServer:
    """A real HTTP server on 127.0.0.1 serving a directory, with the misbehaviours of real ones:
    no directory listings (``refuse_dirs``: 404 or 403 to every directory URL), requests that
    are accepted and then never answered (``stall(path)``), errors (``fail(path)``: an HTTP
    status to answer with, or None), answers of its own making (``body(path)``: the chunks to
    send, with no length given, or None) and a death mid-run (:meth:`stop`). ``requests``
    records every path asked for, ``sent`` the bytes of the answers ``body`` made."""

    def __init__(
        self, directory: Path, refuse_dirs: int | None = 404, stall=None, fail=None, body=None
    ):
        self.requests: list[str] = []
        self.sent = 0
        self.release = threading.Event()  # set on stop: stalled handlers return
        server = self

        class Handler(QuietHandler):
            def _hostile(self) -> bool:
                path = self.path.split("?", 1)[0]
                server.requests.append(path)
                if stall is not None and stall(path):
                    server.release.wait(120)
                    self.close_connection = True
                    return True
                status = None if fail is None else fail(path)
                if status is not None:
                    self.send_error(status)
                    return True
                if refuse_dirs and (path.endswith("/") or Path(self.translate_path(path)).is_dir()):
                    self.send_error(refuse_dirs)
                    return True
                return False

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                chunks = None if body is None else body(path)
                if chunks is None:
                    if not self._hostile():
                        super().do_GET()
                    return
                server.requests.append(path)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()  # no Content-Length: the answer ends when the server closes
                self.close_connection = True
                try:
                    for chunk in chunks:
                        self.wfile.write(chunk)
                        server.sent += len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the reader hung up

            def do_HEAD(self) -> None:
                if not self._hostile():
                    super().do_HEAD()

        self._server = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(directory))
        )
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._stopped = False

    def stop(self) -> None:
        """Shut the server down: later connections are refused."""
        if not self._stopped:
            self._stopped = True
            self.release.set()
            self._server.shutdown()
            self._server.server_close()


@contextlib.contextmanager
def serve_hostile(directory: Path, refuse_dirs: int | None = 404, stall=None, fail=None, body=None):
    """A :class:`HostileServer` for the block; stopped at its end."""
    server = HostileServer(directory, refuse_dirs, stall, fail, body)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def silent_server():
    """A TCP server on 127.0.0.1 that accepts every connection and never answers; yields its
    http:// URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    done = threading.Event()

    listener.settimeout(0.2)

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        listener.close()
        for conn in accepted:
            conn.close()
