"""The `condense-pipeline` command. It builds frozen configs, calls the API and prints progress;
a UserError becomes one line on stderr and exit code 2. HELP is what `--help` shows."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time

import typer

from condense_pipeline import storage
from condense_pipeline.config import (
    EVAL_RUNS,
    CondenseConfig,
    condense_config,
    init_pool,
    stats_config,
    train_probes_config,
)
from condense_pipeline.datasets import METHODS, PROFILES, get_profile
from condense_pipeline.errors import Stopped, UserError
from condense_pipeline.formats import TEST, TRAIN, VALIDATION
from condense_pipeline.report import write_report

HELP = """Condense an image dataset to a few synthetic images per class (DM, M3D, DataDAM) on Ray.

A small training set that trains a model almost as well as the full one: for fast architecture
and hyperparameter search, replay memory, or cheap sharing. `run` does the whole job and writes
WebDataset and Parquet shards, a preview, an evaluation against random real images, and an HTML
report. Try: condense-pipeline run digits --ipc 10
"""
# Commands that start Ray; the others stay quick (no Ray import).
RAY_COMMANDS = {"prepare", "train-probes", "stats", "condense", "export", "evaluate", "run"}
# Ray's driver folds lines from different workers that differ only in their numbers (its log
# deduplication), so parallel evaluation runs and condensation groups would show one progress
# line for all of them. Ray reads this when it is imported, which happens after this module.
PROGRESS_LINES = r"^(eval .+ seed \d+: (resuming at )?epoch |group \d+: (resuming at )?step )"
os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", PROGRESS_LINES)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, rich_markup_mode=None)
say = typer.echo

# Options shared by several commands.
ADDRESS = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray).")
SEED = typer.Option(0, help="Seed of the probe bank / condensation.")
STALL = typer.Option(
    None,
    "--stall-timeout",
    help="Fail a stage when no worker progresses this long (s, default 600).",
)
COMPILE = typer.Option(
    False,
    "--compile",
    help="torch.compile the training network (20-30 s per run, then ~1.5x faster steps; "
    "needs a C++ compiler).",
)
COMMIT = typer.Option(
    None,
    "--commit-interval",
    help="Seconds between the stats pass's commits (default 300; 0: after every unit). A "
    "stopped or crashed pass resumes from the last commit.",
)
GROUPS = typer.Option(
    None, help="Class groups (default: one per GPU, or per node); one runs per GPU at a time."
)
CHUNK = typer.Option(
    None, help="Stored images per forward (default: from the device's free memory)."
)
BATCH_REAL = typer.Option(None, help="Real images per class per step (--targets online).")
LR = typer.Option(None, help="Image learning rate (m3d: in [0, 1] pixel space).")
FACTOR = typer.Option(None, help="Multi-formation factor f (f^2 images per stored).")
INIT = typer.Option(None, help="real, noise or mix.")
ITERS_PER_PROBE = typer.Option(None, help="Consecutive steps per probe.")
TRAINED_PROBES = typer.Option(
    None, help="Probes that blend trained experts instead of random networks (default 0)."
)
EXPERTS = typer.Option(None, help="Experts to train / draw trained probes from (default 10).")
CALIBRATION = typer.Option(
    None, help="Weight of the cross-entropy under a trained expert (default 0: off)."
)


def _classes(spec: str | None) -> tuple[int, ...] | None:
    """'0-99' or '1,5,7' -> class indices."""
    if not spec:
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--classes takes indices like 0-99 or 1,5,7, not {spec!r}") from None
    return tuple(out)


def _methods(method: str) -> tuple[str, ...]:
    if method == "all":
        return METHODS
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)} or all")
    return (method,)


@app.callback()
def _options(
    ctx: typer.Context,
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Show Ray's own log lines and this tool's INFO logs."
    ),
) -> None:
    if verbose:
        logging.getLogger().setLevel(logging.INFO)
    elif ctx.invoked_subcommand in RAY_COMMANDS:
        _quiet_ray()


def _quiet_ray() -> None:
    """Keep Ray's start-up lines (token authentication, "Started a local Ray instance") and Ray
    Data's execution plans and logged progress off the terminal: errors still show, Ray Data's
    warnings too, and everything stays in Ray's log files. Ray Data's progress bars stay."""
    import ray.data  # noqa: F401  (importing it sets up the handlers quietened here)

    for handler in logging.getLogger("ray").handlers:
        handler.setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.WARNING)


@app.command()
def datasets() -> None:
    """List the dataset profiles."""
    say(f"{'name':14} {'classes':>7} {'px':>4} {'ch':>3} {'depth':>5} {'K':>5} {'M':>4}  about")
    for p in PROFILES.values():
        m = "all" if p.real_per_probe is None else p.real_per_probe
        say(
            f"{p.name:14} {p.num_classes:7d} {p.resolution:4d} {p.channels:3d} {p.depth:5d} "
            f"{p.probes:5d} {m!s:>4}  {p.description}"
        )


@app.command()
def prepare(
    dataset: str,
    source: str = typer.Option(None, help="What to convert (not needed for digits)."),
    out: str = typer.Option(None, help="Output folder (default: the per-user data home)."),
    split: str = typer.Option(None, help="train or test, for sources holding one split."),
    labels: str = typer.Option(None, help="Labels file of a flat image folder."),
    shard_size: int = typer.Option(1000, help="Samples per shard."),
    seed: int = typer.Option(0, help="Shuffle seed."),
    validation: int = typer.Option(
        None,
        help="Training images per class held out as the validation split (default: the profile's).",
    ),
) -> None:
    """Convert a source into shuffled WebDataset train/validation/test shards plus dataset.json."""
    from condense_pipeline.prepare import prepare_dataset

    get_profile(dataset)
    started = time.perf_counter()
    summary = prepare_dataset(
        dataset,
        source,
        out,
        split=split,
        labels=labels,
        shard_size=shard_size,
        seed=seed,
        validation=validation,
    )
    for name, s in summary.items():
        say(f"{name}: {s['samples']} samples in {s['shards']} shards at {s['path']}")
    say(f"prepared {dataset} in {time.perf_counter() - started:.1f} s")


def _data(profile, data: str | None, split: str) -> str:
    from condense_pipeline.api import default_data

    return data or default_data(profile, split)


def _dry_run_stats(profile, cfg, data: str) -> None:
    from condense_pipeline.pipeline.estimate import stats_plan

    for line in stats_plan(profile, cfg, data):
        say(line)


@app.command("train-probes")
def train_probes(
    dataset: str,
    out: str = typer.Option(..., help="Run directory (the experts go to RUN/experts/)."),
    data: str = typer.Option(None, help="Training shards (default: the prepared train split)."),
    experts: int = EXPERTS,
    epochs: int = typer.Option(None, help="Epochs per expert (default: the profile's)."),
    resolution: int = typer.Option(None, help="Image size (imagenet: 64 or 128)."),
    workers: int = typer.Option(
        None, help="Ray Train workers on GPUs (default: one per GPU; without GPUs: one)."
    ),
    seed: int = SEED,
    address: str = ADDRESS,
    dry_run: bool = typer.Option(False, help="Print the cost and compute nothing."),
) -> None:
    """Train the experts of trained probes on the training shards (Ray Train; resumes)."""
    from condense_pipeline.pipeline.train_probes import run_train_probes

    profile = get_profile(dataset, resolution)
    cfg = train_probes_config(profile, experts=experts, epochs=epochs, seed=seed, workers=workers)
    shards = _data(profile, data, TRAIN)
    if dry_run:
        return _dry_run_train(profile, cfg, shards)
    s = run_train_probes(profile, shards, out, cfg, address=address, progress=say)
    say(f"experts: {s['trained']} trained, {s['reused']} reused, {s['seconds']} s")


def _dry_run_train(profile, cfg, data: str) -> None:
    from condense_pipeline.pipeline.estimate import train_plan

    for line in train_plan(profile, cfg, data):
        say(line)


@app.command()
def stats(
    dataset: str,
    out: str = typer.Option(..., help="Run directory."),
    data: str = typer.Option(None, help="Training shards: folder, glob or brace pattern."),
    method: str = typer.Option("all", help="dm, m3d, datadam or all."),
    probes: int = typer.Option(None, help="Probe bank size K."),
    real_per_probe: str = typer.Option(None, help="Real images per class per probe M, or all."),
    rff_dim: int = typer.Option(None, help="M3D random Fourier features R (a multiple of 5)."),
    init_pool: int = typer.Option(
        None, help="Initial images kept per class (default: enough for IPC 10 and 5 eval runs)."
    ),
    attention_power: float = typer.Option(None, help="DataDAM's power p."),
    trained_probes: int = TRAINED_PROBES,
    experts: int = typer.Option(
        None, help="Experts the trained probes draw from (default: every one in RUN/experts)."
    ),
    resolution: int = typer.Option(None, help="Image size (imagenet: 64 or 128)."),
    workers: int = typer.Option(None, help="Stats workers (default: one per GPU, or CPUs - 1)."),
    max_bad_fraction: float = typer.Option(None, help="Fail above this fraction of bad samples."),
    seed: int = SEED,
    address: str = ADDRESS,
    stall_timeout: float = STALL,
    commit_interval: float = COMMIT,
    overwrite: bool = typer.Option(False, help="Replace conflicting statistics."),
    dry_run: bool = typer.Option(False, help="Print the cost and compute nothing."),
) -> None:
    """Compute the probe bank's per-class statistics (one pass over the shards)."""
    from condense_pipeline.pipeline.stats import run_stats

    profile = get_profile(dataset, resolution)
    cfg = stats_config(
        profile,
        _methods(method),
        probes=probes,
        real_per_probe=_int_or_all(real_per_probe),
        rff_dim=rff_dim,
        init_pool=init_pool,
        attention_power=attention_power,
        trained_probes=trained_probes,
        experts=experts,
        workers=workers,
        max_bad_fraction=max_bad_fraction,
        seed=seed,
        stall_timeout_s=stall_timeout,
        commit_interval_s=commit_interval,
    )
    shards = _data(profile, data, TRAIN)
    if dry_run:
        return _dry_run_stats(profile, cfg, shards)
    result = run_stats(
        profile, shards, out, cfg, address=address, overwrite=overwrite, progress=say
    )
    _print_stats(result.summary, result.reused)
    if overwrite:
        _print_invalidated(out)


def _print_invalidated(run_dir: str) -> None:
    """The condensations that statistics replaced with --overwrite made stale."""
    from condense_pipeline.pipeline.condense import read_bank
    from condense_pipeline.pipeline.lineage import stale_condensations

    for name in stale_condensations(run_dir, read_bank(run_dir)):
        say(f"invalidated condense/{name}: made from the replaced statistics; condense redoes it")


def _int_or_all(value: str | None):
    if value is None or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise UserError(f"--real-per-probe takes a number or 'all', not {value!r}") from None


def _print_stats(s: dict, reused: bool) -> None:
    if reused:
        say(f"statistics reused ({s['images']} images, computed in {s['seconds']} s)")
        return
    say(
        f"stats: {s['images']} images, {s['skipped']} skipped, {s['forwards']} probe forwards, "
        f"{s['seconds']} s, {s['images_per_s']} images/s on {s['workers']} {s['device']} worker(s)"
    )
    for shard, reasons in s["rejected"].items():
        say(f"  skipped in {shard}: {', '.join(f'{n} {r}' for r, n in reasons.items())}")
    for r in s.get("retries", []):
        say(f"  unit {r['unit'] + 1} rerun (attempt {r['attempt'] + 1}): {r['why']}")


def _print_condense(c: dict) -> None:
    say(f"condense: {c['groups_run']} group(s) run, {c['groups_reused']} reused")
    for r in c["retries"]:
        say(f"  group {r['group'] + 1} rerun (attempt {r['attempt'] + 1}): {r['why']}")


def _profile_of_run(run_dir: str):
    from condense_pipeline.condense.bank import BankSpec
    from condense_pipeline.pipeline.condense import read_bank

    bank = read_bank(run_dir)
    spec = BankSpec.from_json(bank["spec"])
    # the class count comes from the data (condense_dataset runs a profile on other data)
    profile = get_profile(bank["profile"], spec.resolution)
    return dataclasses.replace(profile, num_classes=spec.num_classes), bank


@app.command()
def condense(
    run_dir: str,
    ipc: int = typer.Option(..., help="Images per class (stored)."),
    method: str = typer.Option(None, help="dm, m3d or datadam (default: what the stats hold)."),
    iterations: int = typer.Option(None, help="Optimisation steps."),
    lr: float = LR,
    factor: int = FACTOR,
    init: str = INIT,
    iters_per_probe: int = ITERS_PER_PROBE,
    groups: int = GROUPS,
    chunk: int = CHUNK,
    classes: str = typer.Option(None, help="A subset, e.g. 0-99 or 1,5,7."),
    targets: str = typer.Option(None, help="bank (statistics) or online (the papers' way)."),
    batch_real: int = BATCH_REAL,
    calibration: float = CALIBRATION,
    seed: int = SEED,
    address: str = ADDRESS,
    stall_timeout: float = STALL,
    dry_run: bool = typer.Option(False, help="Print the cost and compute nothing."),
) -> None:
    """Optimise synthetic images per class against the statistics in RUN_DIR."""
    from condense_pipeline.pipeline.condense import run_condense

    profile, bank = _profile_of_run(run_dir)
    spec = bank["spec"]
    method, why = _method(method, profile, ipc, spec["probes"], address, spec["statistics"])
    cfg = condense_config(
        profile,
        method,
        ipc,
        steps=iterations,
        lr=lr,
        factor=factor,
        init=init,
        iters_per_probe=iters_per_probe,
        groups=groups,
        chunk=chunk,
        classes=_classes(classes),
        targets=targets,
        batch_real=batch_real,
        calibration=calibration,
        seed=seed,
        stall_timeout_s=stall_timeout,
    )
    say(f"method {method}: {why}")
    if dry_run:
        from condense_pipeline.pipeline.estimate import condense_plan

        for line in condense_plan(profile, cfg):
            say(line)
        return
    with _stoppable("finished groups and the groups' checkpoints are kept"):
        result = run_condense(run_dir, cfg, address=address, progress=say)
    _print_condense(result.summary())
    say(f"condensed {len(result.labels)} images into {result.folder}")


def _method(given, profile, ipc, probes, address, held=None) -> tuple[str, str]:
    """The method and why: as given, or the default chosen from the cluster's plan."""
    if given:
        return given, "given with --method"
    from condense_pipeline.pipeline.cluster import ensure_ray
    from condense_pipeline.pipeline.estimate import choose_method, cluster_plan

    ensure_ray(address)
    return choose_method(profile, ipc, probes, cluster_plan(), held)


def _load_condense_dir(folder: str):
    cfg_path = storage.join(folder, "config.json")
    if not storage.exists(cfg_path):
        raise UserError(f"{folder} is not a condensation folder (no config.json)")
    raw = storage.read_json(cfg_path)
    raw["classes"] = tuple(raw["classes"]) if raw["classes"] is not None else None
    cfg = CondenseConfig(**raw)
    run_dir = os.path.dirname(os.path.dirname(folder.rstrip("/")))
    return run_dir, cfg


@app.command()
def export(condense_dir: str) -> None:
    """Export a finished condensation (RUN_DIR/condense/<config>) as WebDataset and Parquet."""
    from condense_pipeline import api

    run_dir, cfg = _load_condense_dir(condense_dir)
    profile, _ = _profile_of_run(run_dir)
    s = api.export(run_dir, cfg, profile)
    say(f"exported {s['num_images']} images to {s['out_dir']}")


@app.command()
def evaluate(
    condense_dir: str,
    test: str = typer.Option(None, help="Test shards (default: the prepared --split)."),
    split: str = typer.Option(
        TEST, help="test, or validation (held out by prepare) to choose settings on."
    ),
    epochs: int = typer.Option(None, help="Training epochs (default: the profile's)."),
    runs: int = typer.Option(EVAL_RUNS, help="Training runs per set."),
    model: str = typer.Option("convnet", help="convnet, alexnet, vgg11 or resnet18."),
    baseline: bool = typer.Option(
        True, help="Train random real subsets of the same IPC too (the same for every method)."
    ),
    condensed: bool = typer.Option(
        True, help="Train the exported set (--no-condensed: the baseline alone, no export needed)."
    ),
    compile: bool = COMPILE,
    address: str = ADDRESS,
) -> None:
    """Train on the exported set and on random real subsets; test on the real test split.
    Each training run is a Ray task, so runs go in parallel as far as the cluster allows; each
    finished run is kept, so a rerun (stopped, or with more --runs) trains only what it lacks."""
    if split not in (TEST, VALIDATION):
        raise UserError(f"--split must be {TEST} or {VALIDATION}, not {split!r}")
    from condense_pipeline import api
    from condense_pipeline.evaluate.protocol import EvalConfig, check_compile
    from condense_pipeline.pipeline.cluster import ensure_ray

    run_dir, cfg = _load_condense_dir(condense_dir)
    profile, _ = _profile_of_run(run_dir)
    ecfg = EvalConfig(model=model, epochs=epochs or profile.eval_epochs, runs=runs, compile=compile)
    if compile:
        check_compile()
    ensure_ray(address)
    with _stoppable("finished evaluation runs are kept"):
        report = api.evaluate(
            run_dir,
            cfg,
            profile,
            ecfg,
            test,
            progress=say,
            split=split,
            use_ray=True,
            baseline=baseline,
            condensed=condensed,
        )
    _print_report(report)


def _accuracies(r: dict, std: bool = True) -> list[str]:
    """'condensed 96.88 ± 0.05%' and 'random real ...' for the sets a report holds."""
    sets = (("condensed", r["condensed"]), ("random real", r["random_real"]))
    return [f"{n} {s['mean']:.2f}" + (f" ± {s['std']:.2f}%" if std else "%") for n, s in sets if s]


def _print_report(r: dict) -> None:
    head = f"accuracy ({r['model']}, {r['epochs']} epochs, {r['runs']} runs): "
    say(head + " vs ".join(_accuracies(r)) + f" (IPC {r['ipc']})")


@app.command()
def run(
    dataset: str,
    ipc: int = typer.Option(10, help="Images per class (stored)."),
    method: str = typer.Option(None, help="dm, m3d or datadam (default: the profile's)."),
    data: str = typer.Option(None, help="Training shards (default: the prepared train split)."),
    test: str = typer.Option(None, help="Test shards (default: the prepared test split)."),
    out: str = typer.Option(None, help="Run directory (default: ./runs/DATASET-ipcN-METHOD)."),
    resolution: int = typer.Option(None, help="Image size (imagenet: 64 or 128)."),
    probes: int = typer.Option(None, help="Probe bank size K."),
    real_per_probe: str = typer.Option(None, help="Real images per class per probe M, or all."),
    iterations: int = typer.Option(None, help="Condensation steps."),
    lr: float = LR,
    factor: int = FACTOR,
    init: str = INIT,
    iters_per_probe: int = ITERS_PER_PROBE,
    groups: int = GROUPS,
    chunk: int = CHUNK,
    classes: str = typer.Option(None, help="Condense a subset, e.g. 0-99."),
    targets: str = typer.Option(None, help="bank (statistics) or online (the papers' way)."),
    batch_real: int = BATCH_REAL,
    trained_probes: int = TRAINED_PROBES,
    experts: int = EXPERTS,
    expert_epochs: int = typer.Option(None, help="Epochs per expert (default: the profile's)."),
    calibration: float = CALIBRATION,
    epochs: int = typer.Option(None, help="Evaluation epochs (default: the profile's)."),
    runs: int = typer.Option(EVAL_RUNS, help="Evaluation runs."),
    compile: bool = COMPILE,
    no_eval: bool = typer.Option(
        False, "--no-eval", help="Skip evaluation (the baseline's --runs images are still kept)."
    ),
    seed: int = SEED,
    address: str = ADDRESS,
    stall_timeout: float = STALL,
    commit_interval: float = COMMIT,
    overwrite: bool = typer.Option(False, help="Replace conflicting statistics."),
    dry_run: bool = typer.Option(False, help="Print the plan and its cost, compute nothing."),
) -> None:
    """The whole job: stats -> condense -> export -> evaluate (resumes when rerun)."""
    from condense_pipeline import api
    from condense_pipeline.evaluate.protocol import EvalConfig, check_compile

    profile = get_profile(dataset, resolution)
    if dataset == "digits" and data is None:
        _prepare_digits_once()
    train = _data(profile, data, TRAIN)
    method, why = _method(method, profile, ipc, probes, address)
    cond = condense_config(
        profile,
        method,
        ipc,
        steps=iterations,
        lr=lr,
        factor=factor,
        init=init,
        iters_per_probe=iters_per_probe,
        groups=groups,
        chunk=chunk,
        classes=_classes(classes),
        targets=targets,
        batch_real=batch_real,
        calibration=calibration,
        seed=seed,
        stall_timeout_s=stall_timeout,
    )
    tcfg = None
    if trained_probes:  # the experts are trained first, from the bank's seed
        tcfg = train_probes_config(profile, experts=experts, epochs=expert_epochs, seed=seed)
    scfg = stats_config(
        profile,
        (method,),
        # the baseline's images are kept with --no-eval too: a later `evaluate` draws them
        pool_for=init_pool(cond, runs),
        probes=probes,
        real_per_probe=_int_or_all(real_per_probe),
        trained_probes=trained_probes,
        experts=tcfg.experts if tcfg else None,
        seed=seed,
        stall_timeout_s=stall_timeout,
        commit_interval_s=commit_interval,
    )
    say(f"method {method}: {why}")
    if dry_run:
        from condense_pipeline.pipeline.estimate import condense_plan

        if tcfg:
            _dry_run_train(profile, tcfg, train)
        _dry_run_stats(profile, scfg, train)
        for line in condense_plan(profile, cond):
            say(line)
        return
    ecfg = None
    if not no_eval:
        ecfg = EvalConfig(epochs=epochs or profile.eval_epochs, runs=runs, compile=compile)
        if compile:
            check_compile()
        if test is None:
            test = _data(profile, None, TEST)
    cfg = api.RunConfig(
        profile=profile,
        run_dir=out or os.path.join("runs", f"{dataset}-ipc{ipc}-{method}"),
        data=train,
        test=test,
        stats=scfg,
        condense=cond,
        evaluate=ecfg,
        address=address,
        overwrite=overwrite,
        train_probes=tcfg,
    )
    with _stoppable("committed statistics, finished groups and finished evaluation runs are kept"):
        summary = api.run(cfg, progress=say)
    _print_stats(summary.stats, summary.stats["reused"])
    if overwrite:
        _print_invalidated(cfg.run_dir)
    _print_condense(summary.condense)
    say(f"method {method}: {why}")
    say("time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary.seconds.items()))
    if summary.report:
        _print_report(summary.report)
    say(
        f"outputs: {summary.condense_dir}/export (wds/, parquet/, preview.png, loss.png, README.md)"
    )
    say(f"report: {write_report(summary.run_dir)}")


def _prepare_digits_once() -> None:
    from condense_pipeline.datasets import data_home
    from condense_pipeline.prepare import prepare_dataset

    if not storage.exists(os.path.join(data_home("digits"), TRAIN, "dataset.json")):
        say("preparing the built-in digits data (first use)")
        prepare_dataset("digits", None, None)


@app.command()
def show(run_dir: str) -> None:
    """Print a run's summary and where its outputs are."""
    from condense_pipeline.formats import CONDENSE_DIR, MANIFEST

    manifest = storage.join(run_dir, MANIFEST)
    if not storage.exists(manifest):
        raise UserError(f"{run_dir} has no {MANIFEST}: it is not a run directory")
    m = storage.read_json(manifest)
    say(f"run {run_dir}: dataset {m['dataset']}")
    for name, st in m["stages"].items():
        say(f"  {name}: {st['status']} in {st['seconds']} s")
    if "stats" in m:  # the last run's: the pass's own summary, reruns included
        _print_stats(m["stats"], reused=False)
    if "condense" in m:
        _print_condense(m["condense"])
    stale = set()
    if storage.is_done(storage.join(run_dir, "stats")):
        from condense_pipeline.pipeline.condense import read_bank
        from condense_pipeline.pipeline.lineage import stale_condensations

        stale = set(stale_condensations(run_dir, read_bank(run_dir)))
    for folder in storage.list_dir(storage.join(run_dir, CONDENSE_DIR)):
        report = storage.join(run_dir, CONDENSE_DIR, folder, "eval", "report.json")
        line = f"  condense/{folder}" + (
            " (stale: the statistics changed)" if folder in stale else ""
        )
        if storage.exists(report):
            line += ": " + ", ".join(_accuracies(storage.read_json(report), std=False))
        say(line)


@app.command()
def report(run_dir: str) -> None:
    """Write RUN_DIR/report.html: previews, plots, accuracy, timings and settings on one page."""
    say(f"report: {write_report(run_dir)}")


def _plain_metavars(command) -> None:
    """argparse-style help: `--epochs EPOCHS`, `RUN_DIR`, instead of Typer's <int>/<str> tags
    (Typer offers no setting for it; its help asks each parameter for its type label)."""
    for param in command.params:
        if param.param_type_name == "argument":
            param.display_type_rich = lambda ctx: None
        if param.metavar is None and not getattr(param, "is_flag", False):
            param.metavar = param.name.upper()
    for sub in getattr(command, "commands", {}).values():
        _plain_metavars(sub)


def cli():
    """The (Typer's own click) command behind `app`, with plain metavars."""
    command = typer.main.get_command(app)
    _plain_metavars(command)
    return command


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stoppable(kept: str):
    """Ctrl-C or SIGTERM where no stage says what it committed (the stats, condense and
    evaluation loops do) becomes a Stopped that says what a rerun keeps (click would print
    "Aborted!" and leave)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Stopped(kept) from None


def _stop(what: str) -> None:
    """After Ctrl-C or SIGTERM: end Ray's part (a local Ray this command started goes with it),
    then one line, and the exit code of an interrupted command."""
    import gc
    import threading

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        gc.collect()  # an open Ray Data iterator held in a reference cycle closes here, not later
        # the readers' background threads fail once Ray is gone: they are abandoned, not errors
        threading.excepthook = lambda args: None
        logging.disable(logging.CRITICAL)
        ray.shutdown()
    typer.echo(f"stopped: {what}; rerun the same command to resume", err=True)
    sys.exit(130)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM as Ctrl-C: the stages stop through KeyboardInterrupt (ensure_ray keeps this)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        cli()(prog_name="condense-pipeline")
    except UserError as e:
        cause = getattr(e, "cause", None)  # a UserError raised inside a Ray task
        typer.echo(f"error: {cause if isinstance(cause, UserError) else e}", err=True)
        sys.exit(2)
    except Stopped as e:  # Ctrl-C or SIGTERM: the stage says what it had committed
        stopped = str(e)
    else:
        return
    # Outside the except block: the exception goes, and with it the interrupted stage's frames
    # and any Ray Data iterator still open in them, which shuts its execution down first.
    _stop(stopped)


if __name__ == "__main__":
    main()
