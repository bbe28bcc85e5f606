"""The command line: clear one-line errors with exit code 2, and the commands that need no Ray."""

import subprocess
import sys

import pytest
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
        (["stats", "digits", "--out", "x", "--method", "foo"], "unknown method 'foo'"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, message, tmp_path):
    out = cli(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


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
    assert "probe forwards: 287,400" in out.stdout  # K = 200 probes x 1437 images
    assert "accumulator per worker" in out.stdout
    assert not (tmp_path / "run").exists()
