"""Built-in PDE data generators that write PDEBench's HDF5 layouts, so one reader serves both.

* ``burgers1d``: viscous Burgers u_t + (u^2/2)_x = nu u_xx on the periodic unit interval,
  written in PDEBench's 1D layout (``tensor`` (N, T, X), ``x-coordinate``, ``t-coordinate``
  with T+1 entries, as PDEBench ships it).
* ``ns2d``: incompressible Navier-Stokes in vorticity form w_t + u.grad(w) = nu lap(w) + f on the
  periodic unit square with the FNO benchmark's forcing f = 0.1 (sin 2pi(x+y) + cos 2pi(x+y))
  and Gaussian-random-field initial vorticity, written in PDEBench's per-sample group layout
  (``0000/data`` (T, X, Y, 1), ``0000/grid/{x,y,t}``).

Both are pseudo-spectral with 2/3 dealiasing and an integrating-factor RK4 step (the stiff
diffusion is integrated exactly), in float64; the time step obeys a CFL limit. Random initial
conditions come from a seeded CPU generator. On the CPU the solver runs on one torch thread, so
the same command writes a byte-identical file whatever the thread count: torch splits elementwise
work and MKL splits FFTs by thread count, and a split can change the last bit of a float64 value
and so of a float32 one. Datasets are written with
track_times=False, so no timestamp varies either.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

PDES = ("burgers1d", "ns2d")
CFL = 0.4


def _ifrk4_step(
    u_hat: torch.Tensor,
    nonlinear: Callable[[torch.Tensor], torch.Tensor],
    lin: torch.Tensor,
    h: float,
) -> torch.Tensor:
    """One integrating-factor RK4 step of du/dt = lin * u + N(u) in Fourier space."""
    e, e2 = torch.exp(lin * h), torch.exp(lin * h / 2)
    k1 = nonlinear(u_hat)
    k2 = nonlinear(e2 * (u_hat + h / 2 * k1))
    k3 = nonlinear(e2 * u_hat + h / 2 * k2)
    k4 = nonlinear(e * u_hat + h * e2 * k3)
    return e * u_hat + h / 6 * (e * k1 + 2 * e2 * (k2 + k3) + k4)


def _substeps(dt_out: float, dx: float, max_speed: float) -> tuple[int, float]:
    """Number and size of solver steps per output interval under the CFL limit."""
    h_max = CFL * dx / max(max_speed, 1e-8)
    n = max(1, math.ceil(dt_out / h_max))
    return n, dt_out / n


# ---------------------------------------------------------------- Burgers 1D


def burgers_initial(n_traj: int, res: int, gen: torch.Generator) -> torch.Tensor:
    """Sum of three sine waves with random integer wavenumbers 1..4, amplitudes and phases (PDEBench style)."""
    x = torch.arange(res, dtype=torch.float64) / res + 0.5 / res  # cell centres
    wavenumber = torch.randint(1, 5, (n_traj, 3, 1), generator=gen).double()
    amplitude = torch.rand(n_traj, 3, 1, generator=gen, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(n_traj, 3, 1, generator=gen, dtype=torch.float64)
    return (amplitude * torch.sin(2 * math.pi * wavenumber * x + phase)).sum(1)  # (n, res)


def solve_burgers(u0: torch.Tensor, steps: int, dt_out: float, nu: float) -> torch.Tensor:
    """Integrate a batch of initial conditions (B, X); returns (B, steps, X) including u0."""
    res = u0.shape[-1]
    k = 2 * math.pi * torch.fft.rfftfreq(res, d=1.0 / res, device=u0.device).double()
    dealias = (torch.arange(k.numel(), device=u0.device) < res / 3).double()
    lin = -nu * k**2

    def nonlinear(u_hat: torch.Tensor) -> torch.Tensor:  # -(u^2/2)_x
        u = torch.fft.irfft(u_hat * dealias, n=res)
        return -0.5j * k * torch.fft.rfft(u * u) * dealias

    out = [u0]
    u_hat = torch.fft.rfft(u0)
    for _ in range(steps - 1):
        n_sub, h = _substeps(dt_out, 1.0 / res, out[-1].abs().max().item())
        for _ in range(n_sub):
            u_hat = _ifrk4_step(u_hat, nonlinear, lin, h)
        out.append(torch.fft.irfft(u_hat, n=res))
    return torch.stack(out, dim=1)


# ---------------------------------------------------------------- Navier-Stokes 2D


def ns_initial(n_traj: int, res: int, gen: torch.Generator) -> torch.Tensor:
    """Gaussian random field N(0, 7^{3/2} (-lap + 49 I)^{-2.5}) as in the FNO benchmark, (n, res, res)."""
    alpha, tau = 2.5, 7.0
    kx = torch.fft.fftfreq(res, d=1.0 / res, dtype=torch.float64)
    k2 = kx[:, None] ** 2 + kx[None, :] ** 2
    sigma = tau ** (0.5 * (2 * alpha - 2))
    sqrt_eig = res * res * sigma * (4 * math.pi**2 * k2 + tau**2) ** (-alpha / 2)
    sqrt_eig[0, 0] = 0.0
    noise = torch.randn(n_traj, res, res, 2, generator=gen, dtype=torch.float64)
    coeff = sqrt_eig * torch.complex(noise[..., 0], noise[..., 1])
    return torch.fft.ifft2(coeff).real


def ns_forcing(res: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """FNO forcing 0.1 (sin 2pi(x+y) + cos 2pi(x+y)) on the grid x = i/res."""
    x = torch.arange(res, dtype=torch.float64, device=device) / res
    s = x[:, None] + x[None, :]
    return 0.1 * (torch.sin(2 * math.pi * s) + torch.cos(2 * math.pi * s))


def ns_velocity(
    w_hat: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity (u, v) = (psi_y, -psi_x) from the vorticity spectrum, where -lap psi = w."""
    k2 = kx**2 + ky**2
    psi_hat = w_hat / torch.where(k2 == 0, 1.0, k2)
    psi_hat = torch.where(k2 == 0, 0.0, psi_hat)
    res = w_hat.shape[-2]
    u = torch.fft.irfft2(1j * ky * psi_hat, s=(res, res))
    v = torch.fft.irfft2(-1j * kx * psi_hat, s=(res, res))
    return u, v


def ns_wavenumbers(res: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    kx = 2 * math.pi * torch.fft.fftfreq(res, d=1.0 / res, device=device).double()[:, None]
    ky = 2 * math.pi * torch.fft.rfftfreq(res, d=1.0 / res, device=device).double()[None, :]
    return kx.expand(res, ky.shape[1]), ky.expand(res, ky.shape[1])


def ns_operators(res: int, nu: float, device: torch.device | str) -> tuple[Callable, torch.Tensor]:
    """The vorticity equation split for the integrating factor: (nonlinear part, linear symbol).

    dw_hat/dt = lin * w_hat + nonlinear(w_hat), with lin = -nu |k|^2 and
    nonlinear = -u.grad(w) + f, dealiased by the 2/3 rule.
    """
    kx, ky = ns_wavenumbers(res, device)
    dealias = ((kx.abs() < 2 * math.pi * res / 3) & (ky.abs() < 2 * math.pi * res / 3)).double()
    f_hat = torch.fft.rfft2(ns_forcing(res, device))

    def nonlinear(w_hat: torch.Tensor) -> torch.Tensor:
        w_hat = w_hat * dealias
        u, v = ns_velocity(w_hat, kx, ky)
        wx = torch.fft.irfft2(1j * kx * w_hat, s=(res, res))
        wy = torch.fft.irfft2(1j * ky * w_hat, s=(res, res))
        return (-torch.fft.rfft2(u * wx + v * wy) + f_hat) * dealias

    return nonlinear, -nu * (kx**2 + ky**2)


def ns_rhs(w_hat: torch.Tensor, nu: float) -> torch.Tensor:
    """dw_hat/dt of the (dealiased) vorticity equation, for checking the time stepping."""
    nonlinear, lin = ns_operators(w_hat.shape[-2], nu, w_hat.device)
    return nonlinear(w_hat) + lin * w_hat


def solve_ns(w0: torch.Tensor, steps: int, dt_out: float, nu: float) -> torch.Tensor:
    """Integrate a batch of initial vorticities (B, R, R); returns (B, steps, R, R) including w0."""
    res = w0.shape[-1]
    kx, ky = ns_wavenumbers(res, w0.device)
    nonlinear, lin = ns_operators(res, nu, w0.device)
    out = [w0]
    w_hat = torch.fft.rfft2(w0)
    for _ in range(steps - 1):
        u, v = ns_velocity(w_hat, kx, ky)
        n_sub, h = _substeps(dt_out, 1.0 / res, torch.sqrt(u**2 + v**2).max().item())
        for _ in range(n_sub):
            w_hat = _ifrk4_step(w_hat, nonlinear, lin, h)
        out.append(torch.fft.irfft2(w_hat, s=(res, res)))
    return torch.stack(out, dim=1)


# ---------------------------------------------------------------- writing


@contextmanager
def _one_cpu_thread(device: str) -> Iterator[None]:
    """Run torch's CPU work on one thread (restored after), so results do not depend on how many
    threads split it."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def generate(
    pde: str,
    out: str | Path,
    trajectories: int,
    steps: int,
    resolution: int,
    seed: int,
    nu: float | None = None,
    dt: float | None = None,
    device: str = "cpu",
    batch: int = 16,
    progress: bool = True,
) -> Path:
    """Generate ``trajectories`` trajectories of ``steps`` snapshots and write them atomically to ``out``."""
    if pde not in PDES:
        raise ValueError(f"--pde: expected one of {list(PDES)}, got {pde!r}")
    for name, value in (
        ("trajectories", trajectories),
        ("steps", steps - 1),
        ("resolution", resolution),
    ):
        if value < 1:
            raise ValueError(f"--{name}: expected a positive number (steps >= 2), got {value}")
    nu = nu if nu is not None else {"burgers1d": 0.01, "ns2d": 1e-3}[pde]
    dt = dt if dt is not None else {"burgers1d": 0.01, "ns2d": 1.0}[pde]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    gen = torch.Generator().manual_seed(seed)
    coords = (
        (np.arange(resolution) + 0.5) / resolution
        if pde == "burgers1d"
        else np.arange(resolution) / resolution
    )
    with (
        _one_cpu_thread(device),
        h5py.File(tmp, "w") as f,
        tqdm(total=trajectories, desc=f"generate {pde}", unit="traj", disable=not progress) as bar,
    ):
        f.attrs.update({"pde": pde, "nu": nu, "boundary": "periodic"})
        t = np.arange(steps + 1) * dt if pde == "burgers1d" else np.arange(steps) * dt
        if pde == "burgers1d":
            f.create_dataset("x-coordinate", data=coords.astype(np.float32), track_times=False)
            f.create_dataset("t-coordinate", data=t.astype(np.float32), track_times=False)
            tensor = f.create_dataset(
                "tensor",
                (trajectories, steps, resolution),
                dtype=np.float32,
                chunks=(1, steps, resolution),
                track_times=False,
            )
        else:
            f.attrs["channels"] = ["vorticity"]
        for start in range(0, trajectories, batch):
            n = min(batch, trajectories - start)
            if pde == "burgers1d":
                u = solve_burgers(burgers_initial(n, resolution, gen).to(device), steps, dt, nu)
                tensor[start : start + n] = u.float().cpu().numpy()
            else:
                w = (
                    solve_ns(ns_initial(n, resolution, gen).to(device), steps, dt, nu)
                    .float()
                    .cpu()
                    .numpy()
                )
                for j in range(n):
                    g = f.create_group(f"{start + j:04d}")
                    g.create_dataset(
                        "data",
                        data=w[j][..., None],
                        chunks=(1, resolution, resolution, 1),
                        track_times=False,
                    )
                    g.create_dataset("grid/x", data=coords.astype(np.float32), track_times=False)
                    g.create_dataset("grid/y", data=coords.astype(np.float32), track_times=False)
                    g.create_dataset("grid/t", data=t.astype(np.float32), track_times=False)
            bar.update(n)
    os.replace(tmp, out)
    return out
