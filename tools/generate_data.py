"""Generate PDE trajectories in PDEBench's HDF5 layouts.

The tool is ups/cli/generate_data.py, installed as the console script ``ups-generate``;
this file runs it from a checkout: ``python tools/generate_data.py --help``.
"""

from ups.cli.generate_data import main

if __name__ == "__main__":
    main()
