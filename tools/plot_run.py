"""Plot a training run's loss and validation nRMSE curves to PNG.

The tool is ups/cli/plot_run.py, installed as the console script ``ups-plot-run``;
this file runs it from a checkout: ``python tools/plot_run.py --help``.
"""

from ups.cli.plot_run import main

if __name__ == "__main__":
    main()
