"""Check a shard set and summarise it; optionally plot one snapshot's query sets.

The tool is ups/cli/inspect_shards.py, installed as the console script ``ups-inspect``;
this file runs it from a checkout: ``python tools/inspect_shards.py --help``.
"""

import sys

from ups.cli.inspect_shards import main

if __name__ == "__main__":
    sys.exit(main())
