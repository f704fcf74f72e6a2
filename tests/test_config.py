from dataclasses import dataclass, field
from typing import Literal

import pytest
from helpers import TRAIN, run_tool

from pipeline.build import BuildConfig
from pipeline.cli import field_comments, parse_config
from pipeline.config import ConfigError, check, config_hash, load_config


@dataclass
class Inner:
    lr: float = 1e-3
    kind: Literal["a", "b"] = "a"

    def __post_init__(self) -> None:
        check(self.lr > 0, "inner.lr", "a positive number", self.lr)


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    path: str | None = None


def test_yaml_and_dotted_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: run\ninner:\n  kind: b\n")
    cfg = load_config(Outer, cfg_file, ["inner.lr=3e-4", "steps=5", "path=null"])
    assert cfg == Outer(name="run", steps=5, inner=Inner(lr=3e-4, kind="b"), path=None)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'inner.lrr'; valid keys of inner: lr, kind"
    ):
        load_config(Outer, None, ["inner.lrr=1"])
    with pytest.raises(
        ConfigError, match=r"unknown config key 'stpes'; valid keys: name, steps, inner, path"
    ):
        load_config(Outer, None, ["stpes=1"])


def test_type_and_value_errors_name_the_option():
    with pytest.raises(ConfigError, match=r"option 'steps': expected an integer, got 'ten'"):
        load_config(Outer, None, ["steps=ten"])
    with pytest.raises(ConfigError, match=r"option 'inner.kind': expected one of \['a', 'b'\]"):
        load_config(Outer, None, ["inner.kind=c"])
    with pytest.raises(
        ConfigError, match=r"option 'inner.lr': expected a positive number, got -1.0"
    ):
        load_config(Outer, None, ["inner.lr=-1"])


def test_cli_flags_and_overrides_are_equivalent(capsys):
    a = parse_config(Outer, ["--steps", "3", "--name=y", "inner.kind=b"])
    b = parse_config(Outer, ["steps=3", "name=y", "inner.kind=b"])
    assert a == b and config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(Outer())
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Outer, ["bogus=1"])
    assert exit_info.value.code == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err


@dataclass
class Commented:
    # sparse: precomputed; dense: every point
    mode: Literal["sparse", "dense"] = "sparse"
    steps: int = 10  # optimizer steps
    plain: int = 0
    # a block separated by a blank line describes nothing

    # fmt: off

    where: str | None = (
        None  # inside the parentheses
    )

    # fmt: on

    # every rank writes a log:
    log: bool = False
    kind: str = field(default="a", metadata={"choices": ("a", "b")})
    dtype: Literal["float16", "float32"] | None = None

    def __post_init__(self) -> None:
        # a comment in a method is no field's
        self.plain = self.plain


def test_field_comments_come_from_the_source():
    assert field_comments(Commented) == {
        "mode": "sparse: precomputed; dense: every point",
        "steps": "optimizer steps",
        "where": "inside the parentheses",
        "log": "every rank writes a log",
    }


def test_help_lists_descriptions_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Commented, ["--help"], "A test tool.")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert (
        "  mode: one of sparse|dense = 'sparse'  -- sparse: precomputed; dense: every point\n"
        in out
    )
    assert "  steps: int = 10  -- optimizer steps\n" in out
    assert "  plain: int = 0\n" in out
    assert "  kind: one of a|b = 'a'\n" in out
    assert "  dtype: one of float16|float32|null = None\n" in out


def test_build_help_shows_sampler_and_schedule_choices(capsys):
    with pytest.raises(SystemExit):
        parse_config(BuildConfig, ["--help"])
    out = capsys.readouterr().out
    assert "  schedule.kind: one of constant|linear|cosine|step = 'constant'" in out
    assert "  sampler.kind: one of uniform|" in out
    assert "  format: one of zarr|wds|both = 'both'" in out
    # a comment inside a parenthesised default, wrapped below a head too long to share its line
    assert "  encoder: str | None = None\n      encoder checkpoint" in out


def test_train_tool_help_explains_options():
    proc = run_tool(TRAIN, "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "configs/burgers1d_codec.yaml" in out and "configs/burgers1d_operator.yaml" in out
    assert "  stage: one of codec|operator = 'codec'\n" in out
    assert "  shards: str = 'shards/burgers1d-fields'  -- path or URL of a shard set\n" in out
    assert (
        "  loss.mode: one of sparse|dense|on_the_fly = 'sparse'\n      sparse: the shards'" in out
    )
    assert "  loader.format: one of auto|zarr|wds = 'auto'\n" in out
    assert "  loader.remote.retries: int = 3  -- tries after the first" in out
