"""Seconds per epoch of the evaluation protocol's training, eager against `evaluate --compile`.

    .venv/bin/python benchmarks/eval_compile.py --ipc 50 --epochs 5 --repeats 3

MNIST's shapes (1 x 28 x 28, ten classes, ConvNet-3, batch 256, DSA), random images: the cost of a
step does not depend on their values. Each (threads, mode) row runs in its own process with a fresh
inductor cache, so "first" includes a cold compile: the protocol's `train` for --epochs on one
fresh network, then --repeats more networks of the same shape (no recompile), whose median is the
steady per-epoch figure. Peak RSS is the process's. 1 thread is what a Ray task of `evaluate`
gets; 2 threads is a plain loop using both cores of the project's machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def one(threads: int, compile_: bool, ipc: int, epochs: int, repeats: int) -> dict:
    import torch

    from condense_pipeline.condense.networks import seeded_model
    from condense_pipeline.datasets import get_profile
    from condense_pipeline.evaluate.protocol import EvalConfig, train

    torch.set_num_threads(threads)
    profile = get_profile("mnist")
    x = torch.randn(10 * ipc, 1, 28, 28)
    y = torch.arange(10).repeat_interleave(ipc)
    cfg = EvalConfig(epochs=epochs, compile=compile_)
    seconds = []
    for seed in range(1 + repeats):
        model = seeded_model("convnet", seed, 1, 28, 10)
        started = time.perf_counter()
        train(model, x, y, profile.augment, cfg, torch.Generator().manual_seed(seed))
        seconds.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    steady = statistics.median(seconds[1:]) / epochs
    return {"first_s": seconds[0], "epoch_s": steady, "peak_rss_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ipc", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "threads,compile": a child process
    a = parser.parse_args()
    if a.one:
        threads, compile_ = map(int, a.one.split(","))
        print(json.dumps(one(threads, bool(compile_), a.ipc, a.epochs, a.repeats)))
        return
    print(f"MNIST IPC {a.ipc}: {10 * a.ipc} images, {a.epochs} epochs per network")
    print(
        "| threads | mode | first network s (compile incl.) | s per epoch (median) | ratio "
        "| peak RSS GiB |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for threads in map(int, a.threads.split(",")):
        rows = {}
        for compile_ in (0, 1):
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                args = [*sys.argv, "--one", f"{threads},{compile_}"]
                out = subprocess.run(
                    [sys.executable, *args], env=env, capture_output=True, text=True, check=True
                )
            rows[compile_] = json.loads(out.stdout.strip().splitlines()[-1])
        for compile_, r in rows.items():
            ratio = rows[0]["epoch_s"] / r["epoch_s"]
            print(
                f"| {threads} | {'compiled' if compile_ else 'eager'} | {r['first_s']:.1f} | "
                f"{r['epoch_s']:.2f} | {ratio:.2f}x | {r['peak_rss_gib']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
