"""A Ray Dataset of images and labels -> shards plus dataset.json, for `condense_dataset`.

This is the counting pass: it gives the class sizes that the subsampling rule needs before the
statistics pass starts. It also writes every batch as one shard, in the Ray task that holds the
batch, so that the statistics pass can run in resumable work units like any prepared dataset,
and the dataset gets a fingerprint (the shards' checksums). The rows are shuffled first, as
`prepare` shuffles: every shard is then a random sample of every class, which the bandwidth
pilot relies on (it reads the leading shards), even when the input is sorted by class. Images
are stored as they come: encoded bytes as they are, arrays as PNG; the reader resizes them.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np

from condense_pipeline import storage
from condense_pipeline.errors import UserError
from condense_pipeline.formats import DATASET_JSON, TRAIN
from condense_pipeline.prepare.shards import ShardJob, encode_png, split_info, write_shard

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _blob(image) -> bytes:
    """Encoded image bytes for a cell of the image column (ValueError for anything else)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(
            f"image cells must be encoded bytes or uint8 [H, W(, C)] arrays, got "
            f"{array.dtype} {array.shape}"
        )
    return encode_png(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def _keys(raw: list, blobs: list[bytes]) -> list[str]:
    """Tar-safe, unique keys: the key column's values (or a hash of the image bytes), with
    characters a WebDataset key cannot hold replaced and repeats numbered."""
    keys, seen = [], {}
    for value, blob in zip(raw, blobs):
        key = hashlib.sha1(blob).hexdigest() if value is None else _UNSAFE.sub("_", str(value))
        n = seen.get(key, 0)
        seen[key] = n + 1
        keys.append(key if n == 0 else f"{key}-{n}")
    return keys


class _ShardWriter:
    """map_batches function: one batch -> one shard; returns what dataset.json needs of it."""

    def __init__(self, split_dir: str, image_column: str, label_column: str, key_column):
        self.split_dir = split_dir
        self.columns = (image_column, label_column, key_column)

    def __call__(self, batch: dict) -> dict:
        # Bad input comes back as a row, not an exception: Ray's wrappers would bury the message.
        image_column, label_column, key_column = self.columns
        labels = np.asarray(batch[label_column])
        if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
            return _failed(f"column {label_column!r} must hold integer labels 0..C-1")
        try:
            blobs = [_blob(image) for image in batch[image_column]]
        except ValueError as e:
            return _failed(f"column {image_column!r}: {e}")
        raw = batch[key_column] if key_column else [None] * len(blobs)
        keys = _keys(list(raw), blobs)
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        result = write_shard(
            ShardJob(
                location=storage.join(self.split_dir, f"{TRAIN}-{name}.tar"),
                keys=keys,
                labels=labels.tolist(),
                blobs=blobs,
            )
        )
        return {
            "name": [result["name"]],
            "samples": [result["samples"]],
            "sha256": [result["sha256"]],
            "counts": [json.dumps(np.bincount(labels).tolist())],
            "error": [""],
        }


def _failed(message: str) -> dict:
    return {"name": [""], "samples": [0], "sha256": [""], "counts": ["[]"], "error": [message]}


def write_ray_dataset(
    ds,
    name: str,
    split_dir: str,
    *,
    channels: int,
    image_column: str,
    label_column: str,
    key_column: str | None = None,
    class_names: list[str] | None = None,
    shard_size: int = 1000,
    seed: int = 0,
) -> dict:
    """Write `ds` as the train split under `split_dir`; returns what dataset.json holds.
    On any failure nothing is left behind (the folder is removed)."""
    names = ds.schema().names
    for column in (image_column, label_column, key_column):
        if column is not None and column not in names:
            raise UserError(f"the dataset has no column {column!r}; it has {sorted(names)}")
    writer = _ShardWriter(split_dir, image_column, label_column, key_column)
    storage.delete(split_dir)
    try:
        shuffled = ds.random_shuffle(seed=seed)
        rows = shuffled.map_batches(writer, batch_size=shard_size, batch_format="numpy").take_all()
        info = _split_info(rows, name, channels, class_names)
        storage.write_json(storage.join(split_dir, DATASET_JSON), info)
    except BaseException:
        storage.delete(split_dir)
        raise
    return info


def _split_info(rows: list[dict], name: str, channels: int, class_names) -> dict:
    """dataset.json from the writer's rows; UserError on a batch it refused or no data."""
    errors = [r["error"] for r in rows if r["error"]]
    if errors or not rows:
        raise UserError(errors[0] if errors else "the dataset holds no rows")
    shards = sorted(
        (
            {"name": str(r["name"]), "samples": int(r["samples"]), "sha256": str(r["sha256"])}
            for r in rows
        ),
        key=lambda r: r["name"],
    )
    per_shard = [json.loads(r["counts"]) for r in rows]
    num_classes = max(len(c) for c in per_shard)
    counts = np.zeros(num_classes, dtype=np.int64)
    for c in per_shard:
        counts[: len(c)] += c
    classes = class_names or [str(i) for i in range(num_classes)]
    if len(classes) < num_classes:
        raise UserError(f"label {num_classes - 1} has no class name ({len(classes)} given)")
    counts = np.pad(counts, (0, len(classes) - num_classes))
    return split_info(name, TRAIN, classes, counts.tolist(), channels, None, 0, shards)
