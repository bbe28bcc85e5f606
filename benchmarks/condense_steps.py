"""Seconds per condensation step with bank targets, per method and IPC, against one step of the
original DM (a fresh network and 256 real images per class embedded at every step).

    .venv/bin/python benchmarks/condense_steps.py --steps 20 --ipcs 1,10,50

32 px, 10 classes (cifar10 profile), on the CPU with torch.set_num_threads(2). The bank has
K = 4 probes whose statistics come from `accumulate` over random images (M3D: bandwidths from
`pilot_bandwidths`); the synthetic set starts from noise, which costs the same per step as a real
or mix start. Each row is the median over --steps steps after 2 warm-up steps. The reference row
is `OnlineTargets` with method dm and batch_real 256 over 10 x 300 random images at IPC 10;
ratio = bank s/step / reference s/step, both measured in this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import numpy as np
import torch

from condense_pipeline.condense.bank import ProbeBank, pilot_bandwidths
from condense_pipeline.condense.loop import LoopState, condense_loop
from condense_pipeline.condense.stats import ClassStats, accumulate
from condense_pipeline.condense.synthetic import initial_images
from condense_pipeline.condense.targets import BankTargets, OnlineTargets
from condense_pipeline.config import condense_config, stats_config
from condense_pipeline.datasets import get_profile
from condense_pipeline.pipeline.stats import bank_spec

WARMUP = 2
CLASSES = list(range(10))


def seconds_per_step(targets, bank: ProbeBank, cfg) -> float:
    """Median seconds of cfg.steps - WARMUP steps of condense_loop from a noise start."""
    g = torch.Generator().manual_seed(0)
    pools = [torch.zeros(0, 32, 32, 3, dtype=torch.uint8)] * len(CLASSES)
    images = initial_images(pools, cfg.ipc, cfg.factor, "noise", bank.normalize, g)
    state = LoopState(0, images, torch.zeros_like(images))
    state = condense_loop(state, targets, cfg, bank, log_every=1)
    times = [h["seconds"] for h in state.history]
    return statistics.median(np.diff(times)[WARMUP - 1 :].tolist())


def make_bank(profile, method: str, images, labels):
    cfg = dataclasses.replace(
        stats_config(profile, (method,)), probes=4, real_per_probe=None, init_pool=10
    )
    bank = ProbeBank(bank_spec(profile, cfg))
    bandwidths = None
    if method == "m3d":
        bandwidths = pilot_bandwidths(bank, images[:320], torch.from_numpy(labels[:320]))
    stats = ClassStats.zeros(bank, cfg.init_pool)
    counts = np.bincount(labels, minlength=10)
    keys = [f"k{i}" for i in range(len(labels))]
    accumulate(stats, bank, images, labels, keys, counts, bandwidths, cfg.attention_power)
    return bank, stats, bandwidths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ipcs", default="1,10,50")
    parser.add_argument("--methods", default="dm,m3d,datadam")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    profile = get_profile("cifar10")
    rng = np.random.default_rng(0)
    labels = np.arange(3000) % 10
    images = torch.from_numpy(rng.integers(0, 256, (3000, 32, 32, 3), dtype=np.uint8))
    steps = args.steps + WARMUP

    bank, _, _ = make_bank(profile, "dm", images[:100], labels[:100])
    ref_cfg = condense_config(profile, "dm", 10, steps=steps, targets="online", batch_real=256)
    real = [images[torch.from_numpy(labels == c)] for c in CLASSES]
    reference = seconds_per_step(OnlineTargets(real, CLASSES, bank, ref_cfg), bank, ref_cfg)

    rows = []
    for method in args.methods.split(","):
        bank, stats, bandwidths = make_bank(profile, method, images[:640], labels[:640])
        for ipc in [int(s) for s in args.ipcs.split(",")]:
            cfg = condense_config(profile, method, ipc, steps=steps)
            targets = BankTargets(bank, stats, CLASSES, bandwidths, cfg)
            rows.append((method, ipc, seconds_per_step(targets, bank, cfg)))
            print(f"{method} ipc {ipc}: {rows[-1][2]:.4f} s/step", flush=True)

    print(f"\nDM online reference (IPC 10, 256 real/class, fresh net): {reference:.4f} s/step\n")
    print("| method | IPC | s/step (bank) | DM-online ref s/step (IPC 10) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for method, ipc, sec in rows:
        print(f"| {method} | {ipc} | {sec:.4f} | {reference:.4f} | {sec / reference:.3f} |")


if __name__ == "__main__":
    main()
