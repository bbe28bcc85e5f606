"""Many classes: the whole job (stats -> condense -> export) on a generated dataset with 1000
classes and a few images per class, sampling the memory of every process it starts.

    .venv/bin/python benchmarks/many_classes.py --runs imagenet:5,imagenet:20,tinyimagenet:25

Each run NAME:N generates N patterned 64 px uint8 images per class of profile NAME (imagenet:
1000 classes, tinyimagenet: 200, both 64 px and ConvNet-D4), prepares them into shards of
--shard-size, then a child process starts a local Ray with --cpus logical CPUs (not timed) and
calls `api.run` with a tiny budget: --probes probes, --real-per-probe images per class per probe,
IPC --ipc, --steps condensation steps in --groups class groups, no evaluation. A thread samples,
every 0.5 s, the RSS of the child's own Ray processes: the StatsWorker actors, the condense_group
tasks, the other Ray workers (read and decode tasks) and the driver, where the statistics are
merged at the end of the stats stage. Comparing imagenet:5 with imagenet:20 shows whether memory
grows with the number of images; imagenet:5 with tinyimagenet:25 (the same 5000 images) whether it
grows with the number of classes. A stats worker's peak follows one probe's share of a batch,
512 * min(1, M / n_c) images, so compare workers at equal shares (imagenet:5 with
--real-per-probe 1 against imagenet:20 with 4). RSS counts shared pages a process touched (Ray's
object store included), so per-process peaks are upper bounds. Timings on a shared machine are
noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.join(tempfile.gettempdir(), "condense-pipeline-bench", "many_classes")
RES = 64  # both profiles used here are 64 px
MiB = 2**20


def make_images(classes: int, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [classes * per_class, 64, 64, 3]: per class a colour and a stripe direction, per image
    noise on top, so images of one class look alike and PNG sizes are realistic."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), per_class)
    colour = rng.integers(40, 216, (classes, 3))
    angle = rng.uniform(0, np.pi, classes)
    yy, xx = np.mgrid[0:RES, 0:RES]
    x = np.empty((len(y), RES, RES, 3), np.uint8)
    for c in range(classes):
        stripes = 30 * np.sin((np.cos(angle[c]) * xx + np.sin(angle[c]) * yy) / 3)
        base = colour[c][None, None, :] + stripes[:, :, None]
        rows = slice(c * per_class, (c + 1) * per_class)
        noise = rng.normal(0, 12, (per_class, RES, RES, 3))
        x[rows] = np.clip(base[None] + noise, 0, 255).astype(np.uint8)
    return x, y


def prepare(name: str, per_class: int, shard_size: int, folder: str) -> None:
    from condense_pipeline.datasets import get_profile
    from condense_pipeline.prepare import prepare_dataset

    classes = get_profile(name).num_classes
    x, y = make_images(classes, per_class)
    os.makedirs(folder, exist_ok=True)
    src = os.path.join(folder, "source.npz")
    np.savez(src, x=x, y=y)
    prepare_dataset(name, src, os.path.join(folder, "data"), shard_size=shard_size)
    os.remove(src)


# -- memory sampling ----------------------------------------------------------------------------
def kind_of(pid: int, args: str, driver: int) -> str | None:
    if pid == driver:
        return "driver"
    if "StatsWorker" in args:
        return "stats_worker"
    if "condense_group" in args:
        return "condense_task"
    if "_pilot_task" in args:
        return "pilot_task"
    if args.startswith("ray::"):
        return "other_worker"  # read and decode tasks, idle workers
    return None  # raylet, GCS and the other Ray services


class Sampler:
    """Peak RSS per kind of process among this process and its descendants (other Ray clusters
    on the machine are not counted), per stage of the job for the driver."""

    def __init__(self, interval: float = 0.5, stop_above_mib: float = 0.0, root: int = 0):
        self.interval, self.stage = interval, "start"
        self.root = root or os.getpid()  # the driver: this process, or a command it started
        # a process of ours above this RSS is killed (the machine would run out of memory)
        self.stop_above_mib = stop_above_mib
        self.stopped: list[dict] = []
        self.peak_one: dict[str, float] = {}  # the largest single process of a kind, MiB
        self.peak_sum: dict[str, float] = {}  # the largest sum over processes of a kind, MiB
        self.driver: dict[str, float] = {}  # stage -> driver peak, MiB
        self.pids: dict[str, set[int]] = {}  # kind -> every pid seen running as that kind
        self.most_at_once: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        out = subprocess.run(["ps", "-eo", "pid=,ppid=,rss=,args="], capture_output=True, text=True)
        procs = [line.split(None, 3) for line in out.stdout.splitlines()]
        procs = [p for p in procs if len(p) == 4]
        me = self.root
        mine, grew = {me}, True
        while grew:
            more = {int(p[0]) for p in procs if int(p[1]) in mine} - mine
            mine, grew = mine | more, bool(more)
        rss: dict[str, list[float]] = {}
        for pid, _, kib, args in procs:
            kind = kind_of(int(pid), args, me) if int(pid) in mine else None
            if kind:
                rss.setdefault(kind, []).append(int(kib) / 1024)
                self.pids.setdefault(kind, set()).add(int(pid))
                if kind != "driver" and 0 < self.stop_above_mib < int(kib) / 1024:
                    self.stopped.append({"kind": kind, "mib": int(kib) / 1024})
                    os.kill(int(pid), 9)
        for kind, values in rss.items():
            self.peak_one[kind] = max(self.peak_one.get(kind, 0.0), max(values))
            self.peak_sum[kind] = max(self.peak_sum.get(kind, 0.0), sum(values))
            self.most_at_once[kind] = max(self.most_at_once.get(kind, 0), len(values))
        if "driver" in rss:
            self.driver[self.stage] = max(self.driver.get(self.stage, 0.0), rss["driver"][0])


def folder_mib(path: str, prefix: str = "") -> float:
    total = 0
    for base, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(base, f)) for f in files if f.startswith(prefix))
    return total / MiB


# -- one run, in a child process ----------------------------------------------------------------
def child(args) -> None:
    import ray

    from condense_pipeline import api, storage
    from condense_pipeline.condense.bank import NEEDS
    from condense_pipeline.config import condense_config, init_images, stats_config
    from condense_pipeline.datasets import get_profile
    from condense_pipeline.pipeline.estimate import accumulator_bytes

    name, per_class = args.child.split(":")
    profile = get_profile(name)
    folder = os.path.join(args.root, f"{name}-{per_class}")
    run_dir = os.path.join(folder, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    # --chunk only when given, so that the script also runs against code without the option
    chunk = {"chunk": args.chunk} if args.chunk else {}
    cond = condense_config(
        profile,
        args.method,
        args.ipc,
        steps=args.steps,
        groups=args.groups or None,
        init=args.init,
        stall_timeout_s=args.stall_timeout,
        **chunk,
    )
    init_pool = max(init_images(args.ipc, cond.factor, cond.init), args.ipc, 1)
    scfg = stats_config(
        profile,
        (args.method,),
        probes=args.probes,
        real_per_probe=args.real_per_probe,
        init_pool=init_pool,
        stall_timeout_s=args.stall_timeout,
    )
    cfg = api.RunConfig(
        profile=profile,
        run_dir=run_dir,
        data=os.path.join(folder, "data", "train"),
        test=None,
        stats=scfg,
        condense=cond,
        evaluate=None,
    )
    ray.init(
        address="local",
        num_cpus=args.cpus,
        include_dashboard=False,
        logging_level="WARNING",
        _temp_dir=os.path.join(args.root, "ray"),
    )
    sampler = Sampler(interval=0.2, stop_above_mib=args.stop_above_gib * 1024)
    sampler.sample()
    before = sampler.driver.get("start", 0.0)
    sampler.start()

    def progress(line: str) -> None:
        if line.startswith("== "):
            sampler.stage = line[3:]
        print(line, file=sys.stderr, flush=True)

    try:
        summary, error = api.run(cfg, progress=progress), None
    except Exception as e:  # a stage killed for memory: report the peaks up to there
        summary, error = None, f"{type(e).__name__}: {str(e)[:300]}"
    sampler.stop()
    ray.shutdown()
    if summary is None:
        out = {"run": args.child, "error": error, "stopped": sampler.stopped}
        out.update(peak_one=sampler.peak_one, driver=sampler.driver)
        print("RESULT " + json.dumps(out), flush=True)
        return

    groups = []
    for entry in storage.list_dir(summary.condense_dir):
        done = os.path.join(summary.condense_dir, entry, storage.DONE)
        if entry.startswith("group-") and os.path.exists(done):
            groups.append(len(storage.read_json(done)["classes"]))
    info = json.load(open(os.path.join(cfg.data, "dataset.json")))
    needs = sorted({n for n in NEEDS[args.method]})
    acc = accumulator_bytes(profile, args.probes, needs, scfg.rff_dim)
    pool = profile.num_classes * init_pool * RES * RES * profile.channels
    out = {
        "run": args.child,
        "classes": profile.num_classes,
        "images": summary.stats["images"],
        "shards": len(info["shards"]),
        "units": -(-len(info["shards"]) // scfg.shards_per_unit),
        "workers": summary.stats["workers"],
        "forwards": summary.stats["forwards"],
        "seconds": summary.seconds,
        "groups": len(groups),
        "classes_per_group": [min(groups), max(groups)],
        "group_processes": len(sampler.pids.get("condense_task", ())),
        "groups_at_once": sampler.most_at_once.get("condense_task", 0),
        "peak_one": sampler.peak_one,
        "peak_sum": sampler.peak_sum,
        "driver_before": before,
        "driver": sampler.driver,
        "driver_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "accumulator_mib": (acc + pool) / MiB,
        "stats_files_mib": folder_mib(os.path.join(run_dir, "stats"), "classes-"),
        "export_mib": folder_mib(os.path.join(summary.condense_dir, "export")),
    }
    print("RESULT " + json.dumps(out), flush=True)


def measure(command: list[str], stop_above_gib: float) -> None:
    """Run one command (e.g. `condense-pipeline condense ...`) and print its processes' peaks."""
    proc = subprocess.Popen(command)
    sampler = Sampler(interval=0.2, stop_above_mib=stop_above_gib * 1024, root=proc.pid)
    sampler.start()
    rc = proc.wait()
    sampler.stop()
    out = {"command": " ".join(command), "rc": rc, "stopped": sampler.stopped}
    out.update(peak_one=sampler.peak_one, peak_sum=sampler.peak_sum)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    if "--measure" in sys.argv:  # many_classes.py [--stop-above-gib G] --measure COMMAND...
        at = sys.argv.index("--measure")
        head = sys.argv[:at]
        stop = float(head[head.index("--stop-above-gib") + 1]) if "--stop-above-gib" in head else 0
        return measure(sys.argv[at + 1 :], stop)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="imagenet:5,imagenet:20,tinyimagenet:25")
    parser.add_argument("--probes", type=int, default=2)
    parser.add_argument("--real-per-probe", type=int, default=4)
    parser.add_argument("--method", default="dm")
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--groups", type=int, default=8, help="0: one per worker (the default)")
    parser.add_argument("--init", default=None, help="real, noise or mix (default: the preset)")
    parser.add_argument("--chunk", type=int, default=0, help="images per chunk (0: automatic)")
    parser.add_argument(
        "--stop-above-gib", type=float, default=0, help="kill a process above this RSS (0: never)"
    )
    parser.add_argument("--stall-timeout", type=float, default=7200.0, help="s, for a stage")
    parser.add_argument("--only", action="store_true", help="print the child's RESULT row only")
    parser.add_argument("--cpus", type=int, default=3, help="logical CPUs of the local Ray")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--root", default=ROOT)
    parser.add_argument("--keep-data", action="store_true", help="reuse prepared data")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import ray

    runs = args.runs.split(",")
    for run in runs:
        folder = os.path.join(args.root, run.replace(":", "-"))
        if args.keep_data and os.path.exists(os.path.join(folder, "data", "train")):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not ray.is_initialized():
            ray.init(address="local", include_dashboard=False, logging_level="WARNING")
        started = time.perf_counter()
        name, per_class = run.split(":")
        prepare(name, int(per_class), args.shard_size, folder)
        print(f"{run}: prepared in {time.perf_counter() - started:.1f} s", flush=True)
    ray.shutdown()  # each child starts its own Ray, so only its processes are sampled

    rows = []
    for run in runs:
        cmd = [sys.executable, __file__, "--child", run, "--root", args.root]
        flags = ("probes", "real_per_probe", "method", "ipc", "steps", "groups", "cpus", "chunk")
        for flag in flags + ("stop_above_gib", "stall_timeout"):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        if args.init:
            cmd += ["--init", args.init]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{run} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        rows.append(json.loads(lines[-1][7:]))
        print(f"{run}: {json.dumps(rows[-1])}", flush=True)
    if args.only or any("error" in r for r in rows):
        return

    print(
        f"\nmethod {args.method}, K = {args.probes}, M = {args.real_per_probe}, IPC {args.ipc}, "
        f"{args.steps} steps, local Ray with {args.cpus} logical CPUs on {os.cpu_count()} cores\n"
    )
    print(
        "| run | classes | images | shards / units | stats workers | forwards | stats s "
        "| condense s | groups (classes each) | group processes (at once) "
        "| stats worker peak MiB | driver MiB: start / stats / condense / export "
        "| condense task peak MiB (sum) | read/decode workers peak MiB (sum) "
        "| accumulator + pool MiB | stats files MiB |"
    )
    print("|---" * 16 + "|")
    for r in rows:
        one, total, drv, s = r["peak_one"], r["peak_sum"], r["driver"], r["seconds"]
        lo, hi = r["classes_per_group"]
        print(
            f"| {r['run']} | {r['classes']} | {r['images']} | {r['shards']} / {r['units']} "
            f"| {r['workers']} | {r['forwards']} | {s['stats']:.0f} | {s['condense']:.0f} "
            f"| {r['groups']} ({lo}-{hi}) | {r['group_processes']} ({r['groups_at_once']}) "
            f"| {one.get('stats_worker', 0):.0f} "
            f"| {r['driver_before']:.0f} / {drv.get('stats', 0):.0f} "
            f"/ {drv.get('condense', 0):.0f} / {drv.get('export', 0):.0f} "
            f"| {one.get('condense_task', 0):.0f} ({total.get('condense_task', 0):.0f}) "
            f"| {one.get('other_worker', 0):.0f} ({total.get('other_worker', 0):.0f}) "
            f"| {r['accumulator_mib']:.0f} | {r['stats_files_mib']:.1f} |"
        )


if __name__ == "__main__":
    main()
