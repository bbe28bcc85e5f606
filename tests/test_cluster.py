"""Multi-node Ray on this machine (ray.cluster_utils.Cluster: a head and two worker nodes of one
CPU and a 150 MiB object store each): the stages across nodes give what one node gives, a node
lost during statistics or condensation costs a rerun of its unit or group and nothing else, a
killed driver's run resumes from committed units and group checkpoints, and the CLI runs as a
`ray job submit` job. The first, short one runs in `make test`; the rest are marked `cluster`
(`make test-cluster`)."""

import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import free_port
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from condense_pipeline import storage
from condense_pipeline.condense.bank import BankSpec, ProbeBank
from condense_pipeline.condense.stats import ClassStats, accumulate
from condense_pipeline.config import CondenseConfig, condense_config, stats_config
from condense_pipeline.datasets import get_profile
from condense_pipeline.errors import UserError
from condense_pipeline.formats import BANK_JSON, ERROR, IMAGE, KEY, LABEL
from condense_pipeline.pipeline import read
from condense_pipeline.pipeline.commits import PROGRESS_JSON
from condense_pipeline.pipeline.condense import (
    CHECKPOINT,
    RESULT,
    condense_dir,
    condense_group,
    group_dir,
    run_condense,
    split_groups,
)
from condense_pipeline.pipeline.stats import load_bandwidths, load_stats, run_stats, stats_dir
from condense_pipeline.prepare import prepare_dataset

PROFILE = get_profile("digits")
CLI = [sys.executable, "-m", "condense_pipeline.cli.app"]
# A killed node (its checks fail at once) is declared dead after about 5 s instead of Ray's
# default of about 30 s; a live one slowed by a loaded machine still has 3 s to answer each check.
HEALTH_CHECKS = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 3000,
    "health_check_failure_threshold": 5,
}
WORKER_NODES = 2
STALL_S = 120  # far above a unit or a group on this machine: only a real hang trips it
# The cluster tests' settings (all statistics, a condensation long enough to lose a node in)
STATS = replace(
    stats_config(PROFILE, ("dm", "m3d", "datadam")),
    probes=4,
    init_pool=8,
    shards_per_unit=2,
    stall_timeout_s=STALL_S,
    commit_interval_s=0,  # a commit after every unit: a node is lost between two commits
)
CONDENSE = condense_config(PROFILE, "dm", 2, steps=800, groups=2, stall_timeout_s=STALL_S)


# -- the cluster ----------------------------------------------------------------------------------
def _ray_tmpdir() -> str:
    """A Ray temp root of our own, so that the address file a head writes there does not send
    other processes' bare ray.init() on this machine to it; short, for Unix socket paths."""
    return tempfile.mkdtemp(prefix="rc", dir="/tmp")


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes, this process its driver; tests that kill a node call
    _restore first."""
    tmp = _ray_tmpdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", tmp)
        c = Cluster()
        try:
            c.add_node(
                num_cpus=1,
                include_dashboard=False,
                dashboard_agent_listen_port=None,  # a free port, not Ray's fixed default
                _system_config=HEALTH_CHECKS,
            )
            _restore(c, connect=True)
            yield c
        finally:
            ray.shutdown()
            c.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def _restore(c: Cluster, connect: bool = False) -> None:
    """Bring the cluster back to its worker nodes (after a test killed one)."""
    for _ in range(WORKER_NODES - len(c.worker_nodes)):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    if connect:
        ray.init(address=c.address, logging_level="ERROR")
    cpus = 1 + WORKER_NODES
    _wait_for(lambda: ray.cluster_resources().get("CPU") == cpus, f"{cpus} CPUs", 60)


def _runs(node, title: str) -> bool:
    """Whether one of the node's worker processes runs `title` (Ray titles them ray::TITLE)."""
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == raylet and f"ray::{title}".encode() in (proc / "cmdline").read_bytes():
                return True
        except (OSError, ValueError):
            continue  # the process ended meanwhile
    return False


def _kill_when(c: Cluster, ready, title: str) -> list:
    """In the background: once `ready()`, SIGKILL every process of a worker node that runs
    `title`. Returns a list that then holds that node (None if no worker node ran it)."""
    killed = []

    def watch():
        _wait_for(ready, "the moment to kill a node", 300)
        victim = next((n for n in c.worker_nodes if _runs(n, title)), None)
        if victim is not None:
            c.remove_node(victim, allow_graceful=False)
        killed.append(victim)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def _wait_for(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits"))
    started = not ray.is_initialized()
    prepare_dataset("digits", None, out, shard_size=150)  # 9 train shards (validation held out)
    if started and ray.is_initialized():
        ray.shutdown()  # the local Ray that prepare started
    return os.path.join(out, "train")


def _done_units(run_dir: str) -> list[int]:
    path = os.path.join(stats_dir(run_dir), PROGRESS_JSON)
    return storage.read_json(path)["done_units"] if os.path.exists(path) else []


# -- what an uninterrupted run gives --------------------------------------------------------------
def _plain_stats(shards: str, run_dir: str) -> ClassStats:
    """The run's statistics computed without Ray: one accumulator, one pass, its bank.json."""
    bank_json = storage.read_json(os.path.join(stats_dir(run_dir), BANK_JSON))
    bank = ProbeBank(BankSpec.from_json(bank_json["spec"]))
    stats = ClassStats.zeros(bank, bank_json["init_pool"])
    counts = np.asarray(read.load_dataset_info(shards)["counts"])
    rows = [r for r in read.iter_decoded(storage.list_shards(shards), PROFILE, 10) if not r[ERROR]]
    images = torch.from_numpy(np.stack([r[IMAGE] for r in rows]))
    labels = np.array([r[LABEL] for r in rows])
    accumulate(
        stats,
        bank,
        images,
        labels,
        [r[KEY] for r in rows],
        counts,
        load_bandwidths(run_dir),
        bank.spec.attention_power,
    )
    return stats


def _in_process_images(run_dir: str, cfg: CondenseConfig, tmp: Path) -> torch.Tensor:
    """The condensation of the run's statistics in this process, group by group, no Ray."""
    copy = str(tmp / "in-process")
    shutil.copytree(stats_dir(run_dir), stats_dir(copy))
    classes = list(cfg.classes or range(PROFILE.num_classes))
    images = []
    for g, group in enumerate(split_groups(classes, cfg.groups)):
        condense_group(copy, cfg, group, g)
        out = os.path.join(group_dir(condense_dir(copy, cfg), group), RESULT)
        images.append(_load_images(out))
    return torch.cat(images)


def _load_images(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(path)["images"]


def _assert_stats_close(a: ClassStats, b: ClassStats, tol: float = 1e-5) -> None:
    assert torch.equal(a.count, b.count)  # no unit lost or counted twice
    assert torch.equal(a.seen, b.seen)
    pairs = [(getattr(a, n), getattr(b, n)) for n in ("emb_sum", "rff_sum", "sqnorm_sum")]
    for x, y in [*pairs, *zip(a.att_sum, b.att_sum)]:
        if y is not None:
            assert ((x - y).abs().max() / y.abs().max()).item() < tol
    assert a.pool_keys == b.pool_keys


def _assert_images_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < tol


# -- in `make test`: across nodes, with a node lost during statistics -----------------------------
def test_stats_and_condense_across_nodes_survive_a_lost_node(cluster, shards, tmp_path):
    _restore(cluster)
    run_dir = str(tmp_path / "run")
    # 32 probes: the units after the first outlast the moment it takes to kill the node
    cfg = replace(STATS, methods=("dm",), init_pool=2, probes=32)
    killed = _kill_when(cluster, lambda: _done_units(run_dir), "StatsWorker")
    summary = run_stats(PROFILE, shards, run_dir, cfg).summary
    _wait_for(lambda: killed, "the node kill", 30)
    assert killed[0] is not None, "no worker node ran a StatsWorker"
    assert len(cluster.worker_nodes) == WORKER_NODES - 1
    # the unit running when the node went is rerun, and said so (the reason depends on which
    # part of Ray notices first: a dead or unavailable actor, lost blocks, a timeout)
    assert summary["retries"], summary
    assert all(r["unit"] >= 1 and r["why"] for r in summary["retries"])
    assert summary["images"] == 1337 and summary["workers"] == 1
    _assert_stats_close(load_stats(run_dir, list(range(10))), _plain_stats(shards, run_dir))

    # condensation on the head and the node that is left equals it in one process
    cond = condense_config(PROFILE, "dm", 1, steps=20, groups=2)
    result = run_condense(run_dir, cond)
    assert result.groups_run == 2 and not result.retries
    _assert_images_close(result.images, _in_process_images(run_dir, cond, tmp_path))


# -- make test-cluster ----------------------------------------------------------------------------
SINGLE_NODE = """
import pickle, sys, ray
from condense_pipeline.datasets import get_profile
from condense_pipeline.pipeline.condense import run_condense
from condense_pipeline.pipeline.stats import run_stats
shards, run_dir, configs = sys.argv[1:]
with open(configs, "rb") as f:
    stats, condense = pickle.load(f)
ray.init(address="local", num_cpus=2, include_dashboard=False)
print("workers", run_stats(get_profile("digits"), shards, run_dir, stats).summary["workers"])
run_condense(run_dir, condense)
"""


@pytest.fixture(scope="module")
def single_node(shards, tmp_path_factory):
    """STATS and CONDENSE on a single-node Ray of its own, in a process of its own (a driver
    that started a local Ray cannot start actors on a cluster it joins afterwards)."""
    tmp = tmp_path_factory.mktemp("single-node")
    run_dir = str(tmp / "run")
    with open(tmp / "configs.pickle", "wb") as f:
        pickle.dump((STATS, CONDENSE), f)
    ray_tmp = _ray_tmpdir()
    out = subprocess.run(
        [sys.executable, "-c", SINGLE_NODE, shards, run_dir, str(tmp / "configs.pickle")],
        env={**os.environ, "RAY_TMPDIR": ray_tmp},
        capture_output=True,
        text=True,
    )
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "workers 1" in out.stdout  # 2 CPUs: one worker, one CPU for reading
    images = torch.cat(
        [
            _load_images(str(p))
            for p in sorted(Path(run_dir, "condense").glob(f"*/group-*/{RESULT}"))
        ]
    )
    return run_dir, images


@pytest.mark.cluster
def test_three_nodes_equal_a_single_node(cluster, shards, single_node, tmp_path):
    _restore(cluster)
    ref_dir, ref_images = single_node
    run_dir = str(tmp_path / "run")
    summary = run_stats(PROFILE, shards, run_dir, STATS).summary
    assert summary["workers"] == 2 and not summary["retries"]
    _assert_stats_close(load_stats(run_dir, list(range(10))), load_stats(ref_dir, list(range(10))))
    assert torch.equal(load_bandwidths(run_dir), load_bandwidths(ref_dir))
    result = run_condense(run_dir, CONDENSE)
    _assert_images_close(result.images, ref_images)


@pytest.mark.cluster
def test_node_lost_mid_stats(cluster, shards, tmp_path):
    _restore(cluster)
    run_dir = str(tmp_path / "run")
    killed = _kill_when(cluster, lambda: _done_units(run_dir), "StatsWorker")
    # 32 probes: the units after the first outlast the moment it takes to kill the node
    summary = run_stats(PROFILE, shards, run_dir, replace(STATS, probes=32)).summary
    _wait_for(lambda: killed, "the node kill", 30)
    assert killed[0] is not None, "no worker node ran a StatsWorker"
    assert summary["retries"] and all(r["unit"] >= 1 for r in summary["retries"])
    assert storage.read_json(os.path.join(stats_dir(run_dir), "_DONE"))["retries"]
    _assert_stats_close(load_stats(run_dir, list(range(10))), _plain_stats(shards, run_dir))


@pytest.mark.cluster
def test_node_lost_mid_condense(cluster, single_node, tmp_path):
    _restore(cluster)
    ref_dir, ref_images = single_node
    run_dir = str(tmp_path / "run")
    shutil.copytree(stats_dir(ref_dir), stats_dir(run_dir))  # the same statistics
    folder = condense_dir(run_dir, CONDENSE)
    groups = split_groups(list(range(10)), CONDENSE.groups)

    def every_group_checkpointed():  # so the lost group resumes from a checkpoint
        return all(os.path.exists(os.path.join(group_dir(folder, g), CHECKPOINT)) for g in groups)

    killed = _kill_when(cluster, every_group_checkpointed, "condense_group")
    result = run_condense(run_dir, CONDENSE)
    _wait_for(lambda: killed, "the node kill", 30)
    assert killed[0] is not None, "no worker node ran a group"
    # one group was rerun, once, because its node died (or, seen first, its worker)
    assert len(result.retries) == 1 and result.retries[0]["attempt"] == 1, result.retries
    assert result.retries[0]["why"] in ("NodeDiedError", "WorkerCrashedError")
    assert result.groups_run == 2
    _assert_images_close(result.images, ref_images)


@ray.remote(num_cpus=1)
class _Hog:
    """Holds a CPU."""

    def ready(self) -> bool:
        return True


@pytest.mark.cluster
def test_a_stage_that_cannot_run_fails_with_a_line_naming_it(
    cluster, shards, single_node, tmp_path
):
    _restore(cluster)
    ref_dir, _ = single_node
    run_dir = str(tmp_path / "run")
    shutil.copytree(stats_dir(ref_dir), stats_dir(run_dir))
    hogs = [_Hog.remote() for _ in range(1 + WORKER_NODES)]  # every CPU: nothing can start
    ray.get([h.ready.remote() for h in hogs])
    try:
        with pytest.raises(UserError, match=r"^condense stage stalled: no group made a step") as e:
            run_condense(run_dir, replace(CONDENSE, stall_timeout_s=5))
        assert "\n" not in str(e.value)
        with pytest.raises(UserError, match=r"^stats stage stalled: unit 1 failed 3 times") as e:
            cfg = replace(STATS, methods=("dm",), stall_timeout_s=3)
            run_stats(PROFILE, shards, str(tmp_path / "stats"), cfg)
        assert "workers did not start: GetTimeoutError" in str(e.value)
        assert "\n" not in str(e.value)
        with pytest.raises(UserError, match=r"^stats stage stalled: the M3D bandwidth pilot") as e:
            cfg = replace(STATS, methods=("m3d",), stall_timeout_s=3)
            run_stats(PROFILE, shards, str(tmp_path / "m3d"), cfg)
        assert "\n" not in str(e.value)
    finally:
        for h in hogs:
            ray.kill(h)


@pytest.mark.cluster
def test_killed_driver_resumes_from_committed_units_and_checkpoints(cluster, shards, tmp_path):
    _restore(cluster)
    run_dir = str(tmp_path / "run")
    args = [
        *CLI,
        "run",
        "digits",
        "--ipc",
        "2",
        "--data",
        shards,
        "--out",
        run_dir,
        "--probes",
        "40",  # a second stats unit (2 shards) long enough to be killed before it commits
        "--iterations",
        "500",  # checkpoints at steps 200 and 400
        "--classes",
        "0-3",
        "--commit-interval",
        "0",  # the first unit is committed alone
        "--no-eval",
        "--address",
        cluster.address,
    ]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}  # every task's log line reaches the driver

    def killed_when(ready) -> str:
        """Run the command, SIGKILL it once `ready()`; its stdout."""
        out, err = tmp_path / "killed.out", tmp_path / "killed.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            proc = subprocess.Popen(args, stdout=stdout, stderr=stderr, env=env)
            deadline = time.monotonic() + 300
            try:
                while not ready():
                    assert proc.poll() is None and time.monotonic() < deadline, (
                        "the run ended or took too long: " + err.read_text()[-3000:]
                    )
                    time.sleep(0.2)
            finally:
                proc.kill()  # SIGKILL, a no-op once it has ended
                proc.wait()
        return out.read_text()

    # 1. killed after the first of the two stats units committed
    killed_when(lambda: _done_units(run_dir))
    assert _done_units(run_dir) == [0]

    # 2. rerun: only the second unit is computed; killed once the groups have a checkpoint
    def checkpointed():
        return any(Path(run_dir, "condense").glob(f"*/group-*/{CHECKPOINT}"))

    second = killed_when(checkpointed)
    assert re.findall(r"^unit \d+/\d+ done", second, re.M) == ["unit 2/2 done"]
    # Ray ends a dead driver's tasks: nothing races the rerun
    nodes = cluster.list_all_nodes()
    _wait_for(lambda: not any(_runs(n, "condense_group") for n in nodes), "orphans to end", 60)

    # 3. rerun: statistics reused, the groups resume from their checkpoints
    third = subprocess.run(args, capture_output=True, text=True, env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "statistics reused" in third.stdout
    assert re.search(r"group \d: resuming at step [1-9]\d*00\b", third.stderr)
    folder = next(Path(run_dir, "condense").iterdir())
    markers = {p: p.stat().st_mtime_ns for p in folder.glob("group-*/_DONE")}
    assert len(markers) == 2 and (folder / "export" / "manifest.json").exists()

    # 4. rerun: nothing is recomputed
    fourth = subprocess.run(args, capture_output=True, text=True, env=env)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert "(2 already done)" in fourth.stdout
    assert {p: p.stat().st_mtime_ns for p in folder.glob("group-*/_DONE")} == markers

    # and the result is that of an uninterrupted run
    _assert_stats_close(load_stats(run_dir, list(range(10))), _plain_stats(shards, run_dir))
    raw = storage.read_json(str(folder / "config.json"))
    cfg = CondenseConfig(**{**raw, "classes": tuple(raw["classes"]), "groups": 2})
    assert cfg.folder_name() == folder.name
    images = torch.cat([_load_images(str(p)) for p in sorted(folder.glob(f"group-*/{RESULT}"))])
    _assert_images_close(images, _in_process_images(run_dir, cfg, tmp_path))


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.cluster
def test_ray_job_submit_runs_the_cli(shards, tmp_path):
    gcs, dashboard, client, agent = (free_port() for _ in range(4))
    ray_tmp = _ray_tmpdir()
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",  # for the job
        "RAY_AUTH_MODE": "token",  # the head and the job client share ~/.ray/auth_token
    }
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            "--num-cpus=2",
            f"--object-store-memory={150 * 1024**2}",
            "--include-dashboard=true",
            "--disable-usage-stats",
            f"--temp-dir={ray_tmp}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the teardown ends exactly it
    )
    out = tmp_path / "run"
    try:
        _wait_for(lambda: _listening(dashboard), "the dashboard", 180)
        # Joined directly without the token, the CLI says in one line what to set.
        no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        refused = subprocess.run(
            [
                *(sys.executable, "-m", "condense_pipeline.cli.app", "stats", "digits"),
                *(f"--data={shards}", f"--out={tmp_path / 'refused'}"),
                f"--address=127.0.0.1:{gcs}",
            ],
            env=no_token,
            capture_output=True,
            text=True,
            timeout=300,
        )
        submit = subprocess.run(
            [
                ray_cli,
                "job",
                "submit",
                f"--address=http://127.0.0.1:{dashboard}",
                "--",
                "condense-pipeline",
                "run",
                "digits",
                "--ipc=1",
                f"--data={shards}",
                f"--out={out}",
                "--probes=2",
                "--iterations=20",
                "--no-eval",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` takes its processes along
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "uses token authentication; set RAY_AUTH_MODE=token" in refused.stderr.splitlines()[-1]
    assert not (tmp_path / "refused").exists()
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout + submit.stderr
    assert "outputs:" in submit.stdout
    assert len(list(out.glob("condense/*/export/manifest.json"))) == 1
