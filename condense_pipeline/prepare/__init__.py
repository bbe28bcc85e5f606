"""Sources -> shuffled WebDataset tar shards plus dataset.json, per split (DESIGN.md sections 2, 9).

Layout: OUT/train/train-000000.tar ... OUT/train/dataset.json, and the same under OUT/test.
"""

from __future__ import annotations

import logging

from condense_pipeline import datasets, storage
from condense_pipeline.errors import UserError
from condense_pipeline.prepare.shards import write_split
from condense_pipeline.prepare.sources import SplitData, load_source

__all__ = ["SplitData", "prepare_dataset"]

log = logging.getLogger(__name__)


def prepare_dataset(
    name: str,
    source: str | None,
    out: str | None,
    *,
    split: str | None = None,
    labels: str | None = None,
    shard_size: int = 1000,
    seed: int = 0,
) -> dict:
    """Convert `source` into shards under `out` (default: the data home of `name`).

    Returns {split: {"samples", "shards", "path"}} for each split written.
    """
    profile = datasets.get_profile(name)
    if shard_size < 1:
        raise UserError(f"shard size must be at least 1, got {shard_size}")
    out = out or datasets.data_home(name)
    splits = load_source(name, source, split=split, labels=labels, out=out)
    summary = {}
    for data in splits:
        if len(data) == 0:
            raise UserError(f"the {data.split} split of {source} holds no images")
        if len(data.classes) != profile.num_classes:
            log.warning(
                "%s %s has %d classes; the %s profile expects %d",
                source or name,
                data.split,
                len(data.classes),
                name,
                profile.num_classes,
            )
        split_dir = storage.join(out, data.split)
        info = write_split(
            data,
            name,
            split_dir,
            channels=data.channels or profile.channels,
            shard_size=shard_size,
            seed=seed,
        )
        summary[data.split] = {
            "samples": info["num_samples"],
            "shards": len(info["shards"]),
            "path": split_dir,
        }
        log.info("%s %s: %d samples in %s", name, data.split, info["num_samples"], split_dir)
    return summary
