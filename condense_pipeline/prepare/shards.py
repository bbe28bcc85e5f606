"""Writing one split as seeded-shuffled WebDataset tar shards plus dataset.json.

Each shard is written to a temporary file and then renamed (or uploaded in one put), so no shard
is ever half there under its final name. dataset.json is deleted first and written last: a split
without it is unfinished, and readers refuse it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from condense_pipeline import storage
from condense_pipeline.formats import DATASET_FORMAT, DATASET_JSON, IMAGE_SUFFIXES, LABEL_SUFFIX
from condense_pipeline.prepare.sources import SplitData

log = logging.getLogger(__name__)

# Below this many shards, starting Ray costs more than it saves.
PARALLEL_MIN_SHARDS = 8


@dataclass(frozen=True)
class ShardJob:
    """The samples of one shard, in shard order: file paths, a uint8 array or encoded images."""

    location: str
    keys: list[str]
    labels: list[int]
    files: list[str] | None = None
    images: np.ndarray | None = None
    blobs: list[bytes] | None = None


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sniff_suffix(data: bytes) -> str | None:
    """The member suffix for bytes we can store as they are (by content, not file name: ImageNet
    has PNG data inside a .JPEG file)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _file_member(path: str) -> tuple[str, bytes, tuple[int, int] | None]:
    """(suffix, bytes, (width, height) or None if unreadable) for one image file."""
    with open(path, "rb") as f:
        data = f.read()
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return _member(data, ext if ext in IMAGE_SUFFIXES else "jpg")


def _member(data: bytes, fallback: str) -> tuple[str, bytes, tuple[int, int] | None]:
    """(suffix, bytes, (width, height) or None if unreadable) for encoded image bytes; formats
    without a member suffix of their own (BMP, GIF, TIFF...) become PNG, which keeps every pixel."""
    suffix = sniff_suffix(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # oversized images are the reader's to reject
            image = Image.open(io.BytesIO(data))
            size = image.size
            if suffix is None:
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                suffix, data = "png", buf.getvalue()
    except Exception:
        # Stored anyway: the reader rejects it and counts it with the other bad samples.
        return suffix or fallback, data, None
    return suffix, data, size


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so the same input and seed give byte-identical shards (same sha256).
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(job: ShardJob) -> dict:
    """Write one tar; returns its name, sample count, sha256, image sizes seen, unreadable files."""
    fs, path = storage.resolve(job.location)
    local = isinstance(fs, pafs.LocalFileSystem)
    if local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    else:
        handle, tmp = tempfile.mkstemp(suffix=".tar")
        os.close(handle)
    sizes: set[tuple[int, int]] = set()
    unreadable = 0
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w") as tar:
                for i, (key, label) in enumerate(zip(job.keys, job.labels, strict=True)):
                    if job.files is not None:
                        suffix, data, size = _file_member(job.files[i])
                        if size is None:
                            unreadable += 1
                        elif len(sizes) < 2:  # enough to tell one native size from many
                            sizes.add(size)
                    elif job.blobs is not None:
                        suffix, data, _ = _member(job.blobs[i], "png")
                    else:
                        suffix, data = "png", encode_png(job.images[i])
                    _add_member(tar, f"{key}.{suffix}", data)
                    _add_member(tar, f"{key}.{LABEL_SUFFIX}", str(int(label)).encode())
            f.flush()
            os.fsync(f.fileno())
        sha256 = _sha256(tmp)
        if local:
            os.replace(tmp, path)
        else:
            storage.upload_file(tmp, job.location)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {
        "name": job.location.rsplit("/", 1)[-1],
        "samples": len(job.keys),
        "sha256": sha256,
        "sizes": sorted(sizes),
        "unreadable": unreadable,
    }


def plan_shards(data: SplitData, split_dir: str, shard_size: int, seed: int) -> list[ShardJob]:
    """Shuffle the split with the seed and cut it into shards of `shard_size` samples."""
    order = np.random.default_rng(seed).permutation(len(data))
    jobs = []
    for index, start in enumerate(range(0, len(order), shard_size)):
        chunk = order[start : start + shard_size]
        jobs.append(
            ShardJob(
                location=storage.join(split_dir, shard_name(data.split, index)),
                keys=[data.keys[i] for i in chunk],
                labels=data.labels[chunk].tolist(),
                files=[data.files[i] for i in chunk] if data.files is not None else None,
                images=data.images[chunk] if data.images is not None else None,
            )
        )
    return jobs


def _run_local(jobs: list[ShardJob], written: list[str]) -> list[dict]:
    results = []
    for job in jobs:
        results.append(write_shard(job))
        written.append(job.location)
    return results


def _run_ray(jobs: list[ShardJob], written: list[str]) -> list[dict]:
    import ray

    if not ray.is_initialized():
        # Sources are local files, so a local Ray; a caller with a cluster initialises Ray first.
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
    task = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    pending = {task.remote(job): job for job in jobs}
    results: dict[str, dict] = {}
    last_log = time.monotonic()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=10)
            for ref in ready:
                job = pending.pop(ref)
                results[job.location] = ray.get(ref)
                written.append(job.location)
            if time.monotonic() - last_log > 10:
                log.info("wrote %d of %d shards", len(results), len(jobs))
                last_log = time.monotonic()
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return [results[job.location] for job in jobs]


def write_split(
    data: SplitData,
    name: str,
    split_dir: str,
    *,
    channels: int,
    shard_size: int,
    seed: int,
    use_ray: bool | None = None,
    held_out: dict | None = None,
) -> dict:
    """Write the shards and dataset.json of one split; returns what dataset.json holds.

    `use_ray`: write the shards as Ray tasks (None: when there are PARALLEL_MIN_SHARDS or more).
    `held_out`: how a validation split was held out of this one, recorded in dataset.json."""
    info_location = storage.join(split_dir, DATASET_JSON)
    storage.delete(info_location)
    jobs = plan_shards(data, split_dir, shard_size, seed)
    parallel = len(jobs) >= PARALLEL_MIN_SHARDS if use_ray is None else use_ray
    log.info(
        "%s %s: %d samples into %d shards%s",
        name,
        data.split,
        len(data),
        len(jobs),
        " with Ray tasks" if parallel else "",
    )
    written: list[str] = []
    try:
        results = _run_ray(jobs, written) if parallel else _run_local(jobs, written)
    except BaseException:
        for location in written:  # a split either completes or leaves nothing of this run
            storage.delete(location)
        raise
    _remove_stale(split_dir, data.split, {r["name"] for r in results})

    unreadable = sum(r["unreadable"] for r in results)
    if unreadable:
        log.warning("%d file(s) could not be read as images; readers will skip them", unreadable)
    native_size = data.native_size
    if data.files is not None:
        native_size = _native_size({tuple(s) for r in results for s in r["sizes"]})
    counts = np.bincount(data.labels, minlength=len(data.classes)).tolist()
    info = split_info(name, data.split, data.classes, counts, channels, native_size, seed, results)
    if held_out is not None:
        info["held_out"] = held_out
    storage.write_json(info_location, info)
    return info


def split_info(
    name: str,
    split: str,
    classes: list[str],
    counts: list[int],
    channels: int,
    native_size: int | None,
    seed: int,
    shards: list[dict],
) -> dict:
    """What dataset.json holds; `shards` are write_shard's results in shard order."""
    return {
        "format": DATASET_FORMAT,
        "name": name,
        "split": split,
        "classes": list(classes),
        "counts": counts,
        "channels": channels,
        "native_size": native_size,
        "num_samples": sum(counts),
        "seed": seed,
        "shards": [{k: r[k] for k in ("name", "samples", "sha256")} for r in shards],
    }


def _native_size(sizes: set[tuple[int, ...]]) -> int | None:
    """The side length if every readable image is the same square size, else None."""
    if len(sizes) != 1:
        return None
    ((width, height),) = sizes
    return width if width == height else None


def _remove_stale(split_dir: str, split: str, keep: set[str]) -> None:
    """Shards of an earlier, larger preparation, and temporary files of a crashed one."""
    for entry in storage.list_dir(split_dir):
        if entry.startswith(f"{split}-") and (
            (entry.endswith(".tar") and entry not in keep) or ".tar.tmp-" in entry
        ):
            storage.delete(storage.join(split_dir, entry))
