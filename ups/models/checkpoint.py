"""Checkpoints that carry their config, and refuse to load into a different one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.storage import atomic_path


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match what the caller expects."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write atomically: a reader never sees a half-written checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, kind: str) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` and check its ``kind``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt file
        raise CheckpointError(
            f"checkpoint {path} is not readable ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {path}: expected a '{kind}' checkpoint, found {found!r}")
    return payload


def config_diff(saved: Any, expected: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, as 'key: saved != expected'."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        out = []
        for key in sorted(set(saved) | set(expected)):
            out += config_diff(saved.get(key), expected.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == expected else [f"{prefix.rstrip('.')}: {saved!r} != {expected!r}"]


def require_match(saved: dict, expected: dict, what: str, path: str | Path) -> None:
    """Raise one CheckpointError listing every differing key."""
    diff = config_diff(saved, expected)
    if diff:
        raise CheckpointError(
            f"checkpoint {path}: {what} does not match (saved != expected): " + "; ".join(diff)
        )
