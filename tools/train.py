"""Train a stage streaming from shards.

The tool is ups/cli/train.py, installed as the console script ``ups-train``;
this file runs it from a checkout: ``python tools/train.py --help``.
"""

from ups.cli.train import main

if __name__ == "__main__":
    main()
