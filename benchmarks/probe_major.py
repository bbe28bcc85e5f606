"""What the statistics pass's per-probe work costs as K grows: forwards/s of the pass's inner
loop at several K on the same images, batch by batch (each 512-image batch forwarded probe by
probe, as the workers did before) against held images forwarded probe-major at a flush (what a
StatsWorker does now), and for M3D the random-feature basis cost per 512-image batch.

    .venv/bin/python benchmarks/probe_major.py --images 60000 --probes 10,100,1000 --methods dm,m3d

MNIST's shape (28 px, 1 channel, ConvNet-3: D = 2048; M3D: R = 5120) with 10 classes of 6,000
images each (n_c as in MNIST, so M = 32 gives each probe 320 images), random uint8 pixels (a
forward costs what it costs on real digits), the M3D bandwidths set to 1 (they scale the basis,
not its cost). torch uses every CPU. "basis s" is the time spent drawing bases (bank.rff_basis
misses, timed around the draw); "basis ÷ forwards" divides it by the rest of the time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np
import torch

from condense_pipeline.condense.bank import ProbeBank
from condense_pipeline.condense.stats import (
    HELD_PER_PROBE,
    ClassStats,
    PendingForwards,
    accumulate,
)
from condense_pipeline.config import stats_config
from condense_pipeline.datasets import get_profile
from condense_pipeline.pipeline.stats import bank_spec

BATCH = 512
N_C = 6000


def timed_basis(bank: ProbeBank) -> list[float]:
    """Wrap bank.rff_basis so that the seconds of each draw (a cache miss) are recorded."""
    draws: list[float] = []
    inner = bank.rff_basis

    def rff_basis(k):
        hit = k in bank._rff
        t0 = time.perf_counter()
        out = inner(k)
        if not hit:
            draws.append(time.perf_counter() - t0)
        return out

    bank.rff_basis = rff_basis
    return draws


def one(method: str, probes: int, held: bool, images, labels, keys, args) -> dict:
    profile = get_profile("mnist")
    cfg = dataclasses.replace(
        stats_config(profile, (method,)), probes=probes, real_per_probe=args.real_per_probe
    )
    bank = ProbeBank(bank_spec(profile, cfg))
    for k in range(probes):
        bank.network(k)  # built outside the clock, as a worker's bank keeps them
    draws = timed_basis(bank)
    h = torch.ones(probes, 10, dtype=torch.float64) if method == "m3d" else None
    counts = np.full(10, N_C)
    stats = ClassStats.zeros(bank, 0)
    pending = PendingForwards(  # a CPU worker's limits
        bank,
        counts,
        h,
        capacity_bytes=cfg.buffer_mib * 2**20,
        capacity_forwards=HELD_PER_PROBE["cpu"] * probes,
    )
    forwards, started = 0, time.perf_counter()
    for i in range(0, len(labels), BATCH):
        b = slice(i, i + BATCH)
        if held:
            forwards += pending.add(stats, images[b], labels[b], keys[b])
            if pending.full:
                pending.flush(stats)
        else:
            forwards += accumulate(stats, bank, images[b], labels[b], keys[b], counts, h)
    pending.flush(stats)
    seconds = time.perf_counter() - started
    batches = -(-len(labels) // BATCH)
    return {
        "forwards": forwards,
        "seconds": seconds,
        "draws": len(draws),
        "basis_s": sum(draws),
        "batches": batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60000)
    parser.add_argument("--probes", default="10,100,1000")
    parser.add_argument("--real-per-probe", type=int, default=32)
    parser.add_argument("--methods", default="dm,m3d")
    parser.add_argument("--modes", default="batch,held", help="batch (before) and/or held")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (args.images, 28, 28, 1), dtype=np.uint8))
    labels = np.arange(args.images) % 10
    keys = [f"k{i:06d}" for i in range(args.images)]
    print(f"{args.images} images, M = {args.real_per_probe}, n_c = {N_C}, {os.cpu_count()} CPUs\n")
    print(
        "| method | K | mode | forwards | seconds | forwards/s | basis draws | basis s "
        "| basis s per batch | forwards s per batch | basis ÷ forwards |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        for probes in [int(k) for k in args.probes.split(",")]:
            for mode in args.modes.split(","):
                r = one(method, probes, mode == "held", images, labels, keys, args)
                rest = r["seconds"] - r["basis_s"]
                print(
                    f"| {method} | {probes} | {mode} | {r['forwards']} | {r['seconds']:.1f} "
                    f"| {r['forwards'] / r['seconds']:.0f} | {r['draws']} | {r['basis_s']:.1f} "
                    f"| {r['basis_s'] / r['batches']:.3f} | {rest / r['batches']:.3f} "
                    f"| {r['basis_s'] / rest:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
