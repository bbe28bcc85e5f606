"""Statistics-pass throughput: the whole Ray pass (read, decode, StatsWorker) against the bare
probe forwards of one worker's accumulator, on a synthetic 32 px 10-class dataset.

    .venv/bin/python benchmarks/stats_pass.py --images 10000,100000 --probes 10 --real-per-probe 64

Per dataset size: random uint8 images (cifar10 profile) are prepared into shards, then a child
process starts Ray (not timed), runs `run_stats` (timed) while sampling the RSS of every
"StatsWorker" process every 0.5 s, and then, in the same process, adds the same images held in
memory to one accumulator as a worker does (PendingForwards with the worker's limits, flushed at
the end), with the torch threads a worker gets (CPUs / workers).
"pass f/s" is probe forwards per second of the whole pass, "bare f/s" that of the bare loop;
ratio = pass / bare (the target is >= 0.85 per worker; the table gives the worker count);
"start s" is the time until the stats workers are ready (Ray Data's read tasks start meanwhile),
and "ratio after start" the ratio with that fixed start-up left out.
Timings on a shared machine are noisy, so compare the ratio, which is measured in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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

ROOT = os.path.join(tempfile.gettempdir(), "condense-pipeline-bench", "stats_pass")


def worker_rss_mib() -> float:
    """Summed RSS of this process's descendants whose command line names StatsWorker (Ray titles
    the actor process ray::StatsWorker); other Ray clusters on the machine are not counted."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,rss=,args="], capture_output=True, text=True)
    procs = [line.split(None, 3) for line in out.stdout.splitlines()]
    mine, grew = {os.getpid()}, True
    while grew:
        more = {int(p[0]) for p in procs if int(p[1]) in mine} - mine
        mine, grew = mine | more, bool(more)
    kib = [int(p[2]) for p in procs if int(p[0]) in mine and "StatsWorker" in p[-1]]
    return sum(kib) / 1024


def make_dataset(n: int, folder: str) -> str:
    from condense_pipeline.prepare import prepare_dataset  # writes shards with Ray tasks

    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    src = os.path.join(folder, "source.npz")
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    np.savez(src, x=x, y=np.arange(n) % 10)
    prepare_dataset("cifar10", src, os.path.join(folder, "data"), shard_size=1000)
    return src


def start_ray() -> None:
    import ray

    ray.init(
        address="local",
        include_dashboard=False,
        logging_level="WARNING",
        _temp_dir=os.path.join(ROOT, "ray"),
    )


def child(args) -> None:
    import ray
    import torch

    from condense_pipeline.condense.bank import ProbeBank
    from condense_pipeline.condense.stats import HELD_PER_PROBE, ClassStats, PendingForwards
    from condense_pipeline.config import stats_config
    from condense_pipeline.datasets import get_profile
    from condense_pipeline.pipeline.stats import bank_spec, run_stats

    profile = get_profile("cifar10")
    cfg = stats_config(profile, (args.method,))
    cfg = dataclasses.replace(
        cfg, probes=args.probes, real_per_probe=args.real_per_probe, init_pool=10
    )
    folder = os.path.join(ROOT, f"n{args.child}")
    shutil.rmtree(os.path.join(folder, "run"), ignore_errors=True)  # each repeat computes anew
    start_ray()
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], worker_rss_mib())
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started, ready = time.perf_counter(), []

    def progress(line: str) -> None:  # the workers' start-up ends at their first "ready"
        if "ready" in line and not ready:
            ready.append(time.perf_counter() - started)

    result = run_stats(
        profile, os.path.join(folder, "data", "train"), os.path.join(folder, "run"), cfg,
        progress=progress,
    )  # fmt: skip
    pass_s = time.perf_counter() - started
    stop.set()
    sampler.join()
    workers = result.summary["workers"]
    ray.shutdown()

    # the bare loop: same bank, same images in memory, a worker's threads and buffer
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    data = np.load(os.path.join(folder, "source.npz"))
    images, labels = torch.from_numpy(data["x"]), data["y"].astype(np.int64)
    counts = np.bincount(labels, minlength=10)
    bank = ProbeBank(bank_spec(profile, cfg))
    stats = ClassStats.zeros(bank, cfg.init_pool)
    pending = PendingForwards(
        bank,
        counts,
        None,
        cfg.attention_power,
        capacity_bytes=cfg.buffer_mib * 2**20,
        capacity_forwards=HELD_PER_PROBE["cpu"] * cfg.probes,
    )
    bank.network(0)  # build outside the clock, like the worker's constructor does for its bank
    bare_forwards, started = 0, time.perf_counter()
    for i in range(0, len(labels), cfg.batch_size):
        keys = [f"k{j}" for j in range(i, min(i + cfg.batch_size, len(labels)))]
        bare_forwards += pending.add(
            stats, images[i : i + cfg.batch_size], labels[i : i + cfg.batch_size], keys
        )
        if pending.full:
            pending.flush(stats)
    pending.flush(stats)
    bare_s = time.perf_counter() - started
    out = {
        "images": args.child,
        "forwards": result.summary["forwards"],
        "pass_s": pass_s,
        "start_s": ready[0],
        "bare_forwards": bare_forwards,
        "bare_s": bare_s,
        "workers": workers,
        "worker_rss_mib": peak[0],
        "driver_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="10000", help="comma list of dataset sizes")
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--real-per-probe", type=int, default=64)
    parser.add_argument("--method", default="dm")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per size")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import ray

    sizes = [int(s) for s in args.images.split(",")]
    start_ray()
    for n in sizes:
        folder = os.path.join(ROOT, f"n{n}")
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        make_dataset(n, folder)
        print(f"{n} images prepared in {time.perf_counter() - started:.1f} s", flush=True)
    ray.shutdown()  # the children start their own Ray; none of this one's processes linger

    rows = {n: [run_child(n, args) for _ in range(args.repeats)] for n in sizes}
    print(f"\nmethod {args.method}, 32 px, 10 classes, {os.cpu_count()} CPUs, median of")
    print(f"{args.repeats} runs per size (peak memory: the largest)\n")
    print(
        "| images | K | M | workers | forwards | pass s | start s | pass f/s | bare f/s | ratio "
        "| ratio after start | worker peak RSS MiB | driver max RSS MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, runs in rows.items():
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        ratios = [r["forwards"] / r["pass_s"] / (r["bare_forwards"] / r["bare_s"]) for r in runs]
        steady = [
            r["forwards"] / (r["pass_s"] - r["start_s"]) / (r["bare_forwards"] / r["bare_s"])
            for r in runs
        ]
        print(
            f"| {n} | {args.probes} | {args.real_per_probe} | {runs[0]['workers']} "
            f"| {runs[0]['forwards']} | {med['pass_s']:.1f} | {med['start_s']:.1f} "
            f"| {med['forwards'] / med['pass_s']:.0f} "
            f"| {med['bare_forwards'] / med['bare_s']:.0f} | {statistics.median(ratios):.2f} "
            f"| {statistics.median(steady):.2f} | {max(r['worker_rss_mib'] for r in runs):.0f} "
            f"| {max(r['driver_maxrss_mib'] for r in runs):.0f} |"
        )
        print(f"  ratios per run: {', '.join(f'{x:.2f}' for x in ratios)}")


def run_child(n: int, args) -> dict:
    """One timed pass (and its bare loop) in a fresh process with its own Ray."""
    cmd = [sys.executable, __file__, "--child", str(n), "--probes", str(args.probes)]
    cmd += ["--real-per-probe", str(args.real_per_probe), "--method", args.method]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        sys.exit(f"child failed ({proc.returncode}):\n{tail}")
    return json.loads(lines[-1][7:])


if __name__ == "__main__":
    main()
