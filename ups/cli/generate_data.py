"""Generate PDE trajectories in PDEBench's HDF5 layouts.

ups-generate --pde {burgers1d,ns2d} --out FILE.h5 --trajectories N --steps T \\
    --resolution R --seed S [--nu NU] [--dt DT] [--device cuda]
(in a checkout also python tools/generate_data.py ...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.cli import parse_config
from pipeline.config import check
from pipeline.sources.generate import generate


@dataclass
class GenerateConfig:
    pde: Literal["burgers1d", "ns2d"] = "burgers1d"
    out: str = "data/burgers1d.h5"
    trajectories: int = 64
    steps: int = 50  # snapshots per trajectory, initial condition included
    resolution: int = 256
    seed: int = 0
    nu: float | None = None  # viscosity; None: 0.01 (Burgers), 1e-3 (NS)
    dt: float | None = None  # time between snapshots; None: 0.01 (Burgers), 1.0 (NS)
    device: str = "cpu"
    batch: int = 16  # trajectories integrated together

    def __post_init__(self) -> None:
        check(self.trajectories >= 1, "trajectories", "an integer >= 1", self.trajectories)
        check(self.steps >= 2, "steps", "an integer >= 2", self.steps)
        check(self.resolution >= 8, "resolution", "an integer >= 8", self.resolution)
        check(self.nu is None or self.nu > 0, "nu", "a positive number", self.nu)
        check(self.dt is None or self.dt > 0, "dt", "a positive number", self.dt)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(GenerateConfig, argv, __doc__)
    path = generate(
        cfg.pde,
        cfg.out,
        cfg.trajectories,
        cfg.steps,
        cfg.resolution,
        cfg.seed,
        cfg.nu,
        cfg.dt,
        cfg.device,
        cfg.batch,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
