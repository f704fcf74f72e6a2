"""One command-line convention for every tool.

``tool.py [--config FILE.yaml] [--key value | --key=value | key.sub=value ...]``: ``--key value``
is shorthand for the top-level ``key=value``; dashes in flag names become underscores. Values
are parsed as YAML. Unknown keys are rejected with the list of valid ones.

``--help`` lists every option with its type, default and a one-line description. Descriptions
are the config dataclasses' own comments: a trailing ``# comment`` on a field, or comment lines
directly above it. Choices come from ``Literal[...]`` types, or from a field's
``metadata={"choices": ...}`` where the dataclass validates a plain ``str`` itself.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import sys
import textwrap
import tokenize
import types
from collections.abc import Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from pipeline.config import ConfigError, load_config

T = TypeVar("T")

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
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
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
