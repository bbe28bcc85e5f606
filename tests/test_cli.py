"""The command line: clear one-line errors with exit code 2, and the commands that need no Ray."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import free_port
from typer.testing import CliRunner

from condense_pipeline.cli.app import app

runner = CliRunner()


def cli(*args, env=None):
    """Run the real entry point, so the error handling in main() is what is tested."""
    return subprocess.run(
        [sys.executable, "-m", "condense_pipeline.cli.app", *args],
        capture_output=True,
        text=True,
        env=env,
    )


def test_datasets_lists_every_profile():
    out = runner.invoke(app, ["datasets"])
    assert out.exit_code == 0
    for name in ("imagenet", "tinyimagenet", "cifar10", "cifar100", "mnist", "svhn", "digits"):
        assert name in out.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "nosuchset"], "unknown dataset 'nosuchset'"),
        (["stats", "digits", "--out", "x", "--data", "/no/such/shards"], "no shards at"),
        (["condense", "/no/such/run", "--ipc", "1"], "no finished statistics"),
        (["show", "/no/such/run"], "is not a run directory"),
        (["report", "/no/such/run"], "holds no exported condensation"),
        (["stats", "digits", "--out", "x", "--method", "foo"], "unknown method 'foo'"),
        (["stats", "digits", "--out", "x", "--stall-timeout", "0"], "--stall-timeout must be"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, message, tmp_path):
    out = cli(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_help_says_what_the_tool_does_without_type_tags():
    top = cli("--help")
    assert top.returncode == 0
    assert "Condense an image dataset" in top.stdout and "frozen configs" not in top.stdout
    for command in ("run", "evaluate", "report"):
        out = cli(command, "--help")
        assert out.returncode == 0 and "--help" in out.stdout
        assert not re.search(r"<(int|str|bool|float)>", out.stdout), out.stdout
    assert "--epochs EPOCHS" in cli("evaluate", "--help").stdout


def test_run_imagenet_without_shards_says_how_to_prepare(tmp_path):
    import os

    env = {**os.environ, "CONDENSE_PIPELINE_DATA": str(tmp_path)}
    out = cli("run", "imagenet", "--ipc", "10", env=env)
    assert out.returncode == 2
    assert "condense-pipeline prepare imagenet --source PATH" in out.stderr


def test_stats_dry_run_prints_the_cost_and_writes_nothing(tmp_path):
    from condense_pipeline.prepare import prepare_dataset

    prepare_dataset("digits", None, str(tmp_path / "data"))
    out = cli(
        "stats", "digits", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "data/train"),
        "--dry-run", "--method", "all",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "probe forwards: 267,400" in out.stdout  # K = 200 probes x 1337 training images
    assert "accumulator per worker" in out.stdout
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory):
    from condense_pipeline.prepare import prepare_dataset

    folder = tmp_path_factory.mktemp("cli") / "data"
    prepare_dataset("digits", None, str(folder))
    return folder


def ok(out):
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def group_files(folder):
    """Each condensation group's files with their modification times."""
    return {p: p.stat().st_mtime_ns for p in folder.glob("group-*/*")}


def test_every_command_and_a_rerun_that_resumes(digits_data, tmp_path):
    run_dir = tmp_path / "run"
    data, test = str(digits_data / "train"), str(digits_data / "test")
    budget = ["--probes", "4", "--iterations", "10", "--epochs", "2", "--runs", "1"]
    run = cli("run", "digits", "--ipc", "1", "--data", data, "--test", test,
              "--out", str(run_dir), *budget)  # fmt: skip
    first = ok(run)
    assert "condensed" in first and "random real" in first
    # The summary ends with the report's path; Ray's start-up lines stay hidden without --verbose.
    assert first.strip().splitlines()[-1] == f"report: {run_dir / 'report.html'}"
    assert "<img" in (run_dir / "report.html").read_text()
    assert "Token authentication" not in run.stderr and "Started a local Ray" not in run.stderr
    assert "Execution plan of Dataset" not in run.stderr
    (folder,) = (run_dir / "condense").iterdir()
    stamps = group_files(folder)
    assert stamps

    # The same command again: statistics and groups are reused, nothing recomputed.
    again = ok(cli("run", "digits", "--ipc", "1", "--data", data, "--test", test,
                   "--out", str(run_dir), *budget))  # fmt: skip
    assert "statistics reused" in again and re.search(r"0 group\(s\) run, [1-9]\d* reused", again)
    assert group_files(folder) == stamps

    # The stages as separate commands on the same run directory.
    # (`run` kept an init pool of 2: IPC 1 for the init, 1 run x IPC 1 for the baseline)
    stats = cli("stats", "digits", "--data", data, "--out", str(run_dir), "--method", "dm",
                "--probes", "4", "--init-pool", "2")  # fmt: skip
    assert "statistics reused" in ok(stats)
    assert "condensed 10 images" in ok(
        cli("condense", str(run_dir), "--ipc", "1", "--iterations", "10", "--method", "dm")
    )
    assert group_files(folder) == stamps
    assert "exported 10 images" in ok(cli("export", str(folder)))
    report = ok(cli("evaluate", str(folder), "--test", test, "--epochs", "1", "--runs", "1"))
    # Catches: a printed line that is not the report's (or a report not written): the figures
    # on screen are report.json's.
    saved = json.loads((folder / "eval" / "report.json").read_text())
    c, b = saved["condensed"], saved["random_real"]
    assert (
        f"condensed {c['mean']:.2f} ± {c['std']:.2f}% vs random real {b['mean']:.2f} ± "
        f"{b['std']:.2f}% (IPC 1)" in report
    )
    # Without the baseline: the condensed set alone, so more runs than the init pool's 2 images
    # per class could serve baselines for.
    alone = ok(cli("evaluate", str(folder), "--test", test, "--epochs", "1", "--runs", "3",
                   "--no-baseline"))  # fmt: skip
    saved = json.loads((folder / "eval" / "report.json").read_text())
    assert saved["random_real"] is None and len(saved["condensed"]["runs"]) == 3
    assert "condensed" in alone and "random real" not in alone
    neither = cli("evaluate", str(folder), "--test", test, "--no-baseline", "--no-condensed")
    assert neither.returncode == 2 and neither.stderr.strip().splitlines() == [
        "error: nothing to evaluate: both the condensed set and the baseline are off"
    ]
    shown = ok(cli("show", str(run_dir)))
    assert folder.name in shown and "probe forwards" in shown and "group(s) run" in shown
    plan = ok(cli("condense", str(run_dir), "--ipc", "10", "--method", "dm", "--dry-run",
                  "--iterations", "37"))  # fmt: skip
    # Catches: a plan that ignores the options: 37 steps x 10 classes x IPC 10 forwards.
    assert "37 steps" in plan and "synthetic forwards+backwards: 3,700 (100 per step)" in plan

    # Statistics computed with other settings are refused, saying which, and left as they were.
    refused = cli("stats", "digits", "--data", data, "--out", str(run_dir), "--probes", "6")
    assert refused.returncode == 2 and "probes: 4 -> 6" in refused.stderr
    lacking = cli("condense", str(run_dir), "--ipc", "1", "--method", "m3d")
    assert lacking.returncode == 2 and "rff" in lacking.stderr
    assert group_files(folder) == stamps
    # A cluster that cannot be joined: one line in seconds (ray.init retries there for minutes), and
    # --overwrite has deleted nothing.
    bank = (run_dir / "stats" / "bank.json").read_bytes()
    address = f"127.0.0.1:{free_port()}"
    lost = cli("stats", "digits", "--data", data, "--out", str(run_dir), "--probes", "6",
               "--overwrite", "--address", address)  # fmt: skip
    assert lost.returncode == 2
    assert lost.stderr.strip().splitlines() == [
        f"error: no Ray cluster answers at {address} (Connection refused); check --address or "
        "RAY_ADDRESS, or start one with `ray start --head`"
    ]
    assert (run_dir / "stats" / "bank.json").read_bytes() == bank
    assert group_files(folder) == stamps

    # Replaced statistics: the condensation made from the old ones is named, and shown stale.
    replaced = ok(cli("stats", "digits", "--data", data, "--out", str(run_dir), "--method", "dm",
                      "--probes", "6", "--init-pool", "2", "--overwrite"))  # fmt: skip
    assert f"invalidated condense/{folder.name}" in replaced
    assert f"condense/{folder.name} (stale: the statistics changed)" in ok(
        cli("show", str(run_dir))
    )


def test_a_run_without_evaluation_can_be_evaluated_later_with_its_baseline(digits_data, tmp_path):
    # Catches `run --no-eval` keeping too small an init pool for the random-real baseline, so the
    # `evaluate` that README's cluster recipe runs afterwards is refused (stats to recompute).
    data, test = str(digits_data / "train"), str(digits_data / "test")
    ok(cli("run", "digits", "--ipc", "1", "--method", "dm", "--probes", "4", "--iterations", "5",
           "--runs", "2", "--no-eval", "--data", data, "--out", str(tmp_path)))  # fmt: skip
    (folder,) = (tmp_path / "condense").iterdir()
    evaluate = ("evaluate", str(folder), "--test", test, "--epochs", "1", "--runs", "2")
    # The baseline alone needs no export (the folder's config names its IPC and initial images),
    # and its runs are kept for the full evaluation. Catches: a baseline-only evaluation that
    # reads the export, or whose runs the full one does not reuse.
    (folder / "export").rename(folder / "export.aside")
    alone = ok(cli(*evaluate, "--no-condensed"))
    (folder / "export.aside").rename(folder / "export")
    assert "random real" in alone and "condensed" not in alone.split("accuracy")[-1]
    assert json.loads((folder / "eval" / "report.json").read_text())["condensed"] is None
    assert re.search(r"condense/\S+: random real [\d.]+%", ok(cli("show", str(tmp_path))))
    ok(cli("report", str(tmp_path)))
    assert "random real (same IPC)" in (tmp_path / "report.html").read_text()
    report = ok(cli(*evaluate))
    assert "eval: 2 of 4 training runs reused" in report and "vs random real" in report
    baseline = re.compile(r"random real [\d.]+ ± [\d.]+%")
    assert baseline.findall(report) == baseline.findall(alone)
    # and the same evaluation again trains nothing: its runs were kept
    again = ok(cli(*evaluate))
    assert "eval: 4 of 4 training runs reused" in again
    assert [line for line in again.splitlines() if line.startswith("accuracy")] == [
        line for line in report.splitlines() if line.startswith("accuracy")
    ]


def _parquet_images(run_dir):
    import numpy as np
    import pyarrow.parquet as pq

    (folder,) = (run_dir / "condense").iterdir()
    table = pq.read_table(folder / "export" / "parquet")
    order = np.argsort(table.column("key").to_pylist())
    return np.stack([np.asarray(t, np.float32) for t in table.column("tensor").to_pylist()])[order]


def test_run_gives_the_same_images_in_five_groups_as_in_one(digits_data, tmp_path):
    # Catches `run` ignoring --groups or a grouping that changes the images (a group's seed,
    # schedule or chunking depending on the grouping).
    data = str(digits_data / "train")
    budget = ["--probes", "4", "--iterations", "20", "--no-eval", "--data", data]
    args = ["run", "digits", "--ipc", "2", "--method", "dm", *budget, "--out", str(tmp_path)]
    five = ok(cli(*args, "--groups", "5"))
    assert "5 group(s) run" in five
    images_five = _parquet_images(tmp_path)
    one = ok(cli(*args, "--groups", "1", "--chunk", "3"))
    assert "1 group(s) run" in one
    images_one = _parquet_images(tmp_path)
    assert np.abs(images_five - images_one).max() / np.abs(images_one).max() < 1e-5
