from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipeline.cli import parse_config
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
