"""Refresh a shard set's query sets from a model's error: write a layer of adaptive sets.

ups-refresh SHARDS --checkpoint RUN/checkpoint.pt --epochs A:B [key=value ...]
    e.g. adaptive.power=0.5 adaptive.alpha=0.3 adaptive.mix=0.0 layer=latest device=cuda
(in a checkout also python tools/refresh_queries.py ...)

The checkpoint is a training run's on SHARDS; its stage's per-point loss (codec: reconstruction,
operator: the forward and inverse terms) gives q, and the epochs [A, B) get new sets drawn from
it, written beside the set in layers/<id>/ (the set itself does not change). Training reads a
layer with layer=<id> (or layer=latest); ups-inspect lists and plots layers.
"""

from __future__ import annotations

import sys

from pipeline.cli import fail, parse_config
from pipeline.config import ConfigError
from pipeline.records import ShardError
from ups.models.checkpoint import CheckpointError
from ups.training.refresh import RefreshConfig, refresh_from_checkpoint


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and "=" not in argv[0]:
        argv[0] = f"shards={argv[0]}"  # the shard set, given first
    for i, arg in enumerate(argv):  # A:B stays a string (YAML 1.1 reads 2:6 as the number 126)
        if arg.startswith(("epochs=", "--epochs=")):
            key, _, value = arg.partition("=")
            argv[i] = f"{key}='{value}'"
        elif arg == "--epochs" and i + 1 < len(argv):
            argv[i + 1] = f"'{argv[i + 1]}'"
    cfg = parse_config(RefreshConfig, argv, __doc__)
    try:
        layer_id = refresh_from_checkpoint(cfg)
    except (ShardError, ConfigError, CheckpointError) as err:
        fail(" ".join(str(err).split()))
    except OSError as err:
        fail(
            f"{err.filename or cfg.shards}: {err.strerror or err}; rerun the same command to "
            "finish the layer"
        )
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to finish the layer", file=sys.stderr)
        raise SystemExit(130) from None
    first, stop = cfg.epoch_range
    print(f"layer {layer_id} (epochs {first}:{stop}) in {cfg.shards}/layers/{layer_id}")


if __name__ == "__main__":
    main()
