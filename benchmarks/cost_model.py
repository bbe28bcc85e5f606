"""The measured inputs of docs/scaling.md's cost model for ImageNet-1K at 64 px, and the GPU
estimates derived from them under stated assumptions.

    .venv/bin/python benchmarks/cost_model.py --assumed-tflops 100 --assumed-gbs 2000

Measured on this machine (CPU; times are the fastest of several repeats, since other jobs only
add time): probe forwards per second of ConvNet-D4 at 64 px (one thread, as a num_cpus=1 Ray
actor gets), forward+backward images per second and the memory one image's forward+backward
holds, JPEG decode to 64 px of an ImageNet-sized image, building the imagenet profile's probe
bank, and `accumulate`'s per-batch cost outside the forwards (key hashes and the init pool) at
1000 classes. Computed: FLOPs and activation bytes per forward from the architecture, accumulator
and storage sizes from the DESIGN.md section 3 formula (the function `--dry-run` uses), the
driver's merge peak as 2 class files (the sum and the part being added, measured by
benchmarks/merge_peak.py) and the checkpoint bytes of a pass as commits x workers x (accumulator
+ pool), with a commit every --commit-interval seconds and one after the last unit. Estimated,
not measured: GPU times, from a roofline of the FLOPs at --assumed-tflops and the activation
traffic at --assumed-gbs. It also writes a dataset.json with ImageNet-1K's size into
--dry-run-data, so that `condense-pipeline run imagenet --ipc 10 --dry-run --data DIR` prints the
plan without the data.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

GiB, MiB = 2**30, 2**20
IMAGENET_TRAIN = 1_281_167
IMAGENET_CLASSES = 1000


def conv_flops_and_bytes(resolution: int, depth: int, channels: int = 3, width: int = 128):
    """(FLOPs of the convolutions, bytes of activation traffic) of one ConvNet forward.

    Traffic assumes unfused kernels in float32: per block the conv writes its output once, the
    instance norm reads it twice (statistics, then normalise) and writes once, ReLU reads and
    writes, the pool reads and writes a quarter: 7.25 times the block's activation size.
    """
    flops, traffic, size, c_in = 0, 0, resolution, channels
    for _ in range(depth):
        flops += 2 * size * size * width * c_in * 9
        traffic += 7.25 * size * size * width * 4
        size, c_in = size // 2, width
    return flops, traffic


def timed(fn, repeats: int) -> float:
    """The fastest of `repeats` calls after a warm-up: on a shared machine the other jobs only
    ever add time, so the minimum is the least disturbed figure."""
    fn()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return min(seconds)


def forward_rates(threads: int) -> dict:
    from condense_pipeline.condense.networks import ConvNet

    torch.set_num_threads(threads)
    net = ConvNet(3, 64, depth=4).requires_grad_(False)
    x = torch.randn(128, 3, 64, 64)
    with torch.no_grad():
        fwd = 128 / timed(lambda: net.embed(x), 5)
    xs = torch.randn(64, 3, 64, 64, requires_grad=True)

    def step():
        (g,) = torch.autograd.grad(net.embed(xs).pow(2).sum(), xs)

    return {"threads": threads, "forward_per_s": fwd, "fwd_bwd_per_s": 64 / timed(step, 5)}


def activation_mib_per_image(n: int = 128) -> float:
    """Memory a forward+backward of n images holds, per image: run in a fresh process so the
    peak RSS is this allocation's alone."""
    cmd = [sys.executable, __file__, "--activation-child", str(n)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1]) / MiB / n


def peak_rss() -> int:
    """This process's peak resident memory in bytes. VmHWM, not ru_maxrss: a child started from
    a big parent inherits the parent's ru_maxrss, while VmHWM starts afresh at exec."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def activation_child(n: int) -> None:
    """One forward+backward of n images, as the condensation loop does (the block activations
    kept alive with the embedding); prints the bytes it took above the warmed-up baseline."""
    from condense_pipeline.condense.networks import ConvNet

    torch.set_num_threads(1)
    net = ConvNet(3, 64, depth=4).requires_grad_(False)
    x = torch.randn(n, 3, 64, 64, requires_grad=True)
    net.embed(x[:2]).sum().backward()
    base = peak_rss()
    emb, acts = net.activations(x)
    (grad,) = torch.autograd.grad(emb.pow(2).sum(), x)
    print(peak_rss() - base)


def imagenet_like_jpeg(seed: int = 0) -> bytes:
    """A 500x375 JPEG at quality 90 with smooth structure plus grain (ImageNet's mean size is
    about 400x350 and 110 KB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((500, 375), Image.Resampling.BICUBIC), dtype=np.float64)
    grain = rng.normal(0, 10, smooth.shape)
    image = Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def decode_rate() -> dict:
    from condense_pipeline.datasets import get_profile
    from condense_pipeline.pipeline.read import decode_image

    profile = get_profile("imagenet")
    data = [imagenet_like_jpeg(s) for s in range(20)]
    seconds = timed(lambda: [decode_image(d, profile) for d in data], 20) / len(data)
    return {"jpeg_kib": np.mean([len(d) for d in data]) / 1024, "decode_per_s": 1 / seconds}


def bank_build_seconds(probes: int) -> float:
    from condense_pipeline.condense.bank import ProbeBank
    from condense_pipeline.config import stats_config
    from condense_pipeline.datasets import get_profile
    from condense_pipeline.pipeline.stats import bank_spec

    profile = get_profile("imagenet")
    spec = bank_spec(profile, stats_config(profile, ("dm",), probes=probes))
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        ProbeBank(spec)
        seconds.append(time.perf_counter() - started)
    return min(seconds)


def accumulate_overhead(init_pool: int, batch: int = 512) -> float:
    """Seconds per batch that `accumulate` spends outside the probe forwards at 1000 classes:
    the bank has one probe and M = 1, so about one image in 1300 is forwarded; the rest is the
    key hashes, the membership draw and offering every image to its class's init pool."""
    from condense_pipeline.condense.bank import ProbeBank
    from condense_pipeline.condense.stats import ClassStats, accumulate
    from condense_pipeline.config import stats_config
    from condense_pipeline.datasets import get_profile
    from condense_pipeline.pipeline.stats import bank_spec

    torch.set_num_threads(1)
    profile = get_profile("imagenet")
    cfg = stats_config(profile, ("dm",), probes=1, real_per_probe=1)
    bank = ProbeBank(bank_spec(profile, cfg))
    stats = ClassStats.zeros(bank, init_pool)
    counts = np.full(IMAGENET_CLASSES, 1281)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8))
    seconds = []
    for b in range(6):
        labels = rng.integers(0, IMAGENET_CLASSES, batch)
        keys = [f"b{b}-{i}" for i in range(batch)]
        started = time.perf_counter()
        accumulate(stats, bank, images, labels, keys, counts)
        seconds.append(time.perf_counter() - started)
    return min(seconds[1:])


def hash_seconds(batch: int = 512, probes: int = 100) -> float:
    """Seconds per batch of the two keyed hashes per key and the K membership draws, the part of
    `accumulate`'s overhead that does not depend on the classes."""
    from condense_pipeline.condense.sampling import key_hashes, pool_hashes, probe_uniforms

    keys = [f"k{i}" for i in range(batch)]
    return timed(lambda: (probe_uniforms(key_hashes(keys, 0), probes), pool_hashes(keys, 0)), 5)


def sizes(commits: int, workers: int) -> list[dict]:
    """Accumulator, init pool and storage per method for the imagenet profile (64 and 128 px):
    the merge holds two class files; each commit writes every worker's accumulator and pool."""
    from condense_pipeline.condense.bank import NEEDS
    from condense_pipeline.config import PRESETS, init_images
    from condense_pipeline.datasets import METHODS, get_profile
    from condense_pipeline.pipeline.estimate import accumulator_bytes

    rows = []
    for res in (64, 128):
        profile = get_profile("imagenet", res)
        for method in (*METHODS, "all"):
            methods = METHODS if method == "all" else (method,)
            needs = sorted({n for m in methods for n in NEEDS[m]})
            acc = accumulator_bytes(profile, profile.probes, needs, profile.rff_dim)
            preset = PRESETS["m3d" if method == "all" else method]
            pool_per_class = max(init_images(10, preset.factor, preset.init), 10)
            pool = IMAGENET_CLASSES * pool_per_class * res * res * 3
            rows.append(
                {
                    "px": res,
                    "method": method,
                    "accumulator_gib": acc / GiB,
                    "pool_gib": pool / GiB,
                    "per_100_class_file_gib": (acc + pool) / GiB / 10,
                    "driver_merge_peak_gib": 2 * (acc + pool) / GiB / 10,
                    "checkpoints_written_gib": commits * workers * (acc + pool) / GiB,
                }
            )
    return rows


def write_dry_run_data(folder: str) -> None:
    """A dataset.json with ImageNet-1K's class count and size (1,281,167 images, every class
    above 256), enough for `--dry-run`, which reads only the counts."""
    from condense_pipeline.formats import DATASET_FORMAT

    counts = [IMAGENET_TRAIN // IMAGENET_CLASSES] * IMAGENET_CLASSES
    for c in range(IMAGENET_TRAIN - sum(counts)):
        counts[c] += 1
    info = {
        "format": DATASET_FORMAT,
        "name": "imagenet",
        "split": "train",
        "classes": [f"n{c:08d}" for c in range(IMAGENET_CLASSES)],
        "counts": counts,
        "channels": 3,
        "native_size": 0,
        "num_samples": IMAGENET_TRAIN,
        "shards": [],
        "note": "sizes only, written by benchmarks/cost_model.py for --dry-run",
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(info, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assumed-tflops", type=float, default=100.0, help="GPU, effective")
    parser.add_argument("--assumed-gbs", type=float, default=2000.0, help="GPU, effective GB/s")
    parser.add_argument("--gpus", type=int, default=8, help="stats workers for the estimates")
    parser.add_argument("--pass-minutes", type=float, default=10.0, help="for the commits")
    parser.add_argument("--commit-interval", type=float, default=300.0, help="s, as in `stats`")
    parser.add_argument("--activation-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--dry-run-data",
        default=os.path.join(tempfile.gettempdir(), "condense-pipeline-bench", "imagenet-sizes"),
    )
    args = parser.parse_args()
    if args.activation_child:
        return activation_child(args.activation_child)

    from condense_pipeline.datasets import get_profile

    profile = get_profile("imagenet")
    K, M = profile.probes, profile.real_per_probe
    flops, traffic = conv_flops_and_bytes(64, 4)
    print(f"ConvNet-D4 at 64 px: {flops / 1e9:.3f} GFLOP of convolutions per forward, ")
    print(f"  {traffic / MiB:.1f} MiB of activation traffic per forward (unfused, float32)")

    measured = {
        "rates_1_thread": forward_rates(1),
        "activation_mib_per_image": activation_mib_per_image(),
        "decode": decode_rate(),
        "bank_build_s_K100_C1000": bank_build_seconds(K),
        "accumulate_overhead_s_per_512": {
            "key_hashes_only": hash_seconds(),
            "pool_1": accumulate_overhead(1),
            "pool_40": accumulate_overhead(40),
        },
    }
    print("measured on this machine:")
    print(json.dumps(measured, indent=2))

    forwards = K * M * IMAGENET_CLASSES  # every ImageNet class has more than M = 256 images
    one = measured["rates_1_thread"]
    print(f"\nstats pass: K={K} x M={M} x {IMAGENET_CLASSES} classes = {forwards:,} forwards")
    print(f"  per image: {forwards / IMAGENET_TRAIN:.1f} forwards on average; every image decoded")
    cpu_s = forwards / one["forward_per_s"]
    print(f"  one CPU thread (measured rate): {cpu_s / 3600:.0f} core-hours of forwards")
    decode_s = IMAGENET_TRAIN / measured["decode"]["decode_per_s"]
    print(f"  decode to 64 px (measured rate, one core): {decode_s / 3600:.2f} core-hours")

    fwd_s = flops / (args.assumed_tflops * 1e12) + traffic / (args.assumed_gbs * 1e9)
    print(
        f"\nESTIMATES (assumed GPU: {args.assumed_tflops:g} TFLOPS effective on the convs, "
        f"{args.assumed_gbs:g} GB/s effective memory traffic, no overlap):"
    )
    print(f"  probe forward: {fwd_s * 1e6:.1f} us -> {1 / fwd_s:,.0f} forwards/s per GPU")
    print(f"  stats pass forwards: {forwards * fwd_s / 60:.1f} GPU-minutes")
    print(f"  images/s one GPU consumes: {1 / fwd_s / (forwards / IMAGENET_TRAIN):,.0f}")
    step_img_s = 3 * fwd_s  # backward about twice the forward
    print(f"  condensation forward+backward: {1 / step_img_s:,.0f} images/s per GPU")
    for method in ("dm", "m3d", "datadam"):
        from condense_pipeline.config import condense_config

        cond = condense_config(profile, method, 10)
        per_step = IMAGENET_CLASSES * cond.ipc * cond.factor**2
        total = cond.steps * per_step * step_img_s
        print(
            f"  {method} IPC 10: {per_step:,} images per step x {cond.steps} steps = "
            f"{total / 3600:.1f} GPU-hours; activations of one step "
            f"{per_step * measured['activation_mib_per_image'] / 1024:.0f} GiB (fp32)"
        )

    commits = int(args.pass_minutes * 60 // args.commit_interval) + 1  # and one after the last
    print(f"\nsizes (K={K}, R={profile.rff_dim}, IPC 10 init pool; a {args.pass_minutes:g}-minute")
    print(f"  pass commits {commits} times, each time {args.gpus} workers' accumulators):")
    for row in sizes(commits, args.gpus):
        print(
            "  "
            + json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()})
        )

    write_dry_run_data(args.dry_run_data)
    print(f"\nwrote {args.dry_run_data}/dataset.json; now run:")
    print(f"  condense-pipeline run imagenet --ipc 10 --dry-run --data {args.dry_run_data}")


if __name__ == "__main__":
    main()
