"""The driver's peak memory while it merges the workers' checkpoints at the end of the stats pass,
at ImageNet's 1000 classes (dm statistics, D = 2048, init pool 10, every value written so that
every page is real):

    .venv/bin/python benchmarks/merge_peak.py --probes 100 --layout groups
    PYTHONPATH=/path/to/old/checkout .venv/bin/python benchmarks/merge_peak.py --layout whole

`whole`: each worker's checkpoint is one file, loaded whole and added up, then saved per 100
classes (the merge before class-group checkpoints; run it with the old code on PYTHONPATH).
`groups`: each checkpoint is a folder of class-group files, summed a group at a time
(pipeline/class_files.py merge). A child process does the merge and reports its peak RSS above
its resident memory before the merge (Linux's VmHWM, reset after the imports and a first use of
the torch functions the merge calls, whose libraries load on first use); the checkpoints are
written before it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

MiB = 2**20
CLASSES = 1000


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the present RSS, which it returns: the
    imports' transient peak must not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def write(folder: str, probes: int, workers: int, layout: str) -> int:
    """The workers' checkpoints; returns the bytes of one worker's checkpoint."""
    from condense_pipeline.condense.bank import ProbeBank
    from condense_pipeline.condense.stats import ClassStats
    from condense_pipeline.config import stats_config
    from condense_pipeline.datasets import get_profile
    from condense_pipeline.pipeline.stats import bank_spec

    profile = get_profile("imagenet")
    bank = ProbeBank(bank_spec(profile, stats_config(profile, ("dm",), probes=probes)))
    for w in range(workers):
        stats = ClassStats.zeros(bank, 10)
        stats.emb_sum.normal_()
        stats.count.fill_(3.0)
        stats.pool_images.random_(0, 256)
        stats.pool_hash[:] = np.arange(stats.pool_hash.size, dtype=np.uint64).reshape(-1, 10)
        if layout == "whole":
            stats.save(os.path.join(folder, f"w{w}.safetensors"))
        else:
            from condense_pipeline.pipeline.class_files import save_groups

            save_groups(stats, os.path.join(folder, f"w{w}"))
        del stats
    first = os.path.join(folder, "w0.safetensors" if layout == "whole" else "w0")
    if layout == "whole":
        return os.path.getsize(first)
    return sum(os.path.getsize(os.path.join(first, f)) for f in os.listdir(first))


def child(folder: str, layout: str, workers: int) -> None:
    import torch

    from condense_pipeline.condense.stats import ClassStats

    torch.linalg.vector_norm(torch.ones(2, 2, dtype=torch.float64), dim=-1)
    if layout == "groups":
        from condense_pipeline.pipeline.class_files import merge
    out = os.path.join(folder, "out")
    os.makedirs(out)
    base = reset_peak()
    if layout == "whole":  # the end of run_stats before class-group checkpoints
        total = None
        for w in range(workers):
            part = ClassStats.load(os.path.join(folder, f"w{w}.safetensors"))
            total = part if total is None else total + part
        for start in range(0, CLASSES, 100):
            path = os.path.join(out, f"classes-{start:05d}.safetensors")
            total.select(list(range(start, start + 100))).save(path)
    else:
        merge([os.path.join(folder, f"w{w}") for w in range(workers)], CLASSES, out)
    print(_status("VmHWM") - base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layout", choices=("whole", "groups"), default="groups")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.layout, args.workers)
    folder = tempfile.mkdtemp(prefix="merge-peak-")
    try:
        size = write(folder, args.probes, args.workers, args.layout)
        cmd = [sys.executable, __file__, "--child", folder, "--layout", args.layout]
        cmd += ["--workers", str(args.workers)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peak = int(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder)
    group = size / (CLASSES / 100)
    result = {
        "layout": args.layout,
        "code": os.environ.get("PYTHONPATH", "."),
        "probes": args.probes,
        "workers": args.workers,
        "checkpoint_mib": round(size / MiB, 1),
        "group_file_mib": round(group / MiB, 1),
        "merge_peak_mib": round(peak / MiB, 1),
        "peak_per_checkpoint": round(peak / size, 2),
        "peak_per_group_file": round(peak / group, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
