"""Sources held as image files: an ImageFolder tree, or a flat folder with a labels file."""

from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np

from condense_pipeline import storage
from condense_pipeline.errors import UserError
from condense_pipeline.formats import DATASET_JSON, TRAIN
from condense_pipeline.prepare.sources import SplitData

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
# Looked for in a flat folder: ILSVRC val (Kaggle), TinyImageNet val, a plain "file,label" list.
KNOWN_LABEL_FILES = ("LOC_val_solution.csv", "val_annotations.txt")
PLAIN_LABEL_FILES = ("labels.csv", "labels.txt")
HEADER_FIELDS = {"imageid", "filename", "file", "image", "path", "name"}
SPLIT_FOLDERS = {"train", "val", "valid", "validation", "test"}


def find_labels_file(path: str) -> str | None:
    """The labels file of a flat image folder, or None."""
    if not os.path.isdir(path):
        return None
    names = list(KNOWN_LABEL_FILES)
    # A plain labels.txt beside class folders is more likely a list of class names.
    if set(_subfolders(path)) <= {"images"}:
        names += PLAIN_LABEL_FILES
    for name in names:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def list_images(root: str) -> list[str]:
    """Image files under `root`, as sorted paths relative to it (hidden entries skipped)."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        for f in files:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                found.append(f if rel == "." else os.path.join(rel, f))
    return sorted(found)


def _subfolders(path: str) -> list[str]:
    return sorted(
        e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=True) and e.name[0] != "."
    )


def has_class_folders(path: str) -> bool:
    return bool(_subfolders(path))


def sample_keys(rel_paths: list[str]) -> list[str]:
    """WebDataset keys from file paths: the path without its suffix, with no dots (a dot would
    start the member suffix). Where two files would share a key, both keep their suffix."""
    keys = [os.path.splitext(p)[0].replace(os.sep, "/").replace(".", "_") for p in rel_paths]
    counts = Counter(keys)
    return [
        k if counts[k] == 1 else p.replace(os.sep, "/").replace(".", "_")
        for k, p in zip(keys, rel_paths, strict=True)
    ]


def train_classes(out: str) -> list[str] | None:
    """The class list of the train split already prepared under `out`, if there is one."""
    location = storage.join(out, TRAIN, DATASET_JSON)
    return storage.read_json(location)["classes"] if storage.exists(location) else None


def load_image_folder(path: str, *, split: str, out: str) -> SplitData:
    """One sub-folder per class; the class index is the sorted folder names' order."""
    names = _subfolders(path)
    if set(names) & SPLIT_FOLDERS and set(names) <= SPLIT_FOLDERS | {"images"}:
        raise UserError(
            f"{path} holds split folders ({', '.join(names)}), not classes; "
            "point prepare at one of them"
        )
    per_class = {name: list_images(os.path.join(path, name)) for name in names}
    # A test split must use the train split's indices, even if it lacks a class.
    classes = train_classes(out) if split != TRAIN else None
    if classes is None:
        classes = names
    unknown = [n for n in names if per_class[n] and n not in classes]
    if unknown:
        raise UserError(
            f"class folder {unknown[0]} in {path} is not a class of the train split "
            f"under {out}; prepare the matching train folder first"
        )
    index = {c: i for i, c in enumerate(classes)}
    rel_paths, labels = [], []
    for name in names:
        rel_paths += [os.path.join(name, f) for f in per_class[name]]
        labels += [index[name]] * len(per_class[name])
    if not rel_paths:
        raise UserError(f"no image files found under the class folders of {path}")
    empty = [c for c in classes if not per_class.get(c)]
    if empty:
        log.warning("%d class(es) have no images, first: %s", len(empty), empty[0])
    return SplitData(
        split=split,
        classes=list(classes),
        keys=sample_keys(rel_paths),
        labels=np.array(labels, np.int64),
        files=[os.path.join(path, p) for p in rel_paths],
    )


def parse_labels(path: str) -> list[tuple[str, str]]:
    """(file name or id, class) pairs from a labels file.

    Accepted: ILSVRC's LOC_val_solution.csv ("ImageId,PredictionString", the first token being
    the synset), TinyImageNet's val_annotations.txt ("file<TAB>class<TAB>box..."), and a plain
    "file,label" list (comma, tab or space separated, with or without a header).
    """
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            sep = "," if "," in line else "\t" if "\t" in line else None
            fields = line.split(sep)
            if not pairs and fields[0].strip().lower() in HEADER_FIELDS:
                continue
            label = fields[1].split() if len(fields) > 1 else []
            if not label:
                raise UserError(f"{path} line {number}: expected 'file,label', got {line[:80]!r}")
            pairs.append((fields[0].strip(), label[0]))
    if not pairs:
        raise UserError(f"{path} holds no labels; expected lines of 'file,label'")
    return pairs


def load_flat(path: str, labels: str | None, *, split: str, name: str, out: str) -> SplitData:
    """A folder of images (at any depth) with a labels file naming each image's class."""
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a folder; a labels file goes with a folder of images")
    labels_path = labels or find_labels_file(path)
    if labels_path is None or not os.path.isfile(labels_path):
        raise UserError(f"labels file {labels_path} does not exist; check the --labels path")
    pairs = parse_labels(labels_path)
    rel_paths = list_images(path)
    by_name: dict[str, list[str]] = {}
    for p in rel_paths:
        by_name.setdefault(os.path.basename(p), []).append(p)
        by_name.setdefault(os.path.splitext(os.path.basename(p))[0], []).append(p)

    matched: dict[str, str] = {}
    missing = 0
    for file, label in pairs:
        # ILSVRC names images by id without a suffix; TinyImageNet with it.
        hits = by_name.get(os.path.basename(file), [])
        if len(hits) > 1:
            raise UserError(f"{len(hits)} images in {path} match {file!r}; names must be unique")
        if hits:
            matched[hits[0]] = label
        else:
            missing += 1
    if not matched:
        raise UserError(f"none of the {len(pairs)} files named in {labels_path} is in {path}")
    if missing:
        log.warning("%d file(s) named in %s are not in %s", missing, labels_path, path)
    unlabelled = len(rel_paths) - len(matched)
    if unlabelled:
        log.warning("%d image(s) in %s have no label and are left out", unlabelled, path)

    if all(label.isdigit() for label in matched.values()):
        matched = {f: str(int(label)) for f, label in matched.items()}  # "07" is class 7
    classes = _flat_classes(sorted(set(matched.values())), split, out)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(matched.values()) - set(index))
    if unknown:
        raise UserError(
            f"label {unknown[0]} in {labels_path} is not a class of the train split under {out}; "
            "check that both come from the same dataset"
        )
    files = sorted(matched)
    log.info("%s: %d labelled images, %d classes", name, len(files), len(classes))
    return SplitData(
        split=split,
        classes=classes,
        keys=sample_keys(files),
        labels=np.array([index[matched[f]] for f in files], np.int64),
        files=[os.path.join(path, f) for f in files],
    )


def _flat_classes(names: list[str], split: str, out: str) -> list[str]:
    # ImageNet val must use the train split's indices (sorted synsets), so reuse them when known.
    known = train_classes(out) if split != TRAIN else None
    if known is not None:
        return list(known)
    if all(n.isdigit() for n in names):
        # Numeric labels keep their value as the index, even where a class is absent.
        return [str(i) for i in range(max(int(n) for n in names) + 1)]
    return names
