"""What the time-to-accuracy study compares (tools/bench/bench_time_to_accuracy.py): the latent
shard sets, the training configurations that read them, and the PDEs with their models. The
runner trains them; the report (time_to_accuracy_report.py) names, groups and draws them."""

from __future__ import annotations

from dataclasses import dataclass

DENSE_TAIL_SHARE = 0.1  # the cosine schedule's dense tail: about the last 10 % of epochs


@dataclass(frozen=True)
class ShardSetSpec:
    """How one latent shard set draws its query sets (ratio k_e / N per epoch)."""

    sampler: str
    start_ratio: float
    end_ratio: float | None = None  # None: a constant ratio
    dense_tail: bool = False  # the last ~10 % of epochs dense (DENSE_TAIL_SHARE)


SHARD_SETS = {
    "uniform 0.1": ShardSetSpec("uniform", 0.1),
    "uniform 0.3": ShardSetSpec("uniform", 0.3),
    "stratified 0.1": ShardSetSpec("stratified", 0.1),
    "stratified 0.3": ShardSetSpec("stratified", 0.3),
    "gradient 0.1": ShardSetSpec("gradient", 0.1),
    "gradient 0.3": ShardSetSpec("gradient", 0.3),
    "gradient cosine 1.0->0.2 + dense tail": ShardSetSpec("gradient", 1.0, 0.2, dense_tail=True),
}


@dataclass(frozen=True)
class Config:
    """One configuration: the latent shard set it reads, its train.py options, its plot line."""

    shards: str  # a key of SHARD_SETS; dense and on-the-fly runs read only its full fields
    options: tuple[str, ...] = ()
    refresh: bool = False  # error-based: adaptive.refresh_every=--refresh-every
    colour: str = "black"
    style: str = "-"


CONFIGS = {
    "dense": Config("uniform 0.1", ("loss.mode=dense",), colour="black"),
    # the UPT-style baseline: a uniform subset of the full fields drawn inside the loss each step
    "on-the-fly uniform 0.1": Config(
        "uniform 0.1",
        ("loss.mode=on_the_fly", "loss.query_sample_ratio=0.1"),
        colour="tab:gray",
        style=":",
    ),
    "uniform 0.1": Config("uniform 0.1", colour="tab:blue"),
    "uniform 0.3": Config("uniform 0.3", colour="tab:blue", style="--"),
    "stratified 0.1": Config("stratified 0.1", colour="tab:orange"),
    "stratified 0.3": Config("stratified 0.3", colour="tab:orange", style="--"),
    "gradient 0.1": Config("gradient 0.1", colour="tab:green"),
    "gradient 0.3": Config("gradient 0.3", colour="tab:green", style="--"),
    # error-based: the gradient sets first, then sets the model refreshes from its own error
    "error 0.1": Config("gradient 0.1", refresh=True, colour="tab:red"),
    "error 0.3": Config("gradient 0.3", refresh=True, colour="tab:red", style="--"),
    "cosine 1.0->0.2 + dense tail": Config(
        "gradient cosine 1.0->0.2 + dense tail", colour="tab:purple"
    ),
}


def step_kin(config: str) -> list[str]:
    """The configurations whose steps cost what ``config``'s do, refreshes aside: the same
    ratio per epoch and the same train.py options (their samplers differ only in which points
    they pick). --finish-in-time borrows their pace for a configuration with no history."""
    own = CONFIGS[config]

    def ratios(c: Config) -> tuple:
        spec = SHARD_SETS[c.shards]
        return spec.start_ratio, spec.end_ratio, spec.dense_tail

    return [
        name
        for name, other in CONFIGS.items()
        if name != config
        and not other.refresh
        and other.options == own.options
        and ratios(other) == ratios(own)
    ]


@dataclass(frozen=True)
class Pde:
    """A data set of the study: its grid, k_e rounding, and the models trained on it."""

    title: str
    ndim: int  # the grid's rank: a --data file must have it
    resolution: int
    smoke_resolution: int
    multiple: int  # schedule.multiple: k_e rounded to a multiple of it
    codec_steps: int  # the codec's training steps in the setup (--codec-steps)
    codec: tuple[str, ...] = ()  # overrides on the shipped {pde}_codec config
    operator: tuple[str, ...] = ()  # overrides on the shipped {pde}_operator config


PDES = {
    # the shipped models: codec test reconstruction 0.0121 in 8,000 steps, operator 0.07x persistence
    "ns2d": Pde("NS 2D", 2, 128, 32, 64, 8000),
    # Burgers 1D at 1024 points: models sized like the NS 2D ones but narrower (128 patches of 8
    # points -> 64 tokens of 32, width 128, a 4-block operator), the NS 2D codec batch, lr and
    # loader, all spelt out because the shipped burgers1d configs are tuned for the 2-core CPU
    # quick-start at 256 points. The forward loss at 0.25 with inverse 1.0: on the quick-start's
    # Burgers data forward 1.0 cost the rollout (test h1 0.0146, h16 0.338) where 0.25 kept it
    # (0.0124, 0.134) with the decoder still in the one-step loss (configs/burgers1d_operator.yaml).
    # At 1024 points on one H100 the codec reaches test reconstruction 0.0062 in 5,000 steps (158 s).
    "burgers1d": Pde(
        "Burgers 1D",
        1,
        1024,
        128,
        32,
        5000,
        codec=(
            "codec.encoder.patch=8",
            "codec.encoder.dim=128",
            "codec.encoder.depth=2",
            "codec.encoder.heads=4",
            "codec.encoder.num_tokens=64",
            "codec.encoder.latent_dim=32",
            "codec.decoder.dim=128",
            "codec.decoder.depth=3",
            "codec.decoder.heads=4",
            "batch_size=32",
            "optim.lr=1e-3",
            "loader.workers=4",
        ),
        operator=(
            "operator.dim=128",
            "operator.depth=4",
            "operator.heads=4",
            "loss.latent=1.0",
            "loss.forward=0.25",
            "loss.inverse=1.0",
            "loss.rollout_steps=0",
            "loader.workers=4",
        ),
    ),
}
SMOKE_MODEL = (  # tiny models for --smoke, on a CPU
    "codec.encoder.dim=32",
    "codec.encoder.depth=1",
    "codec.encoder.num_tokens=8",
    "codec.encoder.latent_dim=16",
    "codec.decoder.dim=32",
    "codec.decoder.depth=1",
    "operator.dim=32",
    "operator.depth=1",
    "device=cpu",
    "loader.workers=1",
    "loader.process=false",
)


# --smoke: tiny sizes, a few seconds per run on a CPU (options given still count)
SMOKE = {
    "trajectories": 12,
    "snapshots": 6,
    "field_epochs": 2,
    "codec_steps": 20,
    "codec_eval_every": 10,
    "steps": [20],
    "eval_every": 4,
    "batch": 8,
    "seeds": 1,
    "refresh_every": 1,
}


def dense_tail_epochs(epochs: int) -> int:
    return max(1, round(DENSE_TAIL_SHARE * epochs))
