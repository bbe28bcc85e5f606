"""Python API: the whole job (`run`) and its stages, as the CLI calls them."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from condense_pipeline import storage
from condense_pipeline.condense.targets import probe_order, scheduled_probe
from condense_pipeline.config import (
    CondenseConfig,
    StatsConfig,
    TrainProbesConfig,
    check_pool,
    condense_config,
    init_images,
    init_pool,
    stats_config,
    train_probes_config,
)
from condense_pipeline.datasets import Profile, data_home, get_profile
from condense_pipeline.errors import UserError
from condense_pipeline.evaluate.loader import read_manifest
from condense_pipeline.evaluate.protocol import EvalConfig, evaluate_condensed
from condense_pipeline.formats import (
    DATASET_JSON,
    EVAL_DIR,
    EXPORT_DIR,
    MANIFEST,
    TEST,
    TRAIN,
)
from condense_pipeline.pipeline import lineage, read
from condense_pipeline.pipeline.condense import (
    condense_dir,
    decoded_set,
    read_bank,
    run_condense,
)
from condense_pipeline.pipeline.export import export_condensed, write_dataset_card
from condense_pipeline.pipeline.stats import StatsResult, load_stats, run_stats, stats_dir
from condense_pipeline.pixels import normalise

log = logging.getLogger(__name__)

BASELINE_CLASSES_PER_READ = 100  # classes whose statistics are held at once for the baseline


@dataclass(frozen=True)
class RunConfig:
    """The whole job: stats -> condense -> export -> evaluate."""

    profile: Profile
    run_dir: str
    data: str
    test: str | None
    stats: StatsConfig
    condense: CondenseConfig
    evaluate: EvalConfig | None  # None: skip evaluation
    address: str | None = None
    overwrite: bool = False
    train_probes: TrainProbesConfig | None = None  # the experts' training, before the stats


@dataclass
class RunSummary:
    run_dir: str
    condense_dir: str
    seconds: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    condense: dict = field(default_factory=dict)  # groups run and reused, lost tasks rerun
    report: dict | None = None
    experts: dict | None = None  # the training stage's summary, when the bank has trained probes


def default_data(profile: Profile, split: str) -> str:
    """Where `prepare` put the dataset's split, with a clear line if it is not there."""
    path = storage.join(data_home(profile.name), split)  # the data home may be a URI
    if not storage.exists(storage.join(path, "dataset.json")):
        how = (
            "condense-pipeline prepare digits"
            if profile.name == "digits"
            else f"condense-pipeline prepare {profile.name} --source PATH"
        )
        raise UserError(f"no prepared {split} shards for {profile.name} at {path}: run `{how}`")
    return path


def run(cfg: RunConfig, progress=None) -> RunSummary:
    """Run (or resume) every stage of the job; each stage skips what is already done."""
    say = progress or (lambda line: None)
    # A wrong path or bucket fails now, before anything is written, not after hours of work
    # (the test split is otherwise first read by the last stage).
    for shards in (cfg.data, cfg.test):
        if shards is not None:
            storage.list_shards(shards)
    storage.resolve(cfg.run_dir)  # raises on a missing bucket or a bad URI
    # A pool the classes cannot fill fails now too, not after the pass.
    counts = read.load_dataset_info(cfg.data)["counts"]
    runs = cfg.evaluate.runs if cfg.evaluate is not None else 0
    check_pool([min(cfg.stats.init_pool, n) for n in counts], cfg.condense, runs)
    summary = RunSummary(cfg.run_dir, condense_dir(cfg.run_dir, cfg.condense))
    manifest = storage.join(cfg.run_dir, MANIFEST)
    record = storage.read_json(manifest) if storage.exists(manifest) else {"stages": {}}
    record.update(
        {
            "dataset": cfg.profile.name,
            "config": _jsonable(cfg),
            "versions": versions(),
        }
    )

    def stage(name, fn):
        say(f"== {name}")
        started = time.perf_counter()
        out = fn()
        summary.seconds[name] = round(time.perf_counter() - started, 2)
        record["stages"][name] = {"status": "done", "seconds": summary.seconds[name]}
        storage.write_json(manifest, record)
        return out

    if cfg.train_probes is not None:
        from condense_pipeline.pipeline.train_probes import run_train_probes

        summary.experts = stage(
            "train-probes",
            lambda: run_train_probes(
                cfg.profile,
                cfg.data,
                cfg.run_dir,
                cfg.train_probes,
                address=cfg.address,
                progress=say,
            ),
        )
    stats: StatsResult = stage(
        "stats",
        lambda: run_stats(
            cfg.profile,
            cfg.data,
            cfg.run_dir,
            cfg.stats,
            address=cfg.address,
            overwrite=cfg.overwrite,
            progress=say,
        ),
    )
    summary.stats = {**stats.summary, "reused": stats.reused}
    result = stage(
        "condense",
        lambda: run_condense(cfg.run_dir, cfg.condense, address=cfg.address, progress=say),
    )
    summary.condense = result.summary()
    stage("export", lambda: export(cfg.run_dir, cfg.condense, cfg.profile, result))
    if cfg.evaluate is not None:
        summary.report = stage(
            "evaluate",
            lambda: evaluate(
                cfg.run_dir, cfg.condense, cfg.profile, cfg.evaluate, cfg.test, say, use_ray=True
            ),
        )
    record["stats"] = summary.stats
    record["condense"] = summary.condense
    if summary.experts is not None:
        record["experts"] = summary.experts
    storage.write_json(manifest, record)
    return summary


def export(run_dir: str, cond: CondenseConfig, profile: Profile, result=None) -> dict:
    """Write the condensed set of `cond` as WebDataset, Parquet, previews and a manifest."""
    if result is None:
        result = run_condense(run_dir, cond)
    bank = read_bank(run_dir)
    images, labels = decoded_set(result, cond.factor)
    provenance = {
        "method": cond.method,
        "ipc": cond.ipc,
        "factor": cond.factor,
        "seed": cond.seed,
        "condense": cond.folder_name(),
        "dataset": bank["dataset"],
        "statistics": lineage.stats_fingerprint(bank),
        "condensation": lineage.condensation_fingerprint(bank, cond),
    }
    probe_of_step = None
    if cond.targets == "bank":  # online targets draw a fresh network every step
        order = probe_order(bank["spec"]["probes"], cond.seed)

        def probe_of_step(step: int) -> int:  # the loss log counts steps from 1
            return scheduled_probe(order, step - 1, cond.iters_per_probe)

    return export_condensed(
        images,
        labels,
        bank["class_names"],
        profile,
        storage.join(result.folder, EXPORT_DIR),
        provenance={**provenance, "bank_seed": bank["spec"]["seed"]},
        loss_log=result.history,
        probe_of_step=probe_of_step,
    )


def load_split(shards: list[str], profile: Profile) -> tuple[torch.Tensor, torch.Tensor]:
    """Every good image of a split in memory, read by Ray Data in parallel:
    (float normalised [n, C, H, W], labels [n])."""
    images, labels, _ = read.read_split(shards, profile, profile.num_classes)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    return normalise(pixels, profile.mean, profile.std), torch.from_numpy(labels)


def baseline_images(
    run_dir: str, cond: CondenseConfig, profile: Profile
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The real images the random-real baseline draws from: every class's init pool (a uniform
    random sample of the class, by the pool hash) after the images `cond` initialises from.
    (normalised [n, C, H, W], labels [n], keys [n]); one class file at a time."""
    skip = init_images(cond.ipc, cond.factor, cond.init)
    images, labels, keys = [], [], []
    for start in range(0, profile.num_classes, BASELINE_CLASSES_PER_READ):
        classes = list(range(start, min(start + BASELINE_CLASSES_PER_READ, profile.num_classes)))
        stats = load_stats(run_dir, classes)
        for i, c in enumerate(classes):
            pool, pool_keys = stats.pool(i)
            images.append(pool[skip:])
            labels.append(torch.full((len(pool) - skip,), c))
            keys += pool_keys[skip:]
    pixels = torch.cat(images).permute(0, 3, 1, 2)
    return normalise(pixels, profile.mean, profile.std), torch.cat(labels), keys


def evaluate(
    run_dir: str,
    cond: CondenseConfig,
    profile: Profile,
    cfg: EvalConfig,
    test: str | None = None,
    progress=None,
    *,
    split: str = TEST,
    use_ray: bool = False,
    baseline: bool = True,
    condensed: bool = True,
) -> dict:
    """The evaluation protocol on the exported set, next to random real subsets of the same IPC:
    run r draws its own from the init pools after the images the condensation started from.
    `baseline=False` trains the condensed set alone (the baseline depends only on the init pool,
    the IPC, the runs and the test split, so one evaluation serves every method of a run), and
    `condensed=False` the baseline alone (no export needed: the folder's config says the IPC and
    the initial images). Each finished run is kept, so a later evaluation reuses it.

    Tests on `test` shards, else on the prepared `split` (test, or validation to choose
    settings). Refuses an export of other statistics than the run directory holds, and a
    baseline the init pool cannot serve, before any training. `use_ray`: train the runs as Ray
    tasks (reading always uses Ray Data)."""
    if not (baseline or condensed):
        raise UserError("nothing to evaluate: both the condensed set and the baseline are off")
    folder = condense_dir(run_dir, cond)
    export_dir = storage.join(folder, EXPORT_DIR)
    bank = read_bank(run_dir)
    condensation = None
    if condensed:
        condensation = lineage.check_export(read_manifest(export_dir), bank, cond, export_dir)
    done = storage.read_json(storage.join(stats_dir(run_dir), storage.DONE))
    check_pool(lineage.pool_sizes(bank, done), cond, cfg.runs if baseline else 0)
    location = test or default_data(profile, split)
    shards = storage.list_shards(location)
    test_x, test_y = load_split(shards, profile)
    pool_x = pool_y = pool_keys = None
    if baseline:
        pool_x, pool_y, pool_keys = baseline_images(run_dir, cond, profile)
    info = read.load_dataset_info(location)
    inputs = {
        "condensation": condensation,
        "test": lineage.data_fingerprint(info, shards),
        "test_split": info["split"],
    }
    report = evaluate_condensed(
        export_dir if condensed else None,
        test_x,
        test_y,
        pool_x,
        pool_y,
        profile,
        profile.num_classes,
        cond.ipc,
        cfg,
        progress=progress,
        report_dir=storage.join(folder, EVAL_DIR),
        use_ray=use_ray,
        train_keys=pool_keys,
        inputs=inputs,
    )
    if condensed:  # the card states the condensed set's accuracy
        write_dataset_card(export_dir, profile.name, report)
    return report


def condense_dataset(
    ds,
    ipc: int = 10,
    method: str | None = None,
    *,
    work_dir: str,
    image_column: str = "image",
    label_column: str = "label",
    key_column: str | None = None,
    class_names: list[str] | None = None,
    profile: str = "imagenet",
    resolution: int | None = None,
    probes: int | None = None,
    real_per_probe: int | str | None = None,
    steps: int | None = None,
    seed: int = 0,
    trained_probes: int = 0,
    experts: int | None = None,
    expert_epochs: int | None = None,
    calibration: float = 0.0,
    progress=None,
):
    """Condense a Ray Dataset of images and integer labels 0..C-1 to `ipc` images per class.

    Image cells are encoded bytes or uint8 [H, W(, C)] arrays (what `ray.data.read_images`
    gives). Settings not given come from the named `profile` (resolution, normalisation, probe
    bank, steps), with the number of classes taken from the data. Without `key_column`, a hash
    of the image bytes keys each image. `work_dir` (local or an object store) holds the data as
    shards, the statistics, checkpoints and the export; calling again with the same work_dir
    resumes, so it must hold the same data. `trained_probes` N > 0: the first N probes blend
    `experts` ConvNets trained for `expert_epochs` on the data first (the profile's defaults
    when None); `calibration` > 0 adds the cross-entropy under one of them. Returns the
    condensed set as a Ray Dataset with the export's Parquet columns (formats.PARQUET_COLUMNS).
    """
    from condense_pipeline.evaluate.loader import load_condensed_ray
    from condense_pipeline.prepare.raydata import write_ray_dataset

    base = get_profile(profile, resolution)
    data = storage.join(work_dir, "data", TRAIN)
    if storage.exists(storage.join(data, DATASET_JSON)):
        info = read.load_dataset_info(data)
    else:
        info = write_ray_dataset(
            ds,
            base.name,
            data,
            channels=base.channels,
            image_column=image_column,
            label_column=label_column,
            key_column=key_column,
            class_names=class_names,
        )
    prof = replace(base, num_classes=len(info["classes"]))
    if method is None:
        from condense_pipeline.pipeline.estimate import choose_method, cluster_plan

        method, why = choose_method(prof, ipc, probes, cluster_plan())
        log.info("method %s: %s", method, why)
    cond = condense_config(prof, method, ipc, steps=steps, seed=seed, calibration=calibration)
    train = None
    if trained_probes:
        # the bank's seed (the stats' default), not the condensation's
        train = train_probes_config(prof, experts=experts, epochs=expert_epochs)
    cfg = RunConfig(
        profile=prof,
        run_dir=work_dir,
        data=data,
        test=None,
        stats=stats_config(
            prof,
            (method,),
            pool_for=init_pool(cond),
            probes=probes,
            real_per_probe=real_per_probe,
            trained_probes=trained_probes,
            experts=train.experts if train else None,
        ),
        condense=cond,
        evaluate=None,
        train_probes=train,
    )
    summary = run(cfg, progress)
    return load_condensed_ray(storage.join(summary.condense_dir, EXPORT_DIR))


def versions() -> dict:
    import ray

    from condense_pipeline import __version__

    return {
        "condense_pipeline": __version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
    }


def _jsonable(cfg: RunConfig) -> dict:
    d = asdict(cfg)
    d["profile"] = cfg.profile.name
    d["resolution"] = cfg.profile.resolution
    return d


__all__ = ["RunConfig", "run", "export", "evaluate", "condense_dataset", "default_data"]
