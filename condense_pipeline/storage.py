"""Reading and writing run files on local disk or an object store, through pyarrow filesystems.

Locally every file is written to a temporary name and renamed, so a crash never leaves half a file
under the real name. Object stores have no atomic rename: there each file is one put, and a stage
writes its completion marker last, so readers trust only markers (DESIGN.md section 7).

Object-store settings come from the environment, as the cloud SDKs define them, and never from
code: pyarrow reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and, for an S3-compatible
server, AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3); for GCS, GOOGLE_APPLICATION_CREDENTIALS. Ray
workers read the same files, so they need the same variables (README, "Object storage").
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import uuid
from collections.abc import Iterable
from typing import Any

import pyarrow.fs as pafs

from condense_pipeline.errors import UserError

DONE = "_DONE"


def is_uri(location: str) -> bool:
    return "://" in location


# Filesystems whose first path component is a bucket.
BUCKET_FILESYSTEMS = ("s3", "gcs")
# (filesystem, bucket) pairs seen to exist: each process checks a bucket once, not on every call.
# A list, not a set: pyarrow filesystems compare by their options (endpoint included) but do not
# hash.
_found_buckets: list[tuple[pafs.FileSystem, str]] = []


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a local path or a URI such as s3://bucket/key.

    A missing bucket, an unreachable endpoint or refused credentials raise a UserError here, on
    the first touch, rather than an OSError halfway through a run.
    """
    if is_uri(location) and not location.startswith("file://"):
        return _object_store(location)
    path = location.removeprefix("file://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _object_store(location: str) -> tuple[pafs.FileSystem, str]:
    if "?" in location:
        # join() appends to the path, which would land after a query string.
        raise UserError(
            f"{location} has URI options; set them in the environment instead "
            "(AWS_ENDPOINT_URL, AWS_REGION, ...)"
        )
    try:
        fs, path = pafs.FileSystem.from_uri(location)
        bucket = path.split("/", 1)[0]
        if fs.type_name in BUCKET_FILESYSTEMS and not any(
            fs.equals(seen) and bucket == name for seen, name in _found_buckets
        ):
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise UserError(f"bucket {bucket} does not exist ({location}); create it first")
            _found_buckets.append((fs, bucket))
    except (OSError, ValueError) as e:  # pyarrow's errors: unreachable, refused, unknown scheme
        raise UserError(
            f"cannot open {location}: {str(e).splitlines()[0]} (check the path, the endpoint "
            "variable AWS_ENDPOINT_URL and the credentials)"
        ) from None
    return fs, path


def join(location: str, *parts: str) -> str:
    return "/".join([location.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_dir(location: str) -> list[str]:
    """Names (not paths) of the entries directly under `location`, sorted; [] if it is missing."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(info.base_name for info in infos)


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_buffer(location: str) -> bytearray:
    """A whole file in a writable buffer of its size, read without an intermediate copy."""
    fs, path = resolve(location)
    buf = bytearray(fs.get_file_info(path).size)
    view = memoryview(buf)
    with fs.open_input_file(path) as f:
        done = 0
        while done < len(buf):
            n = f.readinto(view[done:])
            if n == 0:
                raise OSError(f"{location} ended after {done} of {len(buf)} bytes")
            done += n
    return buf


def open_input(location: str):
    """A binary file object for streaming reads (tar shards)."""
    fs, path = resolve(location)
    return fs.open_input_stream(path)


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file: temporary name then rename locally, one put on an object store."""
    write_chunks(location, [data])


def write_chunks(location: str, chunks: Iterable) -> int:
    """Write a file from buffers taken one at a time, as write_bytes does (so a large file is
    never held whole); returns the bytes written."""
    fs, path = resolve(location)
    written = 0
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            for chunk in chunks:
                written += f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            for chunk in chunks:
                f.write(chunk)
                written += memoryview(chunk).nbytes
    return written


def upload_file(local_path: str, location: str) -> None:
    """Copy a finished local file (e.g. a tar from webdataset's writer) to `location`."""
    with open(local_path, "rb") as f:
        write_bytes(location, f.read())


def read_json(location: str) -> Any:
    return json.loads(read_bytes(location))


def write_json(location: str, value: Any) -> None:
    write_bytes(location, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def delete(location: str) -> None:
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def mark_done(folder: str, info: dict | None = None) -> None:
    write_json(join(folder, DONE), info or {})


def is_done(folder: str) -> bool:
    return exists(join(folder, DONE))


def buffer_to_bytes(write) -> bytes:
    """Run `write(file)` against an in-memory file and return what it wrote."""
    buf = io.BytesIO()
    write(buf)
    return buf.getvalue()


_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """`train-{000000..000003}.tar` -> four names, zero padding kept (webdataset's convention)."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(expand_braces(f"{head}{i:0{width}d}{tail}"))
    return out


def list_shards(spec: str) -> list[str]:
    """Shard locations from a folder, a glob, a brace pattern or one file; sorted, never empty."""
    if _BRACE.search(spec):
        shards = expand_braces(spec)
        # One listing per folder, not one request per shard (a serial HEAD each on a store).
        where = [_split_path(s) for s in shards]
        listed = {folder: set(list_dir(folder)) for folder, _ in where}
        missing = [s for s, (folder, name) in zip(shards, where) if name not in listed[folder]]
        if missing:
            raise UserError(f"{len(missing)} shard(s) of {spec} do not exist, first: {missing[0]}")
        return shards
    if any(ch in spec for ch in "*?["):
        folder, pattern = _split_path(spec)
        shards = [join(folder, n) for n in list_dir(folder) if fnmatch.fnmatch(n, pattern)]
    elif is_dir(spec):
        shards = [join(spec, n) for n in list_dir(spec) if n.endswith(".tar")]
    elif exists(spec):
        shards = [spec]
    else:
        raise UserError(f"no shards at {spec}: the path does not exist")
    if not shards:
        raise UserError(f"no .tar shards found at {spec}")
    return shards


def _split_path(location: str) -> tuple[str, str]:
    """(folder, name) of a location; "." for a bare name."""
    return tuple(location.rsplit("/", 1)) if "/" in location else (".", location)
