"""Stopping a stage: SIGINT (Ctrl-C) during the statistics pass of the CLI ends it within a few
seconds with one line that says what was committed, no traceback, a non-zero code, and Ray gone;
rerunning the command resumes from the last commit."""

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from condense_pipeline import storage
from condense_pipeline.condense.experts import experts_dir, weight_path
from condense_pipeline.pipeline import read
from condense_pipeline.pipeline.commits import PROGRESS_JSON
from condense_pipeline.pipeline.stats import stats_dir
from condense_pipeline.prepare import prepare_dataset

CLI = [sys.executable, "-m", "condense_pipeline.cli.app"]
STOP_S = 60  # a bound far above the few seconds it takes, so a loaded machine does not fail it


def _start(args: list[str], env: dict) -> subprocess.Popen:
    """The command as a terminal starts it. A shell without job control starts `make test &`
    with SIGINT ignored, and a child inherits that (Python then keeps it ignored): Ctrl-C at a
    terminal is never ignored, so the child gets the default disposition back."""
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import ray

    out = str(tmp_path_factory.mktemp("digits"))
    started = not ray.is_initialized()
    prepare_dataset("digits", None, out, shard_size=50)  # about 28 train shards: 4 units of 8
    if started and ray.is_initialized():
        ray.shutdown()  # the local Ray that prepare started: later modules start their own
    return os.path.join(out, "train")


@pytest.fixture
def ray_tmp():
    """A Ray temp root of the command's own, short enough for Unix socket paths."""
    folder = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_stats_pass_with_one_line_and_a_rerun_resumes(
    shards, ray_tmp, tmp_path, sig
):
    """Bugs caught: Ctrl-C ignored for tens of seconds; SIGTERM ending in a background thread's
    traceback ("Ray is not initialized"); a stop that loses or recounts committed units."""
    run_dir = str(tmp_path / "run")
    args = [*CLI, "stats", "digits", "--data", shards, "--out", run_dir, "--method", "dm"]
    args += ["--probes", "100", "--workers", "1", "--commit-interval", "0"]
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}  # its own Ray, to see it go
    proc = _start(args, env)
    progress = os.path.join(stats_dir(run_dir), PROGRESS_JSON)
    deadline = time.monotonic() + 300
    while not os.path.exists(progress):  # the first unit is committed
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=STOP_S)
    assert proc.returncode == 130, err[-3000:]
    committed = storage.read_json(progress)["done_units"]
    units = math.ceil(len(storage.list_shards(shards)) / 8)
    assert 1 <= len(committed) < units, "the pass must be stopped mid-way"
    stopped = [line for line in err.splitlines() if line.startswith("stopped")]
    assert stopped == [
        f"stopped: stats: {len(committed)} of {units} units committed ({progress}); "
        "rerun the same command to resume"
    ]
    assert "Traceback" not in err and "Error" not in err, err[-3000:]
    assert not _processes_of(ray_tmp)  # the local Ray it started is gone

    if sig == signal.SIGTERM:
        return  # the rerun is the same as after SIGINT
    rerun = subprocess.run(args, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    done = re.findall(rf"^unit (\d+)/{units} done", rerun.stdout, re.M)
    assert sorted(int(u) - 1 for u in done) == sorted(set(range(units)) - set(committed))
    images = sum(read.load_dataset_info(shards)["counts"])
    assert f"stats: {images} images" in rerun.stdout


def test_ctrl_c_stops_train_probes_with_one_line_and_keeps_the_finished_experts(
    shards, ray_tmp, tmp_path
):
    """Bug caught: Ray Train's fit() put in its own SIGINT handler, which aborted the run and
    left with exit code 1 and no line saying what was kept."""
    run_dir = str(tmp_path / "run")
    args = [*CLI, "train-probes", "digits", "--data", shards, "--out", run_dir]
    args += ["--experts", "3", "--epochs", "5"]
    proc = _start(args, {**os.environ, "RAY_TMPDIR": ray_tmp})
    folder = experts_dir(run_dir)
    deadline = time.monotonic() + 300
    while not os.path.exists(weight_path(folder, 0, "final")):  # the first expert is kept
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=STOP_S)
    assert proc.returncode == 130, err[-3000:]
    kept = sum(os.path.exists(weight_path(folder, e, "final")) for e in range(3))
    assert 1 <= kept < 3, "the stage must be stopped mid-way"
    # the line can follow a progress bar that the training worker's Ray Data left unfinished
    assert err.count("stopped:") == 1, err[-3000:]
    assert (
        f"stopped: train-probes: {kept} of 3 experts trained and kept; "
        "rerun the same command to resume\n"
    ) in err
    # (Ray Train's placement-group monitor prints its own traceback, from its actor, when
    # another Ray runs on the machine; the command itself must print none)
    command = [line for line in err.splitlines() if "pid=" not in line]
    assert not any("Traceback" in line for line in command), err[-3000:]
    assert not _processes_of(ray_tmp)


def _processes_of(ray_tmp: str) -> list[int]:
    """The pids of processes whose command line names the Ray temp folder `ray_tmp`."""
    pids = []
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                with open(f"/proc/{proc}/cmdline", "rb") as f:
                    if ray_tmp.encode() in f.read():
                        pids.append(int(proc))
            except OSError:
                continue
    return pids


def test_sigint_stops_condensation_with_the_groups_done_and_a_rerun_resumes(
    shards, ray_tmp, tmp_path
):
    """Bugs caught: a stop during `condense` saying nothing of what was kept, or a count of
    finished groups that a rerun does not reuse."""
    from condense_pipeline.pipeline.condense import CHECKPOINT

    run_dir = str(tmp_path / "run")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    stats = [*CLI, "stats", "digits", "--data", shards, "--out", run_dir, "--method", "dm"]
    made = subprocess.run([*stats, "--probes", "10"], capture_output=True, text=True, env=env)
    assert made.returncode == 0, made.stderr[-3000:]
    groups = 4
    args = [*CLI, "condense", run_dir, "--ipc", "2", "--groups", str(groups)]
    args += ["--iterations", "1000"]  # a group takes seconds: the stop comes mid-way
    proc = _start(args, env)
    deadline = time.monotonic() + 300
    while not _group_folders(run_dir, storage.DONE):  # the first group is finished
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=STOP_S)
    assert proc.returncode == 130, err[-3000:]
    done = _group_folders(run_dir, storage.DONE)
    assert 1 <= len(done) < groups, "the stage must be stopped mid-way"
    started = [f for f in _group_folders(run_dir, CHECKPOINT) if f not in done]
    folder = os.path.dirname(done[0])
    line = f"stopped: condense: {len(done)} of {groups} class groups done ({folder})"
    line += f", {len(started)} more checkpointed" if started else ""
    stopped = [line for line in err.splitlines() if line.startswith("stopped")]
    assert stopped == [line + "; rerun the same command to resume"]
    assert "Traceback" not in err and "Error" not in err, err[-3000:]
    assert not _processes_of(ray_tmp)

    rerun = subprocess.run(args, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"({len(done)} already done)" in rerun.stdout
    assert f"condense: {groups - len(done)} group(s) run, {len(done)} reused" in rerun.stdout


def _group_folders(run_dir: str, name: str) -> list[str]:
    """The condensation group folders of `run_dir` that hold a file `name`."""
    found = []
    for root, _, files in os.walk(os.path.join(run_dir, "condense")):
        if name in files:
            found.append(root)
    return sorted(found)
