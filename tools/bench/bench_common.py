"""What every benchmark table carries: the command, date, machine, GPU and versions."""

from __future__ import annotations

import contextlib
import platform
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch


def environment_lines() -> list[str]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    versions = [
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"numpy {np.__version__}",
    ]
    for name in ("torchdata", "zarr", "webdataset", "numcodecs"):
        with contextlib.suppress(PackageNotFoundError):
            versions.append(f"{name} {version(name)}")
    return [
        f"- command: `python {' '.join(sys.argv)}`",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.platform()}, {platform.machine()}, {torch.get_num_threads()} torch CPU threads; GPU: {gpu}",
        f"- versions: {', '.join(versions)}",
    ]


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def forever(iterable):
    """Iterate again and again without end: a list of batches, or a loader (one epoch a pass)."""
    while True:
        yield from iterable
