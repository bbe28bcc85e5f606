"""The Ray stages on a real local Ray: statistics equal a plain loop whatever the workers and
units, a killed stats run resumes without recomputing committed units, condense resumes."""

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from condense_pipeline import storage
from condense_pipeline.condense.bank import ProbeBank
from condense_pipeline.condense.numerics import numerics
from condense_pipeline.condense.sampling import pool_hashes
from condense_pipeline.condense.stats import ClassStats, accumulate
from condense_pipeline.config import condense_config, stats_config
from condense_pipeline.datasets import get_profile
from condense_pipeline.errors import UserError
from condense_pipeline.formats import BANK_JSON, ERROR, IMAGE, KEY, LABEL
from condense_pipeline.pipeline import read
from condense_pipeline.pipeline.commits import PARTIAL_DIR, PROGRESS_JSON
from condense_pipeline.pipeline.condense import run_condense
from condense_pipeline.pipeline.pilot import pilot_images, pilot_prefix
from condense_pipeline.pipeline.stats import (
    bank_spec,
    load_bandwidths,
    load_stats,
    run_stats,
    stats_dir,
)
from condense_pipeline.prepare import prepare_dataset

PROFILE = get_profile("digits")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits"))
    prepare_dataset("digits", None, out, shard_size=150)  # 10 train shards
    return os.path.join(out, "train")


def _cfg(**kw):
    # M = 40 of about 144 per class: the readers leave some images undecoded (read.UNUSED)
    base = dict(probes=4, real_per_probe=40, init_pool=8, shards_per_unit=3, workers=2)
    return replace(stats_config(PROFILE, ("dm", "m3d", "datadam")), **{**base, **kw})


def _plain_loop(shards, cfg, run_dir):
    """The same statistics without Ray: one accumulator, one pass, the run's bandwidths."""
    bank = ProbeBank(bank_spec(PROFILE, cfg))
    stats = ClassStats.zeros(bank, cfg.init_pool)
    counts = np.asarray(read.load_dataset_info(shards)["counts"])
    rows = [r for r in read.iter_decoded(storage.list_shards(shards), PROFILE, 10) if not r[ERROR]]
    images = torch.from_numpy(np.stack([r[IMAGE] for r in rows]))
    labels = np.array([r[LABEL] for r in rows])
    keys = [r[KEY] for r in rows]
    accumulate(stats, bank, images, labels, keys, counts, load_bandwidths(run_dir))
    return stats


def _assert_close(a, b, tol=1e-5):
    assert torch.equal(a.count, b.count)
    for name in ("emb_sum", "rff_sum", "sqnorm_sum"):
        x, y = getattr(a, name), getattr(b, name)
        if y is not None:
            assert ((x - y).abs().max() / y.abs().max()).item() < tol, name
    for x, y in zip(a.att_sum, b.att_sum):
        assert ((x - y).abs().max() / y.abs().max()).item() < tol
    assert a.pool_keys == b.pool_keys


@pytest.mark.parametrize("per_class", [5, 1000])
def test_pilot_takes_the_smallest_pool_hashes_of_what_it_read(ray_local, shards, per_class):
    first = storage.list_shards(shards)[:1]  # one shard: the pilot reads all of it
    rows = [r for r in read.iter_decoded(first, PROFILE, 10) if not r[ERROR]]
    counts = np.bincount([r[LABEL] for r in rows], minlength=10)
    images, labels = pilot_images(first, PROFILE, counts, per_class, seed=3, timeout=600)
    hashes = pool_hashes([r[KEY] for r in rows], seed=3)
    expected = []
    for c in range(10):
        mine = sorted((h, i) for i, h in enumerate(hashes) if rows[i][LABEL] == c)
        expected += [rows[i][IMAGE] for _, i in mine[:per_class]]
    assert labels.tolist() == sorted(labels.tolist())
    assert len(expected) == len(images) == int(np.minimum(counts, per_class).sum())
    assert torch.equal(images, torch.from_numpy(np.stack(expected)))


def test_ray_stats_equal_a_plain_loop_for_any_workers_and_units(ray_local, shards, tmp_path):
    two = str(tmp_path / "two")
    result = run_stats(PROFILE, shards, two, _cfg())
    assert result.summary["images"] == 1337 and result.summary["skipped"] == 0  # no validation
    assert not os.path.exists(os.path.join(stats_dir(two), PARTIAL_DIR))  # no checkpoints left
    ray_stats = load_stats(two, list(range(10)))
    _assert_close(ray_stats, _plain_loop(shards, _cfg(), two))

    one = str(tmp_path / "one")
    run_stats(PROFILE, shards, one, _cfg(workers=1, shards_per_unit=10))
    _assert_close(load_stats(one, list(range(10))), ray_stats)

    # a second call reuses the finished statistics; a conflicting one is refused
    assert run_stats(PROFILE, shards, two, _cfg()).reused
    assert run_stats(PROFILE, shards, two, replace(_cfg(), methods=("dm",))).reused
    with pytest.raises(UserError, match="probes: 4 -> 5"):
        run_stats(PROFILE, shards, two, _cfg(probes=5))


def test_condense_resumes_and_skips_finished_groups(ray_local, shards, tmp_path):
    run_dir = str(tmp_path / "run")
    run_stats(PROFILE, shards, run_dir, _cfg(probes=3))
    cfg = condense_config(PROFILE, "dm", 2, steps=10, groups=2, classes=(0, 1, 2, 3))
    first = run_condense(run_dir, cfg)
    assert first.groups_run == 2 and first.images.shape == (8, 1, 8, 8)
    again = run_condense(run_dir, cfg)
    assert again.groups_skipped == 2 and torch.equal(again.images, first.images)
    # one group alone gives the same images (instance norm: classes are independent)
    single = run_condense(run_dir, replace(cfg, groups=1))
    assert ((single.images - first.images).abs().max() < 1e-4).item()


KILLED_RUN = """
import sys
from dataclasses import replace
from condense_pipeline.config import stats_config
from condense_pipeline.datasets import get_profile
from condense_pipeline.pipeline.stats import run_stats
p = get_profile("digits")
cfg = replace(stats_config(p, ("dm",)), probes=40, init_pool=4, shards_per_unit=1, workers=1)
cfg = replace(cfg, commit_interval_s=0)  # a commit after every unit
run_stats(p, sys.argv[1], sys.argv[2], cfg, progress=print)
"""


def test_killed_stats_run_resumes_without_recomputing(ray_local, shards, tmp_path):
    run_dir = str(tmp_path / "killed")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, shards, run_dir],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    progress = os.path.join(stats_dir(run_dir), PROGRESS_JSON)
    # Waits for two committed units, however slow the machine (a 120 s wait once ran out on a
    # loaded one); the deadline only guards against a hang.
    deadline = time.monotonic() + 900
    try:
        while not (
            os.path.exists(progress) and len(storage.read_json(progress)["done_units"]) >= 2
        ):
            assert proc.poll() is None, "the run ended before two units were committed"
            assert time.monotonic() < deadline, "no two units committed in 900 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    done = storage.read_json(progress)["done_units"]
    units = len(storage.list_shards(shards))  # one shard per unit
    assert 2 <= len(done) < units, "the run must be killed mid-way"

    out = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, shards, run_dir], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rerun = [line for line in out.stdout.splitlines() if line.startswith("unit ")]
    assert len(rerun) == units - len(done)  # committed units are not recomputed

    fresh = str(tmp_path / "fresh")  # uninterrupted, in this process
    cfg = replace(stats_config(PROFILE, ("dm",)), probes=40, init_pool=4, shards_per_unit=1)
    run_stats(PROFILE, shards, fresh, replace(cfg, workers=1))
    a, b = load_stats(run_dir, list(range(10))), load_stats(fresh, list(range(10)))
    assert torch.equal(a.count, b.count)
    assert ((a.emb_sum - b.emb_sum).abs().max() / b.emb_sum.abs().max()).item() < 1e-5


def _stats_workers() -> list[int]:
    """The pids of this test's Ray's StatsWorker processes (other jobs may run their own)."""
    import ray
    from ray._private import ray_constants

    node = ray._private.worker._global_node
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == raylet and b"ray::StatsWorker" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue  # the process ended meanwhile
    return pids


def test_one_commit_per_interval_and_a_lost_worker_reruns_every_unit_since(
    ray_local, shards, tmp_path
):
    """Bugs caught: a commit per unit (bytes written growing with the units); a retry that
    reruns only the failed unit while the lost worker took earlier uncommitted units along
    (counts short), or that keeps the survivors' uncommitted sums (counts doubled)."""
    run_dir = str(tmp_path / "run")
    cfg = _cfg(methods=("dm",), probes=2, shards_per_unit=1, commit_interval_s=3600)
    units = len(storage.list_shards(shards))
    lines = []

    def progress(line: str) -> None:
        lines.append(line)
        if line.startswith(f"unit 3/{units} done") and lines.count(line) == 1:
            os.kill(_stats_workers()[0], signal.SIGKILL)  # before anything was committed

    summary = run_stats(PROFILE, shards, run_dir, cfg, progress=progress).summary
    assert summary["commits"] == 1
    assert len(summary["retries"]) == 1 and summary["retries"][0]["attempt"] == 1
    assert lines.count(f"unit 1/{units} done (1 shards)") == 2  # uncommitted: rerun after loss
    _assert_close(load_stats(run_dir, list(range(10))), _plain_loop(shards, cfg, run_dir))
    # the settings that applied inside a worker
    bank = storage.read_json(os.path.join(stats_dir(run_dir), BANK_JSON))
    assert (
        bank["numerics"]
        == numerics("cpu")
        == {
            "device": "cpu",
            "name": "cpu",
            "matmul_tf32": False,
            "cudnn_tf32": False,
        }
    )


def _corrupt(shard: str, out: str, every: int) -> None:
    """A copy of `shard` whose every `every`-th image is not an image."""
    with tarfile.open(shard) as src, tarfile.open(out, "w") as dst:
        images = 0
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith(".png"):
                images += 1
                if images % every == 0:
                    data = b"not a png"
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))


def test_a_pass_over_corrupt_shards_fails_at_the_first_commit(ray_local, shards, tmp_path):
    """Bug caught: the bad-sample threshold checked only after the whole pass (a run whose
    shards are 30 % corrupt read everything before it failed)."""
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    for shard in sorted(data.glob("*.tar")):
        _corrupt(str(shard), str(shard) + ".new", every=3)  # a third of every shard
        os.replace(str(shard) + ".new", shard)
    run_dir = str(tmp_path / "run")
    cfg = _cfg(methods=("dm",), probes=2, shards_per_unit=1, commit_interval_s=0, workers=1)
    whole = sum(s["samples"] for s in read.load_dataset_info(shards)["shards"])
    with pytest.raises(UserError, match=rf"in the first 150 of {whole}, already above the 1% "):
        run_stats(PROFILE, str(data), run_dir, cfg)
    progress = storage.read_json(os.path.join(stats_dir(run_dir), PROGRESS_JSON))
    assert progress["done_units"] == [0]


def test_pilot_reads_a_prefix_of_the_shards_in_parallel(ray_local, shards):
    """Per class the smallest pool hashes of the leading shards it reads (the same rule as the
    serial pilot), and only those shards: a wrong prefix or a candidate filter that drops a
    selected image changes the selection."""
    listed = storage.list_shards(shards)
    counts = np.asarray(read.load_dataset_info(shards)["counts"])
    want = np.minimum(counts, 5)
    n = pilot_prefix(len(listed), counts, want)
    assert n == 2  # 4 x 5 of about 144 per class: 14 % of the 10 shards
    images, labels = pilot_images(listed, PROFILE, counts, 5, seed=3, timeout=600)
    rows = [r for r in read.iter_decoded(listed[:n], PROFILE, 10) if not r[ERROR]]
    hashes = pool_hashes([r[KEY] for r in rows], seed=3)
    expected = []
    for c in range(10):
        mine = sorted((h, i) for i, h in enumerate(hashes) if rows[i][LABEL] == c)
        expected += [rows[i][IMAGE] for _, i in mine[:5]]
    assert labels.tolist() == [c for c in range(10) for _ in range(5)]
    assert torch.equal(images, torch.from_numpy(np.stack(expected)))


def test_cpu_groups_share_the_node_and_a_lone_group_takes_every_cpu(ray_local):
    # Catches condense tasks that ask for one CPU each whatever the grouping (a lone group then
    # runs on one thread) or that together ask for more memory than the node has.
    from condense_pipeline.pipeline.condense import group_resources

    groups, lone = group_resources(None)
    assert groups == 1 and (lone.num_cpus, lone.num_gpus, lone.memory_share) == (3, 0, 1.0)
    groups, five = group_resources(5)
    assert groups == 5 and five.num_cpus == 1 and five.memory_share == 1 / 3
