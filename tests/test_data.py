"""Reader on real HDF5 files in PDEBench's three layouts, generators' physics, splits, stats."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from helpers import write_1d, write_cfd, write_grouped

import pipeline.sources.splits as splits_module
from pipeline.sources.generate import generate, ns_rhs
from pipeline.sources.pdebench import DataError, PDEBenchFile
from pipeline.sources.splits import NormStats, split_trajectories


def test_1d_layout(tmp_path):
    path = write_1d(tmp_path / "b.hdf5")
    src = PDEBenchFile(path)
    assert src.layout == "1d"
    assert src.info.grid == (16,) and src.info.channels == ("u",) and src.info.num_steps == 5
    assert src.info.dt == pytest.approx(0.05) and len(src) == 3
    with h5py.File(path) as f:
        np.testing.assert_array_equal(src.trajectory(2)[:, 0], f["tensor"][2])
    # PDEBench ships T+1 time coordinates; T entries are accepted too
    assert PDEBenchFile(write_1d(tmp_path / "t.hdf5", t_entries=5)).info.num_steps == 5


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("1D_Burgers_Sols_Nu0.01.hdf5", {"nu": 0.01}),
        ("1D_Advection_Sols_beta0.1.hdf5", {"beta": 0.1}),
        (
            "2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_128_Train.hdf5",
            {"eta": 0.01, "m": 0.1, "zeta": 0.01},
        ),
        ("1D_CFD_Rand_Eta1.e-8_Zeta1e-8_periodic_Train.hdf5", {"eta": 1e-8, "zeta": 1e-8}),
        ("1D_ReacDiff_Nu0.5_Rho1.0.hdf5", {"nu": 0.5, "rho": 1.0}),
        ("2D_DarcyFlow_beta1.0_Train.hdf5", {"beta": 1.0}),
        ("1D_diff-sorp_NA_NA.h5", {}),
        ("burgers_v2.h5", {}),  # not PDEBench's naming: no parameters guessed
    ],
)
def test_params_from_a_pdebench_file_name(tmp_path, name, params):
    src = PDEBenchFile(write_1d(tmp_path / name))
    assert src.info.params == pytest.approx(params) and list(src.info.params) == sorted(params)


def test_param_attributes_win_over_the_file_name(tmp_path):
    path = write_1d(tmp_path / "1D_ReacDiff_Nu0.5_Rho1.0.hdf5")
    with h5py.File(path, "a") as f:
        f.attrs.update({"nu": 0.25, "boundary": "periodic"})
    assert PDEBenchFile(path).info.params == {"nu": 0.25}


def test_cfd_layout_channel_first_x_first(tmp_path):
    path = write_cfd(tmp_path / "cfd.hdf5")
    src = PDEBenchFile(path)
    assert src.layout == "cfd" and src.info.channels == ("density", "pressure", "Vx", "Vy")
    assert src.info.grid == (8, 6)
    traj = src.trajectory(1)
    assert traj.shape == (4, 4, 8, 6)
    with h5py.File(path) as f:
        np.testing.assert_array_equal(traj[:, 3], f["Vy"][1])


def test_grouped_layout(tmp_path):
    path = write_grouped(tmp_path / "g.h5")
    src = PDEBenchFile(path)
    assert src.layout == "grouped" and src.info.grid == (8, 8) and src.info.channels == ("c0", "c1")
    with h5py.File(path) as f:
        np.testing.assert_array_equal(src.trajectory(1), np.moveaxis(f["0001/data"][()], -1, 1))
    assert src.info.dt == 0.5


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.__delitem__("x-coordinate"), r"missing key 'x-coordinate'"),
        (
            lambda f: (f.__delitem__("tensor"), f.create_dataset("tensor", data=np.zeros((2, 3)))),
            r"key 'tensor' has shape \(2, 3\); expected rank 3 \(N, T, X\)",
        ),
        (
            lambda f: (
                f.__delitem__("t-coordinate"),
                f.create_dataset("t-coordinate", data=np.zeros(9)),
            ),
            r"t-coordinate has 9 entries; expected 5 or 6",
        ),
        (
            lambda f: (f.__delitem__("tensor"), f.create_dataset("other", data=np.zeros(3))),
            r"unrecognised HDF5 layout",
        ),
    ],
)
def test_bad_layouts_fail_with_one_clear_message(tmp_path, mutate, message):
    path = write_1d(tmp_path / "bad.h5")
    with h5py.File(path, "a") as f:
        mutate(f)
    with pytest.raises(DataError, match=message) as err:
        PDEBenchFile(path)
    assert str(path) in str(err.value)


def test_nan_is_reported_with_file_key_and_index(tmp_path):
    path = write_1d(tmp_path / "nan.h5")
    with h5py.File(path, "a") as f:
        f["tensor"][1, 3, 4] = np.nan
    src = PDEBenchFile(path)
    src.trajectory(0)
    with pytest.raises(DataError, match=r"nan.h5: key 'tensor', trajectory 1, time 3: NaN or Inf"):
        src.trajectory(1)


def test_missing_file_and_not_hdf5(tmp_path):
    with pytest.raises(DataError, match="no such HDF5 file"):
        PDEBenchFile(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        PDEBenchFile(tmp_path / "text.h5")


def test_generated_burgers_through_the_reader_is_physical(burgers_file):
    src = PDEBenchFile(burgers_file)
    assert src.layout == "1d" and src.info.params == {"nu": 0.01} and src.info.periodic == (True,)
    with h5py.File(burgers_file) as f:
        assert f["t-coordinate"].shape == (21,)  # PDEBench's T+1 convention
    u = np.stack([src.trajectory(i)[:, 0] for i in range(len(src))]).astype(np.float64)  # (N, T, X)
    energy = (u**2).mean(-1)
    assert (np.diff(energy, axis=1) < 0).all(), "energy must decay under viscosity"
    mean = u.mean(-1)  # (N, T): conserved by the periodic Burgers flux
    np.testing.assert_allclose(mean, np.broadcast_to(mean[:, :1], mean.shape), atol=1e-6)


def test_generated_ns_is_mean_free_and_solves_the_vorticity_equation(tmp_path):
    path = generate(
        "ns2d",
        tmp_path / "ns.h5",
        trajectories=2,
        steps=3,
        resolution=32,
        seed=1,
        dt=0.01,
        progress=False,
    )
    src = PDEBenchFile(path)
    assert (
        src.layout == "grouped"
        and src.info.channels == ("vorticity",)
        and src.info.grid == (32, 32)
    )
    w = torch.from_numpy(src.trajectory(0)[:, 0]).double()  # (T, R, R)
    assert w.mean((-1, -2)).abs().max() < 1e-5
    # centred difference in time vs the right-hand side at the middle snapshot
    dwdt = (w[2] - w[0]) / (2 * 0.01)
    rhs = torch.fft.irfft2(ns_rhs(torch.fft.rfft2(w[1]), nu=1e-3), s=(32, 32))
    rel = (dwdt - rhs).norm() / rhs.norm()
    assert rel < 0.005, f"vorticity-equation residual {rel:.3f}"


def test_generators_are_deterministic_for_a_seed(tmp_path):
    a = generate("burgers1d", tmp_path / "a.h5", 3, 5, 32, seed=7, progress=False)
    b = generate("burgers1d", tmp_path / "b.h5", 3, 5, 32, seed=7, progress=False)
    c = generate("burgers1d", tmp_path / "c.h5", 3, 5, 32, seed=8, progress=False)
    ta, tb, tc = (PDEBenchFile(p).trajectory(0) for p in (a, b, c))
    assert ta.tobytes() == tb.tobytes() and ta.tobytes() != tc.tobytes()


def test_splits_are_trajectory_disjoint_and_stats_come_from_train(burgers_file):
    splits = split_trajectories(12, 0.2, 0.2, seed=0)
    sets = [set(v) for v in splits.values()]
    assert sum(map(len, sets)) == 12 and set.union(*sets) == set(range(12))
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1 :])
    assert split_trajectories(12, 0.2, 0.2, seed=0) == splits
    src = PDEBenchFile(burgers_file)
    stats = NormStats.from_trajectories(src, splits["train"], progress=False)
    train = np.stack([src.trajectory(i) for i in splits["train"]])
    assert stats.mean[0] == pytest.approx(train.mean(), abs=1e-6)
    assert stats.std[0] == pytest.approx(train.std(), rel=1e-5)
    x = torch.from_numpy(train[0])
    torch.testing.assert_close(stats.denormalize(stats.normalize(x)), x)
    with pytest.raises(DataError, match="cannot give non-empty train/val/test"):
        split_trajectories(2, 0.1, 0.1, seed=0)


def test_norm_stats_do_not_depend_on_the_thread_count(burgers_file, monkeypatch):
    """The trajectories' sums are added in trajectory order, whichever thread summed them."""
    src = PDEBenchFile(burgers_file)
    train = split_trajectories(len(src), 0.2, 0.2, seed=0)["train"]
    stats = {}
    for threads in (1, 3):
        monkeypatch.setattr(splits_module, "NORM_THREADS", threads)
        stats[threads] = NormStats.from_trajectories(src, train, progress=False)
    assert stats[1] == stats[3]  # bit for bit


@pytest.mark.parametrize(
    ("pde", "kwargs"),
    [("burgers1d", {"resolution": 64}), ("ns2d", {"resolution": 32, "dt": 0.5})],
)
def test_generated_file_is_byte_identical_whatever_the_thread_count(tmp_path, pde, kwargs):
    """The same command writes the same bytes (so the same sample_set_id downstream) with one
    torch thread or two, and leaves the caller's thread count as it was."""
    import hashlib

    before = torch.get_num_threads()
    digests = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            path = generate(
                pde, tmp_path / f"{threads}.h5", 3, 4, seed=5, batch=2, progress=False, **kwargs
            )
            assert torch.get_num_threads() == threads
            digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    finally:
        torch.set_num_threads(before)
    assert digests[0] == digests[1]
