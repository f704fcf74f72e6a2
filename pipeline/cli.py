"""One command-line convention for every tool.

``tool.py [--config FILE.yaml] [--key value | --key=value | key.sub=value ...]``: ``--key value``
is shorthand for the top-level ``key=value``; dashes in flag names become underscores. Values
are parsed as YAML. Unknown keys are rejected with the list of valid ones.

``--config`` takes a YAML path, or, where the caller names a package of shipped configs
(``config_package``), the name of one of its ``*.yaml`` files: ``--config burgers1d_codec`` or
``--config burgers1d_codec.yaml``. An existing file always wins; a name with a directory part is
only ever a path (see :func:`resolve_config`). pipeline ships no configs itself: the package is
the caller's (ups's mains pass ``ups.configs``), so this module imports nothing of it.

``--help`` lists every option with its type, default and a one-line description. Descriptions
are the config dataclasses' own comments: a trailing ``# comment`` on a field, or comment lines
directly above it. Choices come from ``Literal[...]`` types, or from a field's
``metadata={"choices": ...}`` where the dataclass validates a plain ``str`` itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.resources
import inspect
import io
import os
import sys
import textwrap
import tokenize
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, Union, get_args, get_origin, get_type_hints

from pipeline.config import ConfigError, ConfigT, load_config

HELP_WIDTH = 100


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the source of dataclass ``cls`` (empty when it has no source).

    A field's comment is the comment lines directly above it (no blank line between) followed by
    the comments inside its own statement, ``# `` stripped, joined by spaces.
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    # (column, text) of the comment-only lines since the last statement
    above: list[tuple[int, str]] = []
    statement: list[tokenize.TokenInfo] = []  # tokens of the logical line being read
    level = 0
    skip = (tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.ENCODING)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.INDENT:
                level += 1
            elif tok.type == tokenize.DEDENT:
                level -= 1
            if tok.type == tokenize.COMMENT and not statement:
                above.append((tok.start[1], _comment_text(tok.string)))
            elif tok.type == tokenize.NL and not statement and not tok.line.strip():
                above = []  # a blank line ends the comment block above
            elif tok.type == tokenize.NEWLINE:
                code = [t for t in statement if t.type != tokenize.COMMENT]
                if level == 1 and len(code) >= 2 and code[0].type == tokenize.NAME:
                    _add_comment(comments, code, statement, above)
                above, statement = [], []
            elif tok.type not in skip:
                statement.append(tok)
    except (tokenize.TokenError, SyntaxError):
        return comments
    return comments


def _add_comment(
    comments: dict[str, str],
    code: list[tokenize.TokenInfo],
    statement: list[tokenize.TokenInfo],
    above: list[tuple[int, str]],
) -> None:
    """Record the comment of one class-body statement if it is a field (``name: type ...``)."""
    if code[1].string != ":":
        return
    name = code[0]
    text = [c for column, c in above if column == name.start[1]]
    text += [_comment_text(t.string) for t in statement if t.type == tokenize.COMMENT]
    text = [t for t in text if t]
    if text:  # a block above that ends in ':' introduces the field
        comments[name.string] = " ".join(text).removesuffix(":")


def _comment_text(comment: str) -> str:
    return comment.lstrip("#").strip()


def _choices(tp: Any, f: dataclasses.Field) -> list[Any] | None:
    """The allowed values of a field: its Literal's (``None`` included if optional), or metadata's."""
    if "choices" in f.metadata:
        return list(f.metadata["choices"])
    if get_origin(tp) is Literal:
        return list(get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        args = get_args(tp)
        literals = [a for a in args if get_origin(a) is Literal]
        if literals and all(a is type(None) or get_origin(a) is Literal for a in args):
            choices = [c for a in literals for c in get_args(a)]
            return [*choices, None] if type(None) in args else choices
    return None


def _type_name(tp: Any, choices: list[Any] | None) -> str:
    if choices is not None:
        return "one of " + "|".join("null" if c is None else str(c) for c in choices)
    name = str(tp) if get_origin(tp) is not None else getattr(tp, "__name__", str(tp))
    return name.replace("typing.", "")


def _option_line(head: str, description: str) -> str:
    """``head  -- description`` on one line if it fits, else the description wrapped below."""
    if not description:
        return head
    line = f"{head}  -- {description}"
    if len(line) <= HELP_WIDTH:
        return line
    indent = " " * 6
    return (
        head
        + "\n"
        + textwrap.fill(description, HELP_WIDTH, initial_indent=indent, subsequent_indent=indent)
    )


def _describe(cls: type, prefix: str = "") -> list[str]:
    """One entry per option of dataclass ``cls``, nested dataclasses flattened to dotted keys."""
    lines = []
    hints = get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        # the field's own default, not an instance's: a config may require options (no instance
        # of its defaults validates)
        value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        description = comments.get(f.name, "")
        if dataclasses.is_dataclass(value):
            if description:
                lines.append(_option_line(f"  {prefix}{f.name}.*", description))
            lines += _describe(type(value), f"{prefix}{f.name}.")
        else:
            tp = hints[f.name]
            head = f"  {prefix}{f.name}: {_type_name(tp, _choices(tp, f))} = {value!r}"
            lines.append(_option_line(head, description))
    return lines


def shipped_configs(package: str) -> list[str]:
    """The names of the configs ``package`` ships: its ``*.yaml`` data files, suffix removed."""
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in importlib.resources.files(package).iterdir()
        if entry.name.endswith(".yaml") and entry.is_file()
    )


@contextlib.contextmanager
def resolve_config(name: str, package: str | None = None) -> Iterator[Path]:
    """The file that ``--config name`` means, as a path valid inside the ``with`` block.

    An existing file ``name`` wins. Else, when ``package`` is given and ``name`` is a bare file
    name (no directory part), ``package``'s data file ``name`` (``.yaml`` appended unless it ends
    so). Else :class:`ConfigError` (with the shipped names, where there is a package).
    """
    path = Path(name)
    if path.is_file() or package is None:
        yield path  # load_config reports a missing file
        return
    resource = None
    if name and path.name == name:
        resource = importlib.resources.files(package) / (
            name if name.endswith(".yaml") else f"{name}.yaml"
        )
    if resource is None or not resource.is_file():
        shipped = ", ".join(shipped_configs(package)) or "none"
        raise ConfigError(
            f"config file {name} does not exist; shipped configs (--config NAME): {shipped}"
        )
    with importlib.resources.as_file(resource) as found:
        yield found


def parse_config(
    cls: type[ConfigT],
    argv: Sequence[str] | None = None,
    description: str = "",
    config_package: str | None = None,
) -> ConfigT:
    """Build a config dataclass from the command line; prints a clear error and exits 2 on bad input.

    ``config_package``: a package whose ``*.yaml`` data files ``--config NAME`` may name (see
    :func:`resolve_config`); None: ``--config`` takes paths only.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        config = "FILE.yaml" if config_package is None else "FILE.yaml | NAME"
        text = (
            description.strip()
            + f"\n\nusage: [--config {config}] [key=value ...]\n\noptions (with defaults):\n"
            + "\n".join(_describe(cls))
        )
        if config_package is not None:
            shipped = ", ".join(shipped_configs(config_package)) or "none"
            text += f"\n\nshipped configs (--config NAME): {shipped}"
        try:
            print(text, flush=True)
        except BrokenPipeError:  # piped into head: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
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
        if config_path is None:
            return load_config(cls, None, overrides)
        with resolve_config(config_path, config_package) as path:
            return load_config(cls, path, overrides)
    except ConfigError as err:
        fail(str(err))


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
