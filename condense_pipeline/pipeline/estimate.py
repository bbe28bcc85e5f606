"""--dry-run: what a stage will compute and what it will cost, without computing it.

Sizes follow DESIGN.md section 3 (K * C * (D + R + A) float64 per accumulator). Times come from
timing a few batches of the probe network on this machine's device, so they are estimates for
where the command runs, not for a cluster it might be sent to.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from condense_pipeline.condense.bank import NEEDS
from condense_pipeline.condense.networks import ConvNet, attention_dims
from condense_pipeline.config import CondenseConfig, StatsConfig
from condense_pipeline.datasets import Profile
from condense_pipeline.pipeline import read

GiB = 2**30


def memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def accumulator_bytes(profile: Profile, probes: int, statistics, rff_dim: int) -> int:
    embed = ConvNet(profile.channels, profile.resolution, depth=profile.depth).embed_dim
    width = 1 + embed  # count/sqnorm and the embedding sum
    if "rff" in statistics:
        width += rff_dim
    if "att" in statistics:
        width += sum(attention_dims(profile.resolution, profile.depth))
    return probes * profile.num_classes * width * 8


def forward_rate(profile: Profile, batch: int = 128, backward: bool = False) -> float:
    """Images per second of one probe network on this machine (CPU threads or the GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = ConvNet(profile.channels, profile.resolution, depth=profile.depth).to(device)
    x = torch.randn(batch, profile.channels, profile.resolution, profile.resolution, device=device)
    x.requires_grad_(backward)
    times = []
    for _ in range(4):
        started = time.perf_counter()
        out = net.embed(x)
        if backward:
            out.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return batch / float(np.median(times[1:]))


def stats_plan(profile: Profile, cfg: StatsConfig, data: str) -> list[str]:
    info = read.load_dataset_info(data)
    counts = np.asarray(info["counts"])
    per_class = counts if cfg.real_per_probe is None else np.minimum(counts, cfg.real_per_probe)
    forwards = int(cfg.probes * per_class.sum())
    needs = sorted({n for m in cfg.methods for n in NEEDS[m]})
    size = accumulator_bytes(profile, cfg.probes, needs, cfg.rff_dim)
    rate = forward_rate(profile)
    return [
        f"stats plan for {profile.name} ({sum(counts)} training images, {len(counts)} classes)",
        f"  probes K={cfg.probes}, real per probe M={cfg.real_per_probe or 'all'}, "
        f"statistics {', '.join(needs)}",
        f"  probe forwards: {forwards:,} (about {forwards / max(1, counts.sum()):.1f} per image)",
        f"  accumulator per worker: {size / GiB:.2f} GiB (float64, K*C*(D+R+A))",
        f"  estimated time: {forwards / rate / 60:.1f} min at {rate:.0f} forwards/s "
        "(one worker on this machine; divide by the workers you run)",
    ]


def condense_plan(profile: Profile, cfg: CondenseConfig) -> list[str]:
    classes = len(cfg.classes) if cfg.classes else profile.num_classes
    per_step = classes * cfg.ipc * cfg.factor**2
    forwards = cfg.steps * per_step
    rate = forward_rate(profile, backward=True)
    return [
        f"condense plan: {cfg.method}, IPC {cfg.ipc}, factor {cfg.factor}, init {cfg.init}, "
        f"{cfg.steps} steps, lr {cfg.lr}, targets {cfg.targets}",
        f"  synthetic forwards+backwards: {forwards:,} ({per_step} per step)",
        f"  estimated time: {forwards / rate / 60:.1f} min at {rate:.0f} images/s "
        "forward+backward (one task on this machine; divide by parallel groups)",
    ]
