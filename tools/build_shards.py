"""Build a shard set: encode full grids, importance maps, every epoch's query sets -> zarr / tars.

The tool is ups/cli/build_shards.py, installed as the console script ``ups-build-shards``;
this file runs it from a checkout: ``python tools/build_shards.py --help``.
"""

from ups.cli.build_shards import main

if __name__ == "__main__":
    main()
