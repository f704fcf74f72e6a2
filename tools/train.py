"""Train a stage streaming from shards.

python tools/train.py --config configs/burgers1d.yaml [key=value ...]
    stage=codec     encoder + decoder on field shards (build_shards with encoder=null)
    stage=operator  latent operator + decoder fine-tuning on latent shards (codec_checkpoint=...)
    loss.mode=sparse|dense|on_the_fly [loss.query_sample_ratio=0.1]   the three ways to get query points
    resume=runs/x/checkpoint.pt       continue exactly where a run stopped
Several processes: torchrun --nproc_per_node N tools/train.py ...
"""

from __future__ import annotations

from pipeline.cli import fail, parse_config
from pipeline.config import ConfigError
from pipeline.records import ShardError
from ups.evaluation import format_metrics
from ups.models.checkpoint import CheckpointError
from ups.training.train import TrainConfig, train


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(TrainConfig, argv, __doc__)
    try:
        metrics = train(cfg)
    except (ShardError, ConfigError, CheckpointError) as err:
        fail(str(err))
    if metrics:
        print(
            f"\n{cfg.stage} stage: nRMSE on the dense test grid, physical space ({cfg.out}/test_metrics.json)"
        )
        print(format_metrics(metrics))


if __name__ == "__main__":
    main()
