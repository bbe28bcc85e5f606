"""Reading WebDataset shards into decoded rows, rejecting bad samples instead of failing.

Not ray.data.read_webdataset: in Ray 2.60 a truncated tar fails the whole dataset uncounted, and
its default decoder unpickles members (DESIGN.md sections 7, 10). Here each shard is streamed,
only image and label members are read, and every bad sample becomes a row that says why.
"""

from __future__ import annotations

import io
import logging
import queue
import tarfile
import threading
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from condense_pipeline import rejects, storage
from condense_pipeline.datasets import Profile
from condense_pipeline.errors import UserError
from condense_pipeline.formats import (
    DATASET_FORMAT,
    DATASET_JSON,
    ERROR,
    IMAGE,
    IMAGE_SUFFIXES,
    KEY,
    LABEL,
    LABEL_SUFFIX,
    SHARD,
)

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

# PIL's own decompression-bomb limit (about 89.5 M pixels); larger images are rejected.
DEFAULT_MAX_PIXELS = 89_478_485
# Members are read into memory whole: cap them (ImageNet's largest JPEG is about 15 MB).
MAX_IMAGE_BYTES = 256 << 20
MAX_LABEL_BYTES = 32

# How long a stopped Puller may take to hand back its next item and shut Ray Data's execution
# down (its threads go on calling Ray, and one that does so after ray.shutdown ends the whole
# process with exit code 1)
READER_STOP_S = 30.0

# The error of a good sample that the reader was told not to decode (read_images' `wanted`).
UNUSED = "unused"

# Raw rows, before decoding.
DATA = "data"
LABEL_TEXT = "label_text"


def _raw(key: str, shard: str, data=None, label_text=None, error: str = "") -> dict:
    return {KEY: key, DATA: data, LABEL_TEXT: label_text, SHARD: shard, ERROR: error}


def _split_member(name: str) -> tuple[str, str] | None:
    """(key, suffix) by webdataset's rule: the key is the path up to the basename's first dot."""
    name = name.removeprefix("./")
    folder, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, suffix = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def iter_shard(location: str) -> Iterator[dict]:
    """Raw rows of one tar: {key, data, label_text, shard, error}, in tar order.

    Members other than the image and `cls` are skipped unread (never unpickled or torch.load-ed).
    A truncated or corrupt tar ends the shard with one "truncated tar" row; the samples completed
    before the damage still come through, the one being read when it happened does not.
    """
    try:
        stream = storage.open_input(location)
    except FileNotFoundError:
        raise UserError(f"shard {location} does not exist; check the path") from None
    key, data, label_text, error = None, None, None, ""
    try:
        with stream as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                parts = _split_member(member.name) if member.isfile() else None
                if parts is None:
                    continue
                if parts[0] != key:
                    if key is not None:
                        yield _raw(key, location, data, label_text, error)
                    key, data, label_text, error = parts[0], None, None, ""
                suffix = parts[1]
                if suffix in IMAGE_SUFFIXES:
                    if data is not None:
                        error = "multiple images: more than one image member"
                    elif member.size > MAX_IMAGE_BYTES:  # not even read into memory
                        error = f"oversized image: a {member.size}-byte member"
                        data = b""
                    else:
                        data = tar.extractfile(member).read()
                elif suffix == LABEL_SUFFIX:
                    text = tar.extractfile(member).read(MAX_LABEL_BYTES + 1)
                    label_text = text.decode("utf-8", "replace")
        if key is not None:
            yield _raw(key, location, data, label_text, error)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        log.warning("shard %s is damaged after %s: %s", location, key, e)
        yield _raw(f"{location}#truncated", location, error=f"truncated tar: {e}")


def decode_image(
    data: bytes, profile: Profile, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Image bytes -> uint8 [res, res, channels] at the profile's resolution and channels.

    The whole image is squashed to res x res with a box filter (no crop: the downsampled-ImageNet
    convention). Raises ValueError("<kind>: <detail>") on an image it will not decode.
    """
    res, mode = profile.resolution, "L" if profile.channels == 1 else "RGB"
    try:
        with warnings.catch_warnings():
            # PIL warns above its pixel limit and raises above twice it; both are rejections.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"oversized image: {e}") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error...)
        raise ValueError(f"undecodable image: {type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"oversized image: {width}x{height} is above {max_pixels} pixels")
    try:
        # JPEG only: decode at 1/2, 1/4 or 1/8 scale, still at least res on each side, which
        # makes big JPEGs far cheaper; the box filter then does the rest.
        image.draft(mode, (res, res))
        image = image.convert(mode)
        if image.size != (res, res):
            image = image.resize((res, res), Image.Resampling.BOX)
        array = np.asarray(image, dtype=np.uint8)
    except Exception as e:
        raise ValueError(f"undecodable image: {type(e).__name__}: {e}") from None
    return array[:, :, None] if array.ndim == 2 else array


def _rejected(raw: dict, profile: Profile, reason: str) -> dict:
    res, channels = profile.resolution, profile.channels
    return {
        KEY: str(raw[KEY]),
        IMAGE: np.zeros((res, res, channels), np.uint8),
        LABEL: -1,
        SHARD: raw[SHARD],
        ERROR: reason,
    }


def decode_row(
    raw: dict, profile: Profile, num_classes: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict:
    """A raw row -> {key, image uint8 [res, res, C], label, shard, error}; rejects keep the key
    and the reason, with a zero image and label -1."""
    label = check_raw(raw, num_classes)
    if isinstance(label, str):
        return _rejected(raw, profile, label)
    return _decoded(raw, label, profile, max_pixels)


def _decoded(raw: dict, label: int, profile: Profile, max_pixels: int) -> dict:
    """The row of a raw sample whose label checked out: its decoded image, or why it has none."""
    try:
        image = decode_image(raw[DATA], profile, max_pixels=max_pixels)
    except ValueError as e:
        return _rejected(raw, profile, str(e))
    return {KEY: str(raw[KEY]), IMAGE: image, LABEL: label, SHARD: raw[SHARD], ERROR: ""}


def check_raw(raw: dict, num_classes: int) -> int | str:
    """A raw row's label, or the reason to reject it (everything but decoding the image)."""
    if raw[ERROR]:
        return raw[ERROR]
    if raw[DATA] is None:
        return "missing image: no image member"
    text = raw[LABEL_TEXT]
    if text is None:
        return "missing label: no cls member"
    try:
        label = int(text.strip())
    except ValueError:
        return f"bad label: {text[:40]!r} is not an integer"
    if not 0 <= label < num_classes:
        return f"label out of range: {label} not in [0, {num_classes})"
    return label


def _require_shards(shards: list[str]) -> None:
    if not shards:
        raise UserError("the shard list is empty; point at a folder of .tar shards")


def iter_decoded(
    shards: list[str], profile: Profile, num_classes: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[dict]:
    """Decoded rows of every shard in order, without Ray: small data, tests, pilot, evaluation."""
    _require_shards(shards)
    for shard in shards:
        for raw in iter_shard(shard):
            yield decode_row(raw, profile, num_classes, max_pixels=max_pixels)


# Rows per block that the Ray reader emits: bounded blocks whatever the shard size.
ROWS_PER_BLOCK = 1000


def _read_shards(
    batch: dict[str, np.ndarray],
    profile: Profile,
    num_classes: int,
    max_pixels: int,
    wanted: Callable | None,
) -> Iterator[dict[str, np.ndarray]]:
    """Read and decode whole shards inside one Ray task, yielding numpy blocks."""
    raws = []
    for shard in batch[SHARD]:
        for raw in iter_shard(str(shard)):
            raws.append(raw)
            if len(raws) == ROWS_PER_BLOCK:
                yield _decode_block(raws, profile, num_classes, max_pixels, wanted)
                raws = []
    if raws:
        yield _decode_block(raws, profile, num_classes, max_pixels, wanted)


def _decode_block(raws, profile, num_classes, max_pixels, wanted) -> dict[str, np.ndarray]:
    """Decoded rows as numpy columns. Good samples that `wanted(keys, labels)` leaves out keep
    their label but are not decoded: a zero image and the error UNUSED."""
    checked = [check_raw(raw, num_classes) for raw in raws]
    use = np.ones(len(raws), dtype=bool)
    if wanted is not None:
        good = [i for i, c in enumerate(checked) if not isinstance(c, str)]
        keys = [str(raws[i][KEY]) for i in good]
        use[good] = wanted(keys, np.array([checked[i] for i in good], dtype=np.int64))
    rows = []
    for raw, label, decode in zip(raws, checked, use):
        if isinstance(label, str):
            rows.append(_rejected(raw, profile, label))
        elif decode:
            rows.append(_decoded(raw, label, profile, max_pixels))
        else:
            rows.append({**_rejected(raw, profile, UNUSED), LABEL: label})
    images = np.zeros(
        (len(rows), profile.resolution, profile.resolution, profile.channels), np.uint8
    )
    for i, row in enumerate(rows):
        images[i] = row[IMAGE]
    return {
        KEY: np.array([r[KEY] for r in rows], dtype=object),
        IMAGE: images,
        LABEL: np.array([r[LABEL] for r in rows], dtype=np.int64),
        SHARD: np.array([r[SHARD] for r in rows], dtype=object),
        ERROR: np.array([r[ERROR] for r in rows], dtype=object),
    }


def read_images(
    shards: list[str],
    profile: Profile,
    num_classes: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    wanted: Callable | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of decoded rows (key, image, label, shard, error), one read task per shard.

    Rejected samples stay in as rows with an error, so downstream stages can count them exactly.
    `wanted(keys, labels) -> bool mask`, when given, picks the good samples worth decoding; the
    others come through undecoded with the error UNUSED (the statistics pass samples only M
    images per class and probe, and decoding is about half of a reader's work).
    """
    import ray

    _require_shards(shards)
    items = [{SHARD: shard} for shard in shards]
    kwargs = {"profile": profile, "num_classes": num_classes, "max_pixels": max_pixels}
    return ray.data.from_items(items, override_num_blocks=len(shards)).map_batches(
        _read_shards, batch_size=1, batch_format="numpy", fn_kwargs={**kwargs, "wanted": wanted}
    )


def read_split(
    shards: list[str], profile: Profile, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every good image of a split in memory, read and decoded by Ray Data in parallel (one task
    per shard): (uint8 [n, res, res, C], labels int64 [n], keys [n]), ordered by key so that
    the order does not depend on which task finished first. Rejected samples are left out."""
    images, labels, keys = [], [], []
    for block in read_images(shards, profile, num_classes).iter_batches(
        batch_size=None, batch_format="numpy"
    ):
        good = block[ERROR] == ""
        images.append(block[IMAGE][good])
        labels.append(block[LABEL][good])
        keys.append(block[KEY][good])
    if not labels or not sum(len(y) for y in labels):
        raise UserError(f"no good samples in the {len(shards)} shard(s) starting {shards[0]}")
    order = np.argsort(np.concatenate(keys).astype(str), kind="stable")
    return (
        np.concatenate(images)[order],
        np.concatenate(labels)[order],
        np.concatenate(keys)[order],
    )


@dataclass
class ReadSummary:
    """Counts of good and rejected samples; summaries add, so partial counts merge exactly."""

    good: int = 0
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)  # shard -> kind -> count
    by_class: dict[int, int] = field(default_factory=dict)  # label -> good samples

    @property
    def num_rejected(self) -> int:
        return sum(sum(kinds.values()) for kinds in self.rejected.values())

    @property
    def total(self) -> int:
        return self.good + self.num_rejected

    def add(self, label: int, shard: str, error: str) -> None:
        if error:
            rejects.count(self.rejected, shard, error)
        else:
            self.good += 1
            self.by_class[int(label)] = self.by_class.get(int(label), 0) + 1

    def __add__(self, other: ReadSummary) -> ReadSummary:
        out = ReadSummary(
            self.good + other.good,
            rejects.merged(self.rejected, other.rejected),
            dict(self.by_class),
        )
        for label, count in other.by_class.items():
            out.by_class[label] = out.by_class.get(label, 0) + count
        return out

    def reason_counts(self) -> dict[str, int]:
        """Rejections per kind over all shards."""
        total: Counter[str] = Counter()
        for kinds in self.rejected.values():
            total.update(kinds)
        return dict(total)


def summarize(rows_or_batches: Iterable[dict]) -> ReadSummary:
    """Count decoded rows, or batches of them (dicts of arrays, as iter_batches gives)."""
    summary = ReadSummary()
    for item in rows_or_batches:
        if isinstance(item[ERROR], str):
            summary.add(item[LABEL], item[SHARD], item[ERROR])
        else:
            for label, shard, error in zip(item[LABEL], item[SHARD], item[ERROR], strict=True):
                summary.add(label, shard, error)
    return summary


def summarize_dataset(dataset: ray.data.Dataset) -> ReadSummary:
    """Run a Ray Dataset from read_images and count its rows (the images stay on the workers)."""
    columns = dataset.select_columns([LABEL, SHARD, ERROR])
    return summarize(columns.iter_batches(batch_format="numpy", batch_size=4096))


def check_rejects(
    summary: ReadSummary, max_fraction: float = 0.01, *, whole: int | None = None
) -> None:
    """Raise UserError when no sample was good or more than `max_fraction` were rejected.

    For a count of part of the data, `whole` is the number of samples of all of it: this fails
    only once the rejects so far are above `max_fraction` of that, when the whole pass is sure to
    fail too, so a pass checked after every commit fails early and never wrongly.
    """
    rejected = summary.num_rejected
    kinds = ", ".join(
        f"{count} {kind}"
        for kind, count in sorted(summary.reason_counts().items(), key=lambda kc: -kc[1])
    )
    advice = "fix the shards or pass --max-bad-fraction to accept"
    if whole is not None:
        whole = max(whole, summary.total)
        if rejected > max_fraction * whole:
            raise UserError(
                f"{rejected} samples were rejected in the first {summary.total} of {whole}, "
                f"already above the {100 * max_fraction:g}% threshold ({kinds}); {advice}"
            )
        return
    if summary.total == 0:
        raise UserError("the shards hold no samples; check the path or re-run prepare")
    if summary.good == 0:
        raise UserError(f"all {rejected} samples were rejected ({kinds}); check the shards")
    if rejected / summary.total > max_fraction:
        raise UserError(
            f"{rejected} of {summary.total} samples ({100 * rejected / summary.total:.2f}%) "
            f"were rejected, above the {100 * max_fraction:g}% threshold ({kinds}); {advice}"
        )
    if rejected:
        log.warning("%d of %d samples rejected: %s", rejected, summary.total, summary.rejected)


def load_dataset_info(shard_dir_or_spec: str) -> dict:
    """The dataset.json beside the shards of a folder, glob, brace pattern or single tar."""
    spec = shard_dir_or_spec.rstrip("/")
    if storage.is_dir(spec):
        folder = spec
    else:
        folder = spec.rsplit("/", 1)[0] if "/" in spec else "."
    location = storage.join(folder, DATASET_JSON)
    if not storage.exists(location):
        raise UserError(
            f"no {DATASET_JSON} at {location}; create the shards with "
            "`condense-pipeline prepare` (an unfinished prepare leaves none)"
        )
    info = storage.read_json(location)
    if info.get("format") != DATASET_FORMAT:
        raise UserError(
            f"{location} has format {info.get('format')}, this version reads format "
            f"{DATASET_FORMAT}; re-run `condense-pipeline prepare`"
        )
    return info


class Puller:
    """The items of a Ray Data iterator, pulled on a thread of its own into a bounded queue
    (`items`), then None, or the exception the iterator raised. The caller's thread stays free to
    notice a read that makes no progress at all: Ray Data waits for ever for CPUs to run its read
    tasks on. `open` makes the iterator on that thread, so that it lives there only: when the
    thread ends, finished or stopped, the iterator goes, and Ray Data shuts its execution down."""

    def __init__(self, open: Callable[[], Iterable], depth: int):
        self.items: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pull, args=(open,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop pulling and wait (at most READER_STOP_S) until Ray Data has shut the read's
        execution down, so that none of it runs into a stopped command's ray.shutdown."""
        self._stop.set()
        self._thread.join(timeout=READER_STOP_S)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self.items.put(item, timeout=1.0)
                return True
            except queue.Full:
                pass
        return False

    def _pull(self, open: Callable[[], Iterable]) -> None:
        try:
            for item in open():
                if not self._put(item):
                    return
            self._put(None)
        except Exception as e:  # raised again in the caller's thread
            self._put(e)
