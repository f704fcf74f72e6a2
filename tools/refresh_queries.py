"""Refresh a shard set's query sets from a model's error: write a layer of adaptive sets.

The tool is ups/cli/refresh_queries.py, installed as the console script ``ups-refresh``;
this file runs it from a checkout: ``python tools/refresh_queries.py --help``.
"""

from ups.cli.refresh_queries import main

if __name__ == "__main__":
    main()
