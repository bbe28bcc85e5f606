"""--dry-run: what a stage will compute and what it will cost, without computing it.

Sizes follow DESIGN.md section 3 (K * C * (D + R + A) float64 per accumulator). Times come from
timing a few batches of the probe network on this machine's device, so they are estimates for
where the command runs, not for a cluster it might be sent to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from condense_pipeline.condense.bank import NEEDS
from condense_pipeline.condense.device import image_bytes
from condense_pipeline.condense.networks import ConvNet, attention_dims
from condense_pipeline.config import CondenseConfig, StatsConfig, TrainProbesConfig
from condense_pipeline.datasets import METHODS, Profile
from condense_pipeline.pipeline import read

GiB = 2**30


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


def train_plan(profile: Profile, cfg: TrainProbesConfig, data: str) -> list[str]:
    """The training stage of trained probes: every expert sees every training image per epoch."""
    images = int(np.sum(read.load_dataset_info(data)["counts"]))
    passes = cfg.experts * cfg.epochs * images
    rate = forward_rate(profile, backward=True)
    return [
        f"train-probes plan: {cfg.experts} experts x {cfg.epochs} epochs on {images} images",
        f"  forwards+backwards: {passes:,}",
        f"  estimated time: {passes / rate / 60:.1f} min at {rate:.0f} images/s forward+backward "
        "(one worker on this machine; divide by the workers: one per GPU)",
    ]


def condense_plan(profile: Profile, cfg: CondenseConfig) -> list[str]:
    classes = len(cfg.classes) if cfg.classes else profile.num_classes
    per_step = classes * cfg.ipc * cfg.factor**2
    forwards = cfg.steps * per_step
    rate = forward_rate(profile, backward=True)
    per_image = image_bytes(profile.resolution, profile.depth, cfg.method == "datadam")
    return [
        f"condense plan: {cfg.method}, IPC {cfg.ipc}, factor {cfg.factor}, init {cfg.init}, "
        f"{cfg.steps} steps, lr {cfg.lr}, targets {cfg.targets}",
        f"  synthetic forwards+backwards: {forwards:,} ({per_step} per step)",
        f"  estimated time: {forwards / rate / 60:.1f} min at {rate:.0f} images/s "
        "forward+backward (one task on this machine; divide by parallel groups)",
        f"  memory: {per_image / 2**20:.1f} MiB per image forward+backward, "
        f"{per_step * per_image / GiB:.1f} GiB for a whole step; each group goes through in "
        "chunks sized from its device's free memory (--chunk N: N stored images)",
    ]


# -- the default method ------------------------------------------------------------------------
# With chunked condensation (condense/loop.py) any group fits on any device, so memory decides
# only whether a stats worker's device holds M3D's accumulator; time decides the rest.
TIME_BUDGET_H = 12.0  # m3d when its condensation is estimated to finish within this
# Forward+backward images/s at 64 px: one H100 (estimated, docs/scaling.md: never measured) and
# one CPU thread (measured there). Scaled by (64 / resolution)^2 for other sizes.
GPU_IMAGES_PER_S = 23_000
CPU_THREAD_IMAGES_PER_S = 21


@dataclass(frozen=True)
class ClusterPlan:
    """What the default method is chosen from: the cluster's devices and their memory."""

    gpus: int
    cpus: int
    device_memory: int  # bytes a stats worker's device has: one GPU's, or one node's for CPUs

    def describe(self) -> str:
        where = f"{self.gpus} GPU(s)" if self.gpus else f"{self.cpus} CPU(s), no GPU"
        return f"{where}, {self.device_memory / GiB:.0f} GiB per worker device"


def cluster_plan() -> ClusterPlan:
    """Read the running Ray cluster: GPU count and one GPU's memory (a probe task), or the CPUs
    and the smallest node's memory."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    if gpus:
        memory = ray.get(ray.remote(num_gpus=1, num_cpus=0)(_gpu_memory).remote())
    else:
        memory = min(int(n["Resources"].get("memory", 0)) for n in ray.nodes() if n["Alive"])
    return ClusterPlan(gpus, cpus, memory)


def _gpu_memory() -> int:
    return torch.cuda.get_device_properties(0).total_memory


def condense_hours(profile: Profile, method: str, ipc: int, plan: ClusterPlan) -> float:
    """Estimated hours of the condensation at the profile's steps and factor."""
    images = profile.num_classes * ipc * profile.factor_for(method) ** 2 * profile.steps_for(method)
    scale = (64 / profile.resolution) ** 2
    rate = GPU_IMAGES_PER_S * plan.gpus if plan.gpus else CPU_THREAD_IMAGES_PER_S * plan.cpus
    return images / (rate * scale) / 3600


def choose_method(
    profile: Profile, ipc: int, probes: int | None, plan: ClusterPlan, held=None
) -> tuple[str, str]:
    """(method, why): the profile's method (m3d unless measured otherwise) when its statistics
    fit a stats worker's device and its condensation fits TIME_BUDGET_H, else dm. `held`: the
    statistics that exist (condense on a run directory), which limit the candidates."""
    usable = [m for m in METHODS if held is None or set(NEEDS[m]) <= set(held)]
    prefer = profile.default_method
    if prefer not in usable:
        return usable[0], f"the statistics hold {', '.join(held)}, which serve {usable[0]}"
    if prefer != "m3d":
        return prefer, f"the {profile.name} profile's method"
    fallback = "dm" if "dm" in usable else None
    need = accumulator_bytes(profile, probes or profile.probes, ("emb", "rff"), profile.rff_dim)
    hours = condense_hours(profile, "m3d", ipc, plan)
    where = plan.describe()
    if fallback and 2 * need > plan.device_memory:
        return "dm", (
            f"m3d's statistics ({need / GiB:.1f} GiB, twice that while a worker commits) do not "
            f"fit a worker's device ({where})"
        )
    if fallback and hours > TIME_BUDGET_H:
        dm_hours = condense_hours(profile, "dm", ipc, plan)
        return "dm", (
            f"m3d would condense for about {hours:.1f} h on {where} (over {TIME_BUDGET_H:.0f} h), "
            f"dm about {dm_hours:.1f} h"
        )
    return "m3d", f"m3d condenses in about {hours:.1f} h on {where}"
