"""The command-line tools, installed as console scripts (``[project.scripts]`` in
pyproject.toml); ``tools/<name>.py`` in a checkout runs the same ``main``.

    ups-generate      ups.cli.generate_data    PDE trajectories in PDEBench's HDF5 layouts
    ups-build-shards  ups.cli.build_shards     a shard set: latents, importance, query sets
    ups-train         ups.cli.train            train a stage streaming from shards
    ups-inspect       ups.cli.inspect_shards   verify and summarise a shard set, plot queries
    ups-refresh       ups.cli.refresh_queries  a layer of adaptive query sets from a checkpoint
    ups-plot-run      ups.cli.plot_run         a run's loss and nRMSE curves to PNG

``--config`` of ups-build-shards and ups-train takes a YAML path or the name of a shipped config
(:data:`CONFIGS`; ``--help`` lists them).
"""

CONFIGS = "ups.configs"
"""The package whose ``*.yaml`` files ``--config NAME`` resolves to (see :mod:`ups.configs`)."""
