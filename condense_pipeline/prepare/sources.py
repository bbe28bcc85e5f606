"""What a source holds, per split, before it is written as shards; and which loader reads it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import numpy as np

from condense_pipeline.errors import UserError
from condense_pipeline.formats import VALIDATION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitData:
    """One split of a source: either image files (stored as they are) or a uint8 array.

    `keys[i]`, `labels[i]` and `files[i]` / `images[i]` describe sample i, in source order.
    `channels` and `native_size` are None where only reading the images would tell.
    """

    split: str
    classes: list[str]
    keys: list[str]
    labels: np.ndarray  # int64 [n]
    files: list[str] | None = None
    images: np.ndarray | None = None  # uint8 [n, H, W] or [n, H, W, C]
    channels: int | None = None
    native_size: int | None = None

    def __len__(self) -> int:
        return len(self.keys)


def from_arrays(
    split: str, x: np.ndarray, y: np.ndarray, classes: list[str] | None = None
) -> SplitData:
    """A split from arrays x uint8 [n, H, W(, C)] and integer labels y [n]."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != np.uint8:
        raise UserError(f"{split} images are {x.dtype}, not uint8; convert them to 0..255 uint8")
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] != 3):
        raise UserError(
            f"{split} images have shape {x.shape}; expected [n, H, W] or [n, H, W, 3] uint8"
        )
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(
            f"{split} labels must be {len(x)} integers, one per image; got {y.dtype} {y.shape}"
        )
    if len(y) and y.min() < 0:
        raise UserError(f"{split} labels must be >= 0; found {y.min()}")
    if classes is None:
        classes = [str(i) for i in range(int(y.max()) + 1 if len(y) else 0)]
    if len(y) and y.max() >= len(classes):
        raise UserError(f"{split} label {y.max()} has no class name ({len(classes)} classes)")
    height, width = x.shape[1:3]
    return SplitData(
        split=split,
        classes=list(classes),
        keys=[f"{split}-{i:06d}" for i in range(len(x))],
        labels=y.astype(np.int64),
        images=x,
        channels=1 if x.ndim == 3 else 3,
        native_size=height if height == width else None,
    )


def hold_out(data: SplitData, per_class: int, seed: int) -> tuple[SplitData, SplitData]:
    """(train, validation): `per_class` images of every class held out of a training split,
    chosen by a seeded permutation, but never more than a fifth of a class (tiny sources keep
    most of their images for training)."""
    rng = np.random.default_rng(seed)
    held = []
    for c in range(len(data.classes)):
        members = np.flatnonzero(data.labels == c)
        held.append(rng.permutation(members)[: min(per_class, len(members) // 5)])
    mask = np.zeros(len(data), dtype=bool)
    mask[np.concatenate(held)] = True
    return _subset(data, ~mask, data.split), _subset(data, mask, VALIDATION)


def _subset(data: SplitData, mask: np.ndarray, split: str) -> SplitData:
    index = np.flatnonzero(mask)
    return replace(
        data,
        split=split,
        keys=[data.keys[i] for i in index],
        labels=data.labels[index],
        files=[data.files[i] for i in index] if data.files is not None else None,
        images=data.images[index] if data.images is not None else None,
    )


def load_source(
    name: str, source: str | None, *, split: str | None, labels: str | None, out: str
) -> list[SplitData]:
    """The splits a source holds, recognised from what the path holds."""
    # Imported here so a user who only reads shards never pays for the loaders.
    from condense_pipeline.prepare import arrays, folders

    if source is None:
        if name != "digits":
            raise UserError(
                f"no source given for {name}; pass the path to its files "
                "(only digits ships built in)"
            )
        return _pick(arrays.load_digits(), split)
    path = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(path):
        raise UserError(f"source {source} does not exist; check the path")
    if labels is not None or folders.find_labels_file(path):
        return [folders.load_flat(path, labels, split=split or "test", name=name, out=out)]
    if path.endswith((".tar", ".tar.gz", ".tgz", ".zip")):
        raise UserError(f"{source} is an archive; extract it and point prepare at the folder")
    splits = arrays.load(path, name)
    if splits is not None:
        return _pick(splits, split)
    if os.path.isdir(path) and folders.has_class_folders(path):
        return [folders.load_image_folder(path, split=split or "train", out=out)]
    raise UserError(
        f"cannot tell what {source} holds; expected an ImageFolder tree, an image folder with a "
        "labels file, MNIST idx files, mnist.pkl.gz, CIFAR python batches or an .npz"
    )


def _pick(splits: list[SplitData], split: str | None) -> list[SplitData]:
    if split is None:
        return splits
    chosen = [s for s in splits if s.split == split]
    if not chosen:
        have = ", ".join(s.split for s in splits)
        raise UserError(f"the source has no {split} split; it has {have}")
    return chosen
