"""Frozen settings for every stage, built by the CLI or the API and validated here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from condense_pipeline.datasets import METHODS, Profile
from condense_pipeline.errors import UserError


@dataclass(frozen=True)
class MethodPreset:
    lr: float
    lr_pixel_space: bool  # M3D's lr is for [0, 1] pixels: converted per channel by 1 / std^2
    init: str  # "mix" needs a factor above 1 (the profile's, datasets.py); at factor 1 it is "real"
    clamp_each_step: bool  # False: the images leave the pixel range until the last step


# Image learning rates and parameterisation from the papers' code (methods.md sections 2-4).
# Clamping: M3D's code clamps every iteration; DM's and DataDAM's never do. DM here clamps only
# after its last step: at IPC 1 on MNIST clamping every step scored 84.13 % against 87.13 %
# unclamped and 87.00 % clamped after the last step (2, 2 and 1 initial sets, 500 steps, K = 200,
# M = 32, validation split: `benchmarks/ipc1_factors.py --clamp step|never|end`, RESULTS.md
# "MNIST IPC 1", issue 16). DataDAM likewise: 84.31 % clamped after the last step against 82.83 %
# every step (MNIST IPC 1, validation, 1000 steps, 5 runs; RESULTS.md "MNIST at IPC 1 and 10").
PRESETS = {
    "dm": MethodPreset(lr=1.0, lr_pixel_space=False, init="real", clamp_each_step=False),
    # m3d's lr: 1, not the 10 of M3D's released configs. On validation, 1000 steps, IPC 1: MNIST
    # 90.42 % at factor 2 (77.77 % at lr 10), and at factor 1 84.15 / 53.83 / 34.01 % at lr
    # 1 / 10 / 100; digits at factor 1 84.0 / 56.7 / 28.0 % (RESULTS.md "M3D's preset and the
    # default method").
    "m3d": MethodPreset(lr=1.0, lr_pixel_space=True, init="mix", clamp_each_step=True),
    "datadam": MethodPreset(lr=1.0, lr_pixel_space=False, init="real", clamp_each_step=False),
}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


@dataclass(frozen=True)
class StatsConfig:
    """The statistics pass. `methods`: which methods' statistics to compute."""

    methods: tuple[str, ...]
    probes: int
    real_per_probe: int | None
    rff_dim: int
    init_pool: int
    seed: int = 0
    attention_power: float = 1.0
    pilot_per_class: int | None = None  # None: pilot_size(real_per_probe)
    workers: int | None = None  # None: one per GPU, or CPUs minus one for reading
    shards_per_unit: int = 8
    batch_size: int = 512
    # decoded images a stats worker holds before forwarding them probe by probe (and at each
    # checkpoint): bounds its memory (about twice this at a flush) whatever K and C
    buffer_mib: int = 512
    max_bad_fraction: float = 0.01
    stall_timeout_s: float = 600.0
    # at most one commit (every worker writes its accumulator) per interval; 0: after every unit
    commit_interval_s: float = 300.0
    # Random by default: on MNIST IPC 1 a bank of 5 one-epoch experts scored 86.74 % against the
    # random bank's 88.69 % (RESULTS.md "Trained probes", `evaluate --runs 5` on test).
    trained_probes: int = 0  # probes 0..N-1 are blended experts (train-probes); 0: all random
    experts: int = 0  # the experts those probes draw from (RUN/experts/); 0: every one trained

    def __post_init__(self):
        for m in self.methods:
            check_method(m)
        if not 0 <= self.trained_probes <= self.probes:
            raise UserError(f"--trained-probes must be between 0 and --probes ({self.probes})")
        if self.experts < 0:
            raise UserError("--experts must be 0 (every trained expert) or more")
        if self.probes < 1:
            raise UserError("--probes must be at least 1")
        if self.real_per_probe is not None and self.real_per_probe < 1:
            raise UserError("--real-per-probe must be a positive number or 'all'")
        if self.stall_timeout_s <= 0:
            raise UserError("--stall-timeout must be a positive number of seconds")
        if self.commit_interval_s < 0:
            raise UserError("--commit-interval must be 0 or a positive number of seconds")


@dataclass(frozen=True)
class CondenseConfig:
    """One condensation. Everything here names its output folder, so reruns resume it."""

    method: str
    ipc: int
    steps: int
    lr: float
    factor: int
    init: str
    iters_per_probe: int
    seed: int = 0
    targets: str = "bank"  # or "online": the papers' fresh network and real batch per step
    batch_real: int = 256
    attention_weight: float = 100.0
    embedding_weight: float = 1.0
    momentum: float = 0.5
    # True: clamp to the valid pixel range after every step; False: only after the last one
    clamp_each_step: bool = True
    classes: tuple[int, ...] | None = None  # None: every class
    groups: int | None = None  # None: one group per GPU (CPU-only: one per node)
    chunk: int | None = None  # stored images per forward; None: from the device's free memory
    stall_timeout_s: float = 600.0  # fail when no group has made a step for this long
    # weight of the cross-entropy of the synthetic images under one trained expert (DANCE and
    # NCFM's calibration); 0: off
    calibration: float = 0.0

    def __post_init__(self):
        check_method(self.method)
        if self.calibration < 0:
            raise UserError("--calibration must be 0 (off) or a positive weight")
        if self.calibration and self.targets != "bank":
            raise UserError("--calibration works with --targets bank (the trained probes')")
        if self.ipc < 1:
            raise UserError("--ipc must be at least 1")
        if self.init not in ("real", "noise", "mix"):
            raise UserError(f"--init must be real, noise or mix, got {self.init!r}")
        if self.targets not in ("bank", "online"):
            raise UserError(f"--targets must be bank or online, got {self.targets!r}")
        if self.factor < 1:
            raise UserError("--factor must be at least 1")
        if self.stall_timeout_s <= 0:
            raise UserError("--stall-timeout must be a positive number of seconds")
        if self.chunk is not None and self.chunk < 1:
            raise UserError("--chunk must be at least 1 image")
        if self.groups is not None and self.groups < 1:
            raise UserError("--groups must be at least 1")

    @property
    def preset(self) -> MethodPreset:
        return PRESETS[self.method]

    def folder_name(self) -> str:
        """Per-config folder: settings that change the images are hashed; grouping, chunking and
        the stall timeout are not (they change the images only by float32 rounding)."""
        fields = asdict(self)
        for name in ("groups", "chunk", "stall_timeout_s"):
            fields.pop(name)
        if not self.calibration:  # off: the folders of condensations before it keep their names
            fields.pop("calibration")
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
        return f"ipc{self.ipc}-{self.method}-{digest}"


def condense_config(profile: Profile, method: str, ipc: int, **overrides) -> CondenseConfig:
    """A CondenseConfig with the method preset and profile defaults; None overrides are ignored."""
    check_method(method)
    preset = PRESETS[method]
    cfg = CondenseConfig(
        method=method,
        ipc=ipc,
        steps=profile.steps_for(method),
        lr=preset.lr,
        factor=profile.factor_for(method),
        init=preset.init,
        iters_per_probe=profile.iters_per_probe_for(method),
        clamp_each_step=preset.clamp_each_step,
    )
    given = {k: v for k, v in overrides.items() if v is not None}
    factor = given.get("factor", cfg.factor)
    if "init" not in given and factor == 1 and cfg.init == "mix":
        given["init"] = "real"  # mix only makes sense with a factor above 1
    if profile.resolution % factor:
        raise UserError(f"--factor must divide the resolution {profile.resolution}")
    return replace(cfg, **given)


@dataclass(frozen=True)
class TrainProbesConfig:
    """The training stage of trained probes: `experts` ConvNets, `epochs` each (the recipe's
    other settings are ExpertRecipe's defaults). `seed`: the bank seed the experts derive from."""

    experts: int
    epochs: int
    seed: int = 0
    workers: int | None = None  # None: one per GPU, or one CPU worker

    def __post_init__(self):
        if self.experts < 1:
            raise UserError("--experts must be at least 1")
        if self.epochs < 1:
            raise UserError("--epochs must be at least 1")


DEFAULT_EXPERTS = 10  # DANCE and NCFM train 20; a brief training makes fewer affordable to test
# Epochs per expert: a few passes (MNIST is near 98 % after 2); digits has 1,437 images.
EXPERT_EPOCHS = {"digits": 30}
DEFAULT_EXPERT_EPOCHS = 2


def train_probes_config(profile: Profile, **overrides) -> TrainProbesConfig:
    """A TrainProbesConfig with the profile's defaults; None overrides are ignored."""
    cfg = TrainProbesConfig(
        experts=DEFAULT_EXPERTS,
        epochs=EXPERT_EPOCHS.get(profile.name, DEFAULT_EXPERT_EPOCHS),
    )
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


# What `stats` keeps without --init-pool and without a condensation to size it for: enough for
# IPC 10 with any method's preset and a random-real baseline of EVAL_RUNS runs.
DEFAULT_POOL_IPC = 10
EVAL_RUNS = 5  # evaluation runs per set (`evaluate --runs`)


def init_images(ipc: int, factor: int, init: str) -> int:
    """Real images per class the initialisation takes: the first ones of the init pool."""
    return {"real": ipc, "mix": ipc * factor * factor, "noise": 0}[init]


def init_pool(cond: CondenseConfig, baseline_runs: int = 0) -> int:
    """The init pool a condensation needs per class: its initialisation's images, then
    `baseline_runs` disjoint subsets of IPC images for the evaluation's random-real baseline
    (so no baseline run trains on the condensed set's starting images, nor on another run's)."""
    return init_images(cond.ipc, cond.factor, cond.init) + baseline_runs * cond.ipc


def check_pool(have: list[int], cond: CondenseConfig, baseline_runs: int = 0) -> None:
    """Refuse a condensation (and its baseline) that per-class pools of `have` images cannot
    serve, with the flags that make statistics which can."""
    need = init_pool(cond, baseline_runs)
    short = [c for c in cond.classes or range(len(have)) if have[c] < need]
    if short:
        c = short[0]
        runs = f" and {baseline_runs} random-real subsets of {cond.ipc}" if baseline_runs else ""
        raise UserError(
            f"class {c} has {have[c]} initial images but --init {cond.init} at IPC {cond.ipc} "
            f"(factor {cond.factor}){runs} needs {need}: rerun stats with --init-pool {need} "
            "--overwrite (a class with fewer training images needs a lower --ipc or --runs)"
        )


def stats_config(
    profile: Profile, methods: tuple[str, ...], *, pool_for: int | None = None, **overrides
) -> StatsConfig:
    """A StatsConfig with the profile's defaults; None overrides are ignored, and
    real_per_probe="all" means every image under every probe. Without an `init_pool` override,
    the pool is `pool_for` (init_pool's answer for the condensation it serves) or, without one,
    enough for IPC 10 and EVAL_RUNS baseline runs with every method in `methods`."""
    if overrides.get("real_per_probe") == "all":
        overrides = {**overrides, "real_per_probe": None, "_all": True}
    use_all = overrides.pop("_all", False)
    if pool_for is None:
        pool_for = max(
            init_pool(condense_config(profile, m, DEFAULT_POOL_IPC), EVAL_RUNS) for m in methods
        )
    cfg = StatsConfig(
        methods=methods,
        probes=profile.probes,
        real_per_probe=profile.real_per_probe,
        rff_dim=profile.rff_dim,
        init_pool=pool_for,
    )
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    return replace(cfg, real_per_probe=None) if use_all else cfg
