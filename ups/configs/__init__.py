"""The shipped YAML configs (package data): ``--config NAME`` finds ``NAME.yaml`` here.

``--config burgers1d_codec`` (or ``burgers1d_codec.yaml``) names one of these files when no such
path exists; a path always wins. The lookup is :func:`pipeline.cli.resolve_config`, which the
command-line mains in :mod:`ups.cli` point at this package. In a checkout, ``configs/`` holds
symlinks to these files, so ``--config configs/burgers1d_codec.yaml`` works too.
"""
