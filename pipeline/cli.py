"""One command-line convention for every tool.

``tool.py [--config FILE.yaml] [--key value | --key=value | key.sub=value ...]``: ``--key value``
is shorthand for the top-level ``key=value``; dashes in flag names become underscores. Values
are parsed as YAML. Unknown keys are rejected with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import TypeVar, get_type_hints

from pipeline.config import ConfigError, load_config

T = TypeVar("T")


def _describe(cls: type, prefix: str = "") -> list[str]:
    lines = []
    hints = get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            lines += _describe(type(value), f"{prefix}{f.name}.")
        else:
            tp = getattr(hints[f.name], "__name__", str(hints[f.name])).replace("typing.", "")
            lines.append(f"  {prefix}{f.name}: {tp} = {value!r}")
    return lines


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str = "") -> T:
    """Build a config dataclass from the command line; prints a clear error and exits 2 on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(
            description.strip()
            + "\n\nusage: [--config FILE.yaml] [key=value ...]\n\noptions (with defaults):"
        )
        print("\n".join(_describe(cls)))
        raise SystemExit(0)
    config_path, overrides = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    fail(f"flag {arg} needs a value")
                value, i = argv[i + 1], i + 1
            if name == "config":
                config_path = value
            else:
                overrides.append(f"{name.replace('-', '_')}={value}")
        elif "=" in arg:
            overrides.append(arg)
        else:
            fail(f"unexpected argument {arg!r}; expected --config FILE, --key value or key=value")
        i += 1
    try:
        return load_config(cls, config_path, overrides)
    except ConfigError as err:
        fail(str(err))


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
