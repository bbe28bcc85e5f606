"""Statistics stored one class group per file: the layout of stats/ and of every checkpoint.

A condense task reads only the files of its classes, a worker writes its accumulator one group
at a time, and the merge sums one group at a time (the checkpoints' files of that group), so no
process ever needs the whole accumulator twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from condense_pipeline import storage
from condense_pipeline.condense.stats import ClassStats

CLASSES_PER_FILE = 100


def class_file(start: int) -> str:
    return f"classes-{start:05d}.safetensors"


def group_starts(num_classes: int) -> range:
    return range(0, num_classes, CLASSES_PER_FILE)


def save_groups(stats: ClassStats, folder: str) -> int:
    """Write `stats` as one file per class group under `folder`; returns the bytes written."""
    written, num_classes = 0, len(stats.seen)
    for start in group_starts(num_classes):
        classes = list(range(start, min(start + CLASSES_PER_FILE, num_classes)))
        written += stats.select(classes).save(storage.join(folder, class_file(start)))
    return written


def load_group(folders: list[str], start: int, device="cpu") -> ClassStats:
    """The sum over `folders` of their files of the group at `start`, holding the sum and one
    file at a time (the files' tensors are read in place, not copied: on the CPU the sum's
    tensors are views of the first file's buffer, which lives as long as any of them)."""
    total = None
    for folder in folders:
        part = ClassStats.load(storage.join(folder, class_file(start)), device)
        if total is None:
            total = part
        else:
            total += part
        del part
    return total


@dataclass
class Merged:
    """What the summary needs of the merged statistics, without their sums."""

    seen: torch.Tensor  # [C] good images per class
    rejected: dict[str, dict[str, int]]
    exact_bandwidth: torch.Tensor | None  # [K, C], where the embeddings' sums are held


def merge(folders: list[str], num_classes: int, out: str) -> Merged:
    """Sum the checkpoints in `folders` group by group into the class files of `out`: the
    driver's peak is about two group files (the sum and the part being added; the sum is
    written from its own memory), whatever the classes and the bank."""
    seen, bandwidths, rejected = [], [], {}
    for start in group_starts(num_classes):
        total = load_group(folders, start)
        total.save(storage.join(out, class_file(start)))
        seen.append(total.seen.clone())  # a view would keep the whole file alive
        rejected = total.rejected  # every group file carries the read counts of all the data
        if total.emb_sum is not None:
            bandwidths.append(total.exact_bandwidth())
        del total
    exact = torch.cat(bandwidths, 1) if bandwidths else None
    return Merged(torch.cat(seen), rejected, exact)


def load_classes(folder: str, classes: list[int], device="cpu") -> ClassStats:
    """The statistics of `classes` (in order) in `folder`, reading only the files holding them."""
    parts = {}
    for start in sorted({c // CLASSES_PER_FILE * CLASSES_PER_FILE for c in classes}):
        parts[start] = ClassStats.load(storage.join(folder, class_file(start)), device)
    pieces = [
        parts[c // CLASSES_PER_FILE * CLASSES_PER_FILE].select([c % CLASSES_PER_FILE])
        for c in classes
    ]
    return concat_classes(pieces)


def concat_classes(parts: list[ClassStats]) -> ClassStats:
    """Join statistics of disjoint class lists along the class axis (each part carries the read
    counts of all the data it came from, so the first part's are kept)."""

    def cat(ts, dim=1):
        return None if ts[0] is None else torch.cat(ts, dim)

    return ClassStats(
        count=cat([p.count for p in parts]),
        sqnorm_sum=cat([p.sqnorm_sum for p in parts]),
        emb_sum=cat([p.emb_sum for p in parts]),
        rff_sum=cat([p.rff_sum for p in parts]),
        att_sum=[cat([p.att_sum[i] for p in parts]) for i in range(len(parts[0].att_sum))],
        seen=torch.cat([p.seen for p in parts]),
        rejected=parts[0].rejected,
        pool_hash=np.concatenate([p.pool_hash for p in parts]),
        pool_images=torch.cat([p.pool_images for p in parts]),
        pool_keys=[k for p in parts for k in p.pool_keys],
    )
