"""Lazy reader for PDEBench's HDF5 layouts.

Three layouts are understood (the ones PDEBench ships and our generators write):

* ``1d``: ``tensor`` (N, T, X) with ``x-coordinate`` (X) and ``t-coordinate`` (T or T+1).
* ``cfd``: ``density``, ``pressure``, ``Vx`` [, ``Vy``] (N, T, *grid) with ``x-coordinate``
  [, ``y-coordinate``] and ``t-coordinate`` (1D and 2D compressible-flow files).
* ``grouped``: one group per sample, ``0000/data`` (T, *grid, C) with ``0000/grid/x``
  [, ``0000/grid/y``] and ``0000/grid/t``.

Trajectories are read one at a time as float32 arrays shaped (T, C, *grid) -- channel first,
``x`` the first grid axis -- so an 8 GB file is never loaded into memory.

PDE parameters (``DataInfo.params``) are the file's numeric attributes (our generators write
``nu``). A file without any, in PDEBench's naming (``1D_``, ``2D_`` or ``3D_`` first), gets them
from its name: every ``_``-separated token of a name and a number, the name lower-cased like the
attributes' keys, e.g. ``2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_128_Train.hdf5`` ->
``{"eta": 0.01, "m": 0.1, "zeta": 0.01}``:

* ``Nu`` -> ``nu`` (Burgers viscosity; reaction-diffusion diffusivity), ``Rho`` -> ``rho``
  (reaction rate), ``beta`` -> ``beta`` (advection speed; Darcy force), ``M`` -> ``m`` (Mach
  number), ``Eta`` -> ``eta`` and ``Zeta`` -> ``zeta`` (shear and bulk viscosity).
* Other tokens (``1D``, ``Sols``, ``Rand``, ``periodic``, a resolution ``128``, ``Train``, ``NA``)
  carry no parameter. Attributes, when the file has any, win over the name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

CFD_FIELDS = ("density", "pressure", "Vx", "Vy")
AXIS_NAMES = ("x", "y", "z")
# a parameter in a PDEBench file name: letters, then a number (0.01, 1.0, 1e-8, 1.e-8)
_NAME_PARAM = re.compile(r"([A-Za-z]+)([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")
_PDEBENCH_NAME = re.compile(r"[123][dD]_")


class DataError(ValueError):
    """An HDF5 file that does not hold what the reader expects."""


@dataclass(frozen=True)
class DataInfo:
    """What a model and a shard set need to know about the data, independent of its values."""

    channels: tuple[str, ...]
    grid: tuple[int, ...]  # (X,) or (X, Y), x first
    dt: float
    num_steps: int  # snapshots per trajectory
    num_trajectories: int
    periodic: tuple[bool, ...]  # per grid axis
    params: dict[str, float] = field(default_factory=dict)  # PDE parameters (e.g. viscosity)

    @property
    def ndim(self) -> int:
        return len(self.grid)

    @property
    def num_points(self) -> int:
        return int(np.prod(self.grid))


class PDEBenchFile:
    """One PDEBench-layout HDF5 file; metadata is read eagerly, trajectories lazily."""

    def __init__(self, path: str | Path, boundary: str = "auto"):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such HDF5 file")
        self._handle: h5py.File | None = None
        self._pid = -1
        f = self._file()
        self.layout = _detect_layout(f, self.path)
        self._read_metadata(f, boundary)

    # -- file handle (h5py handles must not cross a fork: reopen per process) --
    def _file(self) -> h5py.File:
        if self._handle is None or self._pid != os.getpid():
            try:
                self._handle = h5py.File(self.path, "r")
            except OSError as err:
                raise DataError(f"{self.path}: not a readable HDF5 file ({err})") from None
            self._pid = os.getpid()
        return self._handle

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __enter__(self) -> PDEBenchFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_pid": -1}

    # -- metadata --
    def _read_metadata(self, f: h5py.File, boundary: str) -> None:
        if self.layout == "grouped":
            self._groups = sorted(k for k in f if isinstance(f[k], h5py.Group))
            first = f[self._groups[0]]
            _require(first, "data", self.path, f"{self._groups[0]}/data (T, *grid, C)")
            data_shape = first["data"].shape
            ndim = len(data_shape) - 2
            if ndim not in (1, 2):
                raise DataError(
                    f"{self.path}: key '{self._groups[0]}/data' has shape {data_shape}; "
                    "expected (T, X, C) or (T, X, Y, C)"
                )
            coords = [_read_1d(first, f"grid/{a}", self.path) for a in AXIS_NAMES[:ndim]]
            t = _read_1d(first, "grid/t", self.path)
            num_traj, num_steps, grid = len(self._groups), data_shape[0], tuple(data_shape[1:-1])
            n_ch = data_shape[-1]
            names = f.attrs.get("channels")
            channels = (
                tuple(str(c) for c in names)
                if names is not None
                else tuple(f"c{i}" for i in range(n_ch))
            )
            if len(channels) != n_ch:
                raise DataError(
                    f"{self.path}: attribute 'channels' names {len(channels)} channels, data has {n_ch}"
                )
            for g in self._groups:
                if f[g]["data"].shape != data_shape:
                    raise DataError(
                        f"{self.path}: key '{g}/data' has shape {f[g]['data'].shape}; expected {data_shape} like '{self._groups[0]}/data'"
                    )
        else:
            keys = ("tensor",) if self.layout == "1d" else tuple(k for k in CFD_FIELDS if k in f)
            shape = f[keys[0]].shape
            # (N, T, X) for 'tensor' and for density/pressure/Vx; (N, T, X, Y) with Vy
            want_rank = 3 if self.layout == "1d" else len(keys)
            if len(shape) != want_rank:
                axes = ", ".join(["N", "T", *[a.upper() for a in AXIS_NAMES[: want_rank - 2]]])
                raise DataError(
                    f"{self.path}: key '{keys[0]}' has shape {shape}; expected rank {want_rank} ({axes})"
                )
            for k in keys:
                if f[k].shape != shape:
                    raise DataError(
                        f"{self.path}: key '{k}' has shape {f[k].shape}; expected {shape} like '{keys[0]}'"
                    )
            self._keys = keys
            num_traj, num_steps, grid = shape[0], shape[1], tuple(shape[2:])
            coords = [_read_1d(f, f"{a}-coordinate", self.path) for a in AXIS_NAMES[: len(grid)]]
            t = _read_1d(f, "t-coordinate", self.path)
            channels = ("u",) if self.layout == "1d" else keys
        for axis, (c, n) in enumerate(zip(coords, grid, strict=True)):
            if len(c) != n:
                raise DataError(
                    f"{self.path}: '{AXIS_NAMES[axis]}' coordinate has {len(c)} entries; the grid has {n} along that axis"
                )
        if len(t) not in (num_steps, num_steps + 1) or num_steps < 2:
            raise DataError(
                f"{self.path}: t-coordinate has {len(t)} entries; expected {num_steps} or {num_steps + 1} (T >= 2)"
            )
        self.coordinates = coords  # physical coordinates per axis
        periodic = _boundary(f.attrs.get("boundary", "periodic"), boundary, self.path)
        params = {
            str(k): float(v)
            for k, v in f.attrs.items()
            if isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)
        } or params_from_name(self.path)
        self.info = DataInfo(
            channels=channels,
            grid=grid,
            dt=float(f"{t[1] - t[0]:.7g}"),  # coordinates are often float32
            num_steps=int(num_steps),
            num_trajectories=int(num_traj),
            periodic=(periodic,) * len(grid),
            params=dict(sorted(params.items())),
        )

    def __len__(self) -> int:
        return self.info.num_trajectories

    def trajectory(self, i: int) -> np.ndarray:
        """Trajectory ``i`` as float32 (T, C, *grid); raises on NaN/Inf naming file, key and index."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: trajectory {i} out of range [0, {len(self)})")
        f = self._file()
        if self.layout == "grouped":
            key = f"{self._groups[i]}/data"
            traj = np.moveaxis(
                np.asarray(f[key][()], dtype=np.float32), -1, 1
            )  # (T,*grid,C) -> (T,C,*grid)
        else:
            key = "/".join(self._keys)
            traj = np.stack([np.asarray(f[k][i], dtype=np.float32) for k in self._keys], axis=1)
        if not np.isfinite(traj).all():
            t_bad = int(np.argwhere(~np.isfinite(traj))[0, 0])
            raise DataError(
                f"{self.path}: key '{key}', trajectory {i}, time {t_bad}: NaN or Inf in the fields"
            )
        return np.ascontiguousarray(traj)


def params_from_name(path: str | Path) -> dict[str, float]:
    """PDE parameters encoded in a PDEBench file name, keys lower-cased (see the module docstring).

    ``1D_Burgers_Sols_Nu0.01.hdf5`` -> ``{"nu": 0.01}``; ``{}`` for a name not in PDEBench's
    convention (``1D_``, ``2D_`` or ``3D_`` first) or without parameters (``1D_diff-sorp_NA_NA.h5``).
    """
    path = Path(path)
    # only an HDF5 suffix is dropped: in '..._Nu0.01' without one, '.01' is no suffix
    name = path.stem if path.suffix.lower() in (".h5", ".hdf5", ".hdf", ".he5") else path.name
    if not _PDEBENCH_NAME.match(name):
        return {}
    params = {}
    for token in name.split("_"):
        match = _NAME_PARAM.fullmatch(token)
        if match:
            params[match[1].lower()] = float(match[2])
    return params


def _detect_layout(f: h5py.File, path: Path) -> str:
    keys = list(f.keys())
    if "tensor" in f:
        return "1d"
    if all(k in f for k in CFD_FIELDS[:3]):
        return "cfd"
    if keys and all(isinstance(f[k], h5py.Group) for k in keys):
        return "grouped"
    raise DataError(
        f"{path}: unrecognised HDF5 layout (top-level keys: {keys[:8]}); expected one of: "
        "'tensor' (N, T, X) with 'x-coordinate' and 't-coordinate'; "
        "'density', 'pressure', 'Vx'[, 'Vy'] (N, T, *grid) with coordinates; "
        "per-sample groups '0000/data' (T, *grid, C) with '0000/grid/x' and '0000/grid/t'"
    )


def _require(group: h5py.Group, key: str, path: Path, expected: str) -> None:
    if key not in group:
        raise DataError(
            f"{path}: missing key '{group.name.strip('/') + '/' if group.name != '/' else ''}{key}'; expected {expected}"
        )


def _read_1d(group: h5py.Group, key: str, path: Path) -> np.ndarray:
    _require(group, key, path, "a 1-D coordinate array")
    arr = np.asarray(group[key][()], dtype=np.float64)
    if arr.ndim != 1:
        raise DataError(
            f"{path}: key '{group[key].name.strip('/')}' has shape {arr.shape}; expected a 1-D array"
        )
    return arr


def _boundary(attr: object, override: str, path: Path) -> bool:
    if override != "auto":
        return override == "periodic"
    value = attr.decode() if isinstance(attr, bytes) else str(attr)
    if value not in ("periodic", "nonperiodic"):
        raise DataError(
            f"{path}: attribute 'boundary' is {value!r}; expected 'periodic' or 'nonperiodic'"
        )
    return value == "periodic"
