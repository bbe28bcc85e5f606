"""Bytes the statistics pass writes as checkpoints, measured from outside the pass: a thread lists
RUN_DIR/stats/partial every 0.1 s and adds up the size of every finished file it sees (names are
never reused, and a checkpoint lives until the next commit, far longer than 0.1 s). The same
`stats` command runs whatever code PYTHONPATH points at, so today's and another version compare:

    PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/checkpoint_bytes.py \\
        --data DATA/mnist/train -- mnist --method m3d --probes 200 --real-per-probe 32

Everything after `--` goes to `condense-pipeline stats` (with --data and a fresh --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

GiB = 2**30


def watch(folder: str, seen: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                if ".tmp-" not in name and path not in seen:
                    try:
                        seen[path] = os.path.getsize(path)
                    except OSError:
                        pass  # deleted meanwhile
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("stats_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="ckpt-bytes-")
    extra = [a for a in args.stats_args if a != "--"]
    cmd = [sys.executable, "-m", "condense_pipeline.cli.app", "stats", *extra]
    cmd += ["--data", args.data, "--out", out]
    seen: dict[str, int] = {}
    stop = threading.Event()
    thread = threading.Thread(
        target=watch, args=(os.path.join(out, "stats", "partial"), seen, stop)
    )
    thread.start()
    started = time.perf_counter()
    # run outside any checkout: `python -m` puts the working folder ahead of PYTHONPATH
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
    stop.set()
    thread.join()
    if run.returncode:
        sys.exit(run.stderr[-3000:])
    summary = json.load(open(os.path.join(out, "stats", "_DONE")))
    result = {
        "code": os.environ.get("PYTHONPATH", "."),
        "command": " ".join(cmd[3:-2]),
        "seconds": round(time.perf_counter() - started, 1),
        "workers": summary["workers"],
        "files": len(seen),
        "checkpoint_bytes": sum(seen.values()),
        "checkpoint_gib": round(sum(seen.values()) / GiB, 3),
        "reported_by_the_pass": summary.get("checkpoint_bytes"),
        "commits": summary.get("commits"),
    }
    print(json.dumps(result))
    shutil.rmtree(out)


if __name__ == "__main__":
    main()
