"""Installed like a library: a wheel of this checkout, installed without ``-e`` into a fresh
venv, has every console script, the configs as package data (``--config NAME``), and runs a real
generate -> build -> inspect flow from a directory that is not the checkout.

The wheel is built offline with the test environment's setuptools (``--no-build-isolation``; an
isolated build would download its build requirements) and installed with ``--no-deps
--no-index``; the venv sees the test environment's packages (torch, zarr, ...) through
``--system-site-packages`` where that environment is the system's, and through a ``.pth`` file
naming its site-packages where it is itself a venv (``--system-site-packages`` then reaches only
the base interpreter's). Nothing is downloaded.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from pipeline.cli import parse_config, resolve_config, shipped_configs
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
# what a wheel is built from: the rest of the checkout (tests, tools, docs, runs) stays out
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "pipeline", "ups")


# ---------------------------------------------------------------- fast: the layout


def test_every_tool_is_a_console_script_and_a_thin_wrapper():
    """Each tools/<name>.py runs ups.cli.<name>'s main, which a console script names."""
    assert sorted(SCRIPTS) == [
        "ups-build-shards",
        "ups-generate",
        "ups-inspect",
        "ups-plot-run",
        "ups-refresh",
        "ups-train",
    ]
    for target in SCRIPTS.values():
        module, _, function = target.partition(":")
        assert function == "main"
        name = module.removeprefix("ups.cli.")
        wrapper = (ROOT / "tools" / f"{name}.py").read_text()
        assert f"from {module} import main\n" in wrapper
        assert (ROOT / "ups" / "cli" / f"{name}.py").is_file()


def test_the_checkout_configs_are_the_shipped_ones():
    """configs/ (README, quickstart) holds the same files as the package data, by name."""
    shipped = shipped_configs("ups.configs")
    assert {"burgers1d_codec", "burgers1d_operator", "burgers1d_shards"} <= set(shipped)
    for name in shipped:
        mine = ROOT / "configs" / f"{name}.yaml"
        assert mine.read_bytes() == (ROOT / "ups" / "configs" / f"{name}.yaml").read_bytes()
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert "*.yaml" in package_data["ups.configs"]


def test_every_shipped_config_loads_into_its_config_class():
    """Unknown keys and out-of-range values are refused on load: each shipped file is valid."""
    from pipeline.build import BuildConfig
    from pipeline.config import load_config
    from ups.training.train import TrainConfig

    for name in shipped_configs("ups.configs"):
        cls = BuildConfig if name.endswith("_shards") else TrainConfig
        loaded = load_config(cls, ROOT / "ups" / "configs" / f"{name}.yaml")
        if cls is TrainConfig:
            assert loaded.stage == ("codec" if name.endswith("_codec") else "operator"), name


def test_config_names_resolve_to_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = ROOT / "ups" / "configs" / "burgers1d_shards.yaml"
    for name in ("burgers1d_shards", "burgers1d_shards.yaml"):
        with resolve_config(name, "ups.configs") as path:
            assert path.read_bytes() == packaged.read_bytes()
    # a file path wins over the shipped config of the same name
    (tmp_path / "burgers1d_shards.yaml").write_text("epochs: 3\n")
    with resolve_config("burgers1d_shards.yaml", "ups.configs") as path:
        assert path.resolve() == (tmp_path / "burgers1d_shards.yaml").resolve()
    # a name with a directory part is only a path; without a package, names are paths
    for name, package in (("elsewhere/burgers1d_shards", "ups.configs"), ("nope", "ups.configs")):
        with (
            pytest.raises(ConfigError, match=r"does not exist; shipped configs.*burgers1d_shards"),
            resolve_config(name, package),
        ):
            pass
    with resolve_config("burgers1d_codec", None) as path:
        assert path == Path("burgers1d_codec")


def test_parse_config_reads_a_shipped_config_by_name(tmp_path, monkeypatch, capsys):
    from pipeline.build import BuildConfig

    monkeypatch.chdir(tmp_path)
    cfg = parse_config(BuildConfig, ["--config", "burgers1d_shards", "epochs=2"], "", "ups.configs")
    assert cfg.epochs == 2 and cfg.sampler.kind == "gradient"
    with pytest.raises(SystemExit) as exit_info:
        parse_config(BuildConfig, ["--config", "burgers1d_shards"], "", None)
    assert exit_info.value.code == 2
    assert "config file burgers1d_shards does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- slow: a real install


def _run(*args: object, cwd: Path, env: dict[str, str], timeout: float = 120):
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A fresh venv with this checkout's wheel installed; cwd, env and paths for running it."""
    try:
        setuptools_version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("no setuptools here to build the wheel offline (pip install '.[dev]')")
    if tuple(int(p) for p in setuptools_version.split(".")[:2]) < (70, 1):
        pytest.skip(f"setuptools {setuptools_version} < 70.1 (pip install '.[dev]')")
    tmp = tmp_path_factory.mktemp("packaging")
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    env |= {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONNOUSERSITE": "1",
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "MPLBACKEND": "Agg",
    }
    # a copy of the sources, so the build's build/ and *.egg-info stay out of the checkout
    src = tmp / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    wheels = tmp / "wheels"
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        wheels,
        src,
        cwd=tmp,
        env=env,
    )
    (wheel,) = wheels.glob("ups_shards-*.whl")
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp, env=env)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    # the test environment's packages (torch, ...) where it is a venv itself; after the venv's
    # own site-packages on sys.path, so the installed wheel comes first
    venv_site = Path(
        _run(
            python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp, env=env
        ).stdout.strip()
    )
    parents = [*site.getsitepackages(), sysconfig.get_path("purelib")]
    (venv_site / "_test_environment.pth").write_text("\n".join(dict.fromkeys(parents)) + "\n")
    _run(
        python,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        wheel,
        cwd=tmp,
        env=env,
    )
    work = tmp / "work"
    work.mkdir()
    env["PATH"] = str(bin_dir) + os.pathsep + env.get("PATH", "")
    return {"python": python, "bin": bin_dir, "venv": venv, "cwd": work, "env": env}


@pytest.mark.slow
def test_the_installed_package_is_not_the_checkout(installed):
    out = _run(
        installed["python"],
        "-c",
        "import pipeline, ups, ups.cli, ups.configs; print(ups.__file__); print(pipeline.__file__)",
        cwd=installed["cwd"],
        env=installed["env"],
    ).stdout.split()
    venv = installed["venv"].resolve()
    for path in out:
        assert Path(path).resolve().is_relative_to(venv), f"{path} is not in the venv {venv}"
        assert not Path(path).resolve().is_relative_to(ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_console_script_answers_help(installed, script):
    result = _run(installed["bin"] / script, "--help", cwd=installed["cwd"], env=installed["env"])
    assert "usage" in result.stdout.lower()
    assert script in result.stdout  # its docstring (or argparse) names the script


@pytest.mark.slow
def test_generate_build_inspect_through_the_installed_scripts(installed):
    """A tiny Burgers file, field-only shards from the packaged config named by name, verified."""
    run = installed["bin"]
    cwd, env = installed["cwd"], installed["env"]
    data, out = cwd / "burgers.h5", cwd / "shards"
    generated = _run(
        run / "ups-generate",
        "--pde",
        "burgers1d",
        "--out",
        data,
        "--trajectories",
        "8",
        "--steps",
        "6",
        "--resolution",
        "64",
        "--seed",
        "0",
        cwd=cwd,
        env=env,
    )
    assert data.is_file(), generated.stdout
    assert not (cwd / "burgers1d_shards").exists()  # the name is no file here: the package's
    built = _run(
        run / "ups-build-shards",
        "--config",
        "burgers1d_shards",
        f"data.path={data}",
        f"out={out}",
        "epochs=2",
        "device=cpu",
        "write_workers=1",
        "progress=false",
        cwd=cwd,
        env=env,
    )
    assert "sample_set_id" in built.stdout
    inspected = _run(run / "ups-inspect", out, cwd=cwd, env=env)
    assert "verify         OK" in inspected.stdout
    # the packaged config's sampler, schedule and grid made it into the set
    assert "sampler        gradient" in inspected.stdout
    assert "schedule cosine" in inspected.stdout
