"""Checkpoints that carry their config, and refuse to load into a different one."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.config import config_diff
from pipeline.storage import atomic_path


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match what the caller expects."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically: a reader never sees a half-written checkpoint, and a failed write (a
    full disk) leaves the previous one as it was. Through a Python file, so that a full disk
    raises an OSError naming ``path``, not torch's RuntimeError."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: str | Path, kind: str) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` and check its ``kind``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found is None:  # not a pickle torch can read: unreadable
            lines = [line for line in str(err).splitlines() if line.strip()]
            detail = [line for line in lines if not line.startswith("Check the documentation")]
            raise CheckpointError(
                f"checkpoint {path} is not readable ({detail[-1].strip()})"
            ) from None
        raise CheckpointError(  # weights_only refused to import it: nothing was run
            f"checkpoint {path} refers to {found.group(1)}, not only tensors and plain "
            "containers; refused without running it (checkpoints load with weights_only=True)"
        ) from None
    except Exception as err:  # torch raises many types for a corrupt file
        raise CheckpointError(
            f"checkpoint {path} is not readable ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        got = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {path}: expected a '{kind}' checkpoint, found {got!r}")
    return payload


def require_match(saved: dict, expected: dict, what: str, path: str | Path) -> None:
    """Raise one CheckpointError listing every differing key."""
    diff = config_diff(saved, expected)
    if diff:
        raise CheckpointError(
            f"checkpoint {path}: {what} does not match (saved != expected): " + "; ".join(diff)
        )
