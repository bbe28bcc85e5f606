"""The GPU path, measured on one GPU without Ray and without any download (issue 11).

    PYTHONPATH=. python3 benchmarks/gpu_check.py            # on a CUDA machine: the figures
    PYTHONPATH=. python3 benchmarks/gpu_check.py --device cpu --tiny   # logic check only

It drives condense/ directly on generated images at 64 px (the imagenet profile's network):
- the stats pass: `accumulate` over batches of 512 images, K = 100 probes, 1000 classes,
  M = 256 of 1281 images per class (so about 20 probe forwards per image), for dm's statistics
  and for m3d's (embedding sums plus random features): forwards/s and images/s;
- condensation images/s (decoded images through forward and backward per second) for dm, m3d
  (factor 2) and datadam, 100 classes at IPC 10, chunked to the GPU's free memory;
- peak GPU memory of that m3d condensation with the automatic chunk and with chunks of 256, and the
  images one unchunked step would hold;
- the M3D pilot's peak memory at 1000 classes x 32 images.
It prints one JSON object and a markdown table to paste into benchmarks/RESULTS.md. On a CPU
(--device cpu, with --tiny for small sizes) it checks the same code paths and reports no GPU
figure. benchmarks/gpu_check.sh runs it and then the tests marked `gpu`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from dataclasses import replace

sys.modules["ray"] = None  # this check must never need Ray: importing it fails loudly

NEEDED = ("torch", "torchvision", "numpy", "safetensors", "pyarrow", "typer", "PIL", "pytest")


def check_environment(device: str) -> None:
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        sys.exit(f"gpu_check: missing Python packages: {', '.join(missing)}")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (torch.cuda.is_available() is False); use --device cpu")


def numerics_line(device: str) -> str:
    import torch

    if device != "cuda":
        return "float32 on CPU"
    return (
        f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, "
        f"TF32 cuDNN {torch.backends.cudnn.allow_tf32}"
    )


def spec(classes: int, probes: int, statistics, rff_dim: int = 5120, res: int = 64):
    from condense_pipeline.condense.bank import BankSpec
    from condense_pipeline.datasets import get_profile

    p = get_profile("imagenet", res)
    return BankSpec(
        seed=0,
        probes=probes,
        num_classes=classes,
        channels=3,
        resolution=res,
        depth=p.depth,
        mean=p.mean,
        std=p.std,
        augment=p.augment,
        real_per_probe=256,
        statistics=tuple(statistics),
        rff_dim=rff_dim,
        pilot_per_class=32 if "rff" in statistics else 0,
    )


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def images(n: int, classes: int, res: int, seed: int):
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8))
    y = rng.integers(0, classes, n).astype(np.int64)
    return x, y, [f"s{seed}-{i}" for i in range(n)]


def stats_pass(device, classes, probes, batches, batch, statistics, res):
    """(forwards/s, images/s) of accumulate over `batches` batches after one warm-up batch."""
    import numpy as np
    import torch

    from condense_pipeline.condense.bank import ProbeBank
    from condense_pipeline.condense.stats import ClassStats, accumulate

    bank = ProbeBank(spec(classes, probes, statistics, res=res), device)
    counts = np.full(classes, 1281)
    h = torch.ones(probes, classes, dtype=torch.float64) * 2000.0 if "rff" in statistics else None
    stats = ClassStats.zeros(bank, 0)
    data = [images(batch, classes, res, seed) for seed in range(batches + 1)]
    accumulate(stats, bank, *data[0], counts, h)  # warm-up: networks built, kernels chosen
    sync(device)
    started, forwards = time.perf_counter(), 0
    for x, y, keys in data[1:]:
        forwards += accumulate(stats, bank, x, y, keys, counts, h)
    sync(device)
    seconds = time.perf_counter() - started
    return forwards / seconds, batches * batch / seconds


def condense_run(device, method, classes, ipc, steps, chunk, res):
    """(decoded images/s, peak GiB, chunk used, decoded images per step, bytes per decoded
    image) of `steps` steps after one."""
    import numpy as np
    import torch

    from condense_pipeline.condense.bank import ProbeBank, pilot_bandwidths
    from condense_pipeline.condense.device import chunk_size, image_bytes
    from condense_pipeline.condense.loop import LoopState, condense_loop
    from condense_pipeline.condense.stats import ClassStats, accumulate
    from condense_pipeline.condense.targets import BankTargets
    from condense_pipeline.config import condense_config
    from condense_pipeline.datasets import get_profile

    profile = get_profile("imagenet", res)
    bank = ProbeBank(spec(classes, 4, ("emb", "rff", "att"), rff_dim=1280, res=res), device)
    x, y, keys = images(4 * classes, classes, res, 7)
    y = np.repeat(np.arange(classes), 4)
    h = pilot_bandwidths(bank, x, torch.from_numpy(y))
    stats = ClassStats.zeros(bank, 0)
    accumulate(stats, bank, x, y, keys, np.full(classes, 4), h)
    cfg = condense_config(profile, method, ipc, steps=steps + 1, init="noise")
    per_image = cfg.factor**2 * image_bytes(res, profile.depth, method == "datadam")
    chunk = chunk or chunk_size(torch.device(device), per_image)
    start = torch.randn(classes * ipc, 3, res, res, generator=torch.Generator().manual_seed(0))
    state = LoopState(0, start.to(device), torch.zeros_like(start, device=device))
    targets = BankTargets(bank, stats, list(range(classes)), h, cfg)
    warm = condense_loop(state, targets, replace(cfg, steps=1), bank, chunk)
    sync(device)
    peak_reset(device)
    started = time.perf_counter()
    condense_loop(warm, targets, cfg, bank, chunk)
    sync(device)
    per_step = classes * ipc * cfg.factor**2  # decoded images
    seconds = time.perf_counter() - started
    return per_step * steps / seconds, peak_gib(device), chunk, per_step, per_image / cfg.factor**2


def pilot_peak(device, classes, per_class, probes, res):
    import numpy as np
    import torch

    from condense_pipeline.condense.bank import ProbeBank, pilot_bandwidths

    bank = ProbeBank(spec(classes, probes, ("emb", "rff"), res=res), device)
    x, _, _ = images(classes * per_class, classes, res, 11)
    y = torch.from_numpy(np.repeat(np.arange(classes), per_class))
    bank.network(0)
    peak_reset(device)
    started = time.perf_counter()
    pilot_bandwidths(bank, x, y)
    sync(device)
    return peak_gib(device), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="small sizes: checks the logic only")
    args = parser.parse_args()
    check_environment(args.device)
    import torch

    dev = args.device
    if args.tiny:
        sizes = dict(classes=10, probes=2, batches=2, batch=32, cond_classes=4, ipc=2, steps=1)
        sizes.update(chunk=3)
        sizes.update(pilot_classes=10, pilot_per_class=8, pilot_probes=1, res=32)
    else:
        sizes = dict(classes=1000, probes=100, batches=5, batch=512, cond_classes=100, ipc=10)
        sizes.update(steps=3, pilot_classes=1000, pilot_per_class=32, pilot_probes=2, res=64)
        sizes.update(chunk=256)
    s, res = sizes, sizes["res"]
    began = time.perf_counter()
    out = {
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "numerics": numerics_line(dev),
        "sizes": sizes,
        "stats": {},
        "condense": {},
    }
    for name, statistics in (("dm", ("emb",)), ("m3d", ("emb", "rff"))):
        f, i = stats_pass(dev, s["classes"], s["probes"], s["batches"], s["batch"], statistics, res)
        out["stats"][name] = {"forwards_per_s": round(f), "images_per_s": round(i)}
        print(f"stats {name}: {f:.0f} forwards/s, {i:.0f} images/s", file=sys.stderr)
    for method in ("dm", "m3d", "datadam"):
        rate, peak, chunk, per_step, per_image = condense_run(
            dev, method, s["cond_classes"], s["ipc"], s["steps"], None, res
        )
        row = {"images_per_s": round(rate, 1), "peak_gib": peak, "chunk": chunk}
        row.update(images_per_step=per_step, unchunked_gib=per_step * per_image / 2**30)
        out["condense"][method] = row
        print(f"condense {method}: {json.dumps(row)}", file=sys.stderr)
    _, peak, _, _, _ = condense_run(dev, "m3d", s["cond_classes"], s["ipc"], 1, s["chunk"], res)
    out["condense"]["m3d_fixed_chunk_peak_gib"] = peak
    peak, seconds = pilot_peak(
        dev, s["pilot_classes"], s["pilot_per_class"], s["pilot_probes"], res
    )
    out["pilot"] = {"peak_gib": peak, "seconds": round(seconds, 1)}
    out["seconds"] = round(time.perf_counter() - began, 1)
    if dev != "cuda":
        out["note"] = "CPU logic check: no GPU figure; peaks are not measured on a CPU"
    print(json.dumps(out, indent=1))
    print(markdown(out))


def markdown(o: dict) -> str:
    def gib(v):
        return "n/a" if v is None else f"{v:.2f}"

    c = o["condense"]
    lines = [
        f"gpu_check on {o['device']}, torch {o['torch']}, {o['numerics']}, {o['seconds']} s",
        "",
        "| figure | value |",
        "|---|---:|",
    ]
    for name, row in o["stats"].items():
        lines.append(
            f"| stats pass, {name} statistics: forwards/s, images/s | "
            f"{row['forwards_per_s']}, {row['images_per_s']} |"
        )
    for method in ("dm", "m3d", "datadam"):
        r = c[method]
        lines.append(
            f"| condense {method}: images/s (chunk {r['chunk']}, {r['images_per_step']} per step) "
            f"| {r['images_per_s']} |"
        )
    m = c["m3d"]
    lines.append(
        f"| m3d peak GiB: automatic chunk / chunk {o['sizes']['chunk']} (unchunked would hold "
        f"{m['unchunked_gib']:.1f}) | {gib(m['peak_gib'])} / {gib(c['m3d_fixed_chunk_peak_gib'])} |"
    )
    lines.append(f"| pilot peak GiB ({o['pilot']['seconds']} s) | {gib(o['pilot']['peak_gib'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
