"""Object storage, against moto's S3 server on loopback: storage, prepare and export write to
s3:// what they write to local disk; the whole job from s3:// shards to an s3:// run directory gives
the outputs of the same job on disk; a missing bucket is one clear line and nothing written. The
endpoint and credentials reach the code (and the command's Ray workers) only through the standard
AWS environment variables, as they would for a real store."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest
import torch
from conftest import free_port
from safetensors.torch import load

from condense_pipeline import storage
from condense_pipeline.datasets import get_profile
from condense_pipeline.errors import UserError
from condense_pipeline.evaluate.loader import load_condensed
from condense_pipeline.pipeline.export import export_condensed
from condense_pipeline.prepare import prepare_dataset

BUCKET = "condense"
# A tiny budget: the point is where the files go, not the quality of the condensed set.
JOB = ["--ipc", "1", "--method", "dm", "--probes", "4", "--iterations", "20"]
JOB_EVAL = [*JOB, "--epochs", "2", "--runs", "1"]
SHARD_SIZE = "400"


def _wait_for(port: int, server: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moto's server exited with {server.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto's server did not listen on port {port} within {timeout} s")


@pytest.fixture(scope="module")
def s3_env():
    """An S3 server on a free loopback port holding an empty bucket; yields the variables that
    point the AWS SDKs at it (what a user sets for MinIO or any S3-compatible store)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(port, server)
        endpoint = f"http://127.0.0.1:{port}"
        # Creating the bucket is the store's administration, not the pipeline's: explicit here.
        admin = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
        admin.create_dir(BUCKET)
        yield {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def cli(env: dict, cwd, *args) -> subprocess.CompletedProcess:
    """The real entry point in its own process, so its Ray workers get only the environment."""
    return subprocess.run(
        [sys.executable, "-m", "condense_pipeline.cli.app", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=cwd,
    )


def ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def s3_digits(s3_env, tmp_path_factory):
    """Digits prepared straight into the bucket: s3://condense/digits/{train,test}."""
    location = f"s3://{BUCKET}/digits"
    cwd = tmp_path_factory.mktemp("prepare")
    ok(cli(s3_env, cwd, "prepare", "digits", "--out", location, "--shard-size", SHARD_SIZE))
    return location


@pytest.fixture(scope="module")
def local_digits(tmp_path_factory) -> str:
    """The same digits shards on local disk."""
    location = str(tmp_path_factory.mktemp("local") / "digits")
    prepare_dataset("digits", None, location, shard_size=int(SHARD_SIZE))
    return location


@pytest.fixture
def in_env(s3_env, monkeypatch):
    """This process reads the bucket back through the same variables."""
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)


def files(location: str) -> set[str]:
    fs, root = storage.resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True))
    # Object stores may keep empty "folder" markers; only files are outputs.
    return {i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File}


def same_files(a: str, b: str, skip: tuple[str, ...] = ()) -> set[str]:
    """Assert that two folders hold the same files with the same bytes; returns their names."""
    names = files(b)
    assert files(a) == names
    for name in names:
        if not name.endswith(skip):
            assert storage.read_bytes(f"{a}/{name}") == storage.read_bytes(f"{b}/{name}"), name
    return names


def test_storage_on_s3(in_env):
    root = f"s3://{BUCKET}/storage"
    storage.write_bytes(f"{root}/a/x-000.tar", b"one")
    storage.write_json(f"{root}/a/x-001.tar", {"two": 2})
    assert storage.read_bytes(f"{root}/a/x-000.tar") == b"one"
    assert storage.read_json(f"{root}/a/x-001.tar") == {"two": 2}
    assert storage.is_dir(f"{root}/a") and not storage.exists(f"{root}/b")
    assert storage.list_dir(f"{root}/a") == ["x-000.tar", "x-001.tar"]
    expected = [f"{root}/a/x-000.tar", f"{root}/a/x-001.tar"]
    assert storage.list_shards(f"{root}/a") == expected
    assert storage.list_shards(f"{root}/a/x-{{000..001}}.tar") == expected
    storage.mark_done(f"{root}/a")
    assert storage.is_done(f"{root}/a")
    storage.delete(f"{root}/a")
    assert files(root) == set()
    with pytest.raises(UserError, match="bucket nobucket does not exist"):
        storage.exists("s3://nobucket/x")
    with pytest.raises(UserError, match="set them in the environment"):
        storage.exists(f"s3://{BUCKET}/x?endpoint_override=elsewhere")


def test_prepare_and_export_write_to_s3_what_they_write_locally(in_env, local_digits, tmp_path):
    s3_data = f"s3://{BUCKET}/prepared"
    prepare_dataset("digits", None, s3_data, shard_size=int(SHARD_SIZE))
    for split in ("train", "test"):
        same_files(f"{s3_data}/{split}", f"{local_digits}/{split}")

    images = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(10).repeat(2)
    loss_log = [{"step": step, "loss": 1 / (step + 1), "group": "0"} for step in range(5)]
    s3_out, local_out = f"s3://{BUCKET}/export", str(tmp_path / "export")
    for out in (s3_out, local_out):
        export_condensed(
            images,
            labels,
            [str(c) for c in range(10)],
            get_profile("digits"),
            out,
            provenance={"method": "dm"},
            loss_log=loss_log,
        )
    # Every file but the marker, which holds timings.
    names = same_files(s3_out, local_out, skip=(storage.DONE,))
    assert {"preview.png", "loss.png", "manifest.json", storage.DONE} <= names
    for a, b in zip(load_condensed(s3_out).tensors(), load_condensed(local_out).tensors()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("missing", ["data", "out"])
def test_a_missing_bucket_is_one_line_and_writes_nothing(
    s3_env, in_env, local_digits, missing, tmp_path
):
    data = "s3://nobucket/digits/train" if missing == "data" else f"{local_digits}/train"
    out = "s3://nobucket/runs/r1" if missing == "out" else f"s3://{BUCKET}/runs/never"
    result = cli(s3_env, tmp_path, "run", "digits", *JOB, "--no-eval", "--data", data, "--out", out)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "error: bucket nobucket does not exist" in result.stderr
    assert files(f"s3://{BUCKET}/runs/never") == set()
    assert list(tmp_path.iterdir()) == []  # nothing local either


@pytest.mark.cluster  # two whole runs in fresh processes: over a minute on 2 CPUs
def test_run_from_s3_to_s3_equals_the_local_run(s3_env, s3_digits, local_digits, in_env, tmp_path):
    for split in ("train", "test"):  # the command wrote the same shards to S3 as prepare locally
        same_files(f"{s3_digits}/{split}", f"{local_digits}/{split}")

    s3_run, local_run = f"s3://{BUCKET}/runs/r1", str(tmp_path / "runs" / "r1")
    for data, run_dir in ((s3_digits, s3_run), (local_digits, local_run)):
        ok(
            cli(
                s3_env,
                tmp_path,
                "run",
                "digits",
                *JOB_EVAL,
                "--data",
                f"{data}/train",
                "--test",
                f"{data}/test",
                "--out",
                run_dir,
            )
        )

    names = files(local_run)
    assert files(s3_run) == names

    def both(name: str) -> tuple[bytes, bytes]:
        return storage.read_bytes(f"{s3_run}/{name}"), storage.read_bytes(f"{local_run}/{name}")

    # Statistics and every exported file but the marker (it holds timings): the same bytes.
    same = [n for n in names if n.startswith("stats/classes-") or "/export/" in n]
    assert any(n.endswith(".parquet") for n in same) and any(n.endswith(".tar") for n in same)
    for name in same:
        if not name.endswith(storage.DONE):
            s3_bytes, local_bytes = both(name)
            assert s3_bytes == local_bytes, name
    # The rest differs only in paths and timings.
    s3_bank, local_bank = (json.loads(b) for b in both("stats/bank.json"))
    assert s3_bank.pop("data") == f"{s3_digits}/train"
    local_bank.pop("data")
    assert s3_bank == local_bank
    (result,) = [n for n in names if n.endswith("images.safetensors")]
    s3_images, local_images = (load(b)["images"] for b in both(result))
    assert torch.equal(s3_images, local_images)
    (report,) = [n for n in names if n.endswith("eval/report.json")]
    s3_report, local_report = (json.loads(b) for b in both(report))
    s3_report.pop("seconds"), local_report.pop("seconds")
    assert s3_report == local_report
