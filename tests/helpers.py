"""Shared test helpers: a tiny (untrained) codec checkpoint for a data file; an HTTP server."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from pipeline.sources.splits import DataConfig, NormStats
from ups.models.codec import Codec, CodecConfig, save_codec
from ups.models.decoder import DecoderConfig
from ups.models.encoder import EncoderConfig

TINY_CODEC = CodecConfig(
    EncoderConfig(patch=8, dim=32, depth=1, num_tokens=8, latent_dim=16),
    DecoderConfig(dim=32, depth=1),
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
