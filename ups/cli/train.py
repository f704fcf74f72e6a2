"""Train a stage streaming from shards.

ups-train --config burgers1d_codec [key=value ...]
ups-train --config burgers1d_operator [key=value ...]
    --config takes a shipped config by name or a YAML path (in a checkout these two are also
    configs/burgers1d_codec.yaml and configs/burgers1d_operator.yaml, and python tools/train.py
    runs the same tool)
    stage=codec     encoder + decoder on field shards (build_shards with encoder=null)
    stage=operator  latent operator + decoder fine-tuning on latent shards (codec_checkpoint=...)
    loss.mode=sparse|dense|on_the_fly [loss.query_sample_ratio=0.1]   the three ways to get query points
    resume=runs/x/checkpoint.pt       continue exactly where a run stopped
Several processes: torchrun --nproc_per_node N -m ups.cli.train ... (or ... tools/train.py ...)
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.cli import fail, parse_config
from pipeline.config import ConfigError
from pipeline.records import ShardError
from ups.cli import CONFIGS
from ups.evaluation import format_metrics
from ups.models.checkpoint import CheckpointError
from ups.training.train import TrainConfig, train


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(TrainConfig, argv, __doc__, CONFIGS)
    try:
        metrics = train(cfg)
    except (ShardError, ConfigError, CheckpointError) as err:
        fail(" ".join(str(err).split()))  # one line, also for torch's multi-line messages
    except OSError as err:  # writing a checkpoint, a model or a log: a full disk, a read-only out
        fail(f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err))
    except KeyboardInterrupt:
        resume = Path(cfg.out) / "checkpoint.pt"
        hint = f"; resume={resume} continues from its last checkpoint" if resume.exists() else ""
        print(f"interrupted{hint}", file=sys.stderr)
        raise SystemExit(130) from None
    if metrics:
        print(
            f"\n{cfg.stage} stage: nRMSE on the dense test grid, physical space ({cfg.out}/test_metrics.json)"
        )
        print(format_metrics(metrics))


if __name__ == "__main__":
    main()
