"""Sources -> shuffled WebDataset tar shards plus dataset.json, per split (DESIGN.md sections 2, 9).

Layout: OUT/train/train-000000.tar ... OUT/train/dataset.json, and the same under OUT/test and
OUT/validation (images held out of the training split: settings are chosen on them, and the test
split only reports).
"""

from __future__ import annotations

import logging

from condense_pipeline import datasets, storage
from condense_pipeline.errors import UserError
from condense_pipeline.formats import TRAIN, VALIDATION
from condense_pipeline.prepare.shards import write_split
from condense_pipeline.prepare.sources import SplitData, hold_out, load_source

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
    validation: int | None = None,
    use_ray: bool | None = None,
) -> dict:
    """Convert `source` into shards under `out` (default: the data home of `name`).

    `validation` images per class (default: the profile's) are held out of the training split
    into a validation split, which the statistics never see. `use_ray`: write the shards as Ray
    tasks (None: when there are at least PARALLEL_MIN_SHARDS of a split).
    Returns {split: {"samples", "shards", "path"}} for each split written.
    """
    profile = datasets.get_profile(name)
    if shard_size < 1:
        raise UserError(f"shard size must be at least 1, got {shard_size}")
    validation = profile.validation_per_class if validation is None else validation
    if validation < 0:
        raise UserError(f"--validation must be 0 or more images per class, got {validation}")
    out = out or datasets.data_home(name)
    splits = load_source(name, source, split=split, labels=labels, out=out)
    train = next((s for s in splits if s.split == TRAIN), None)
    held_out = None
    if train is not None and validation:
        kept, held = hold_out(train, validation, seed)
        if len(held):  # classes of under 5 images hold out none
            splits = [kept if s is train else s for s in splits] + [held]
            held_out = {"split": VALIDATION, "per_class": validation, "seed": seed}
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
            use_ray=use_ray,
            held_out=held_out if data.split == TRAIN else None,
        )
        summary[data.split] = {
            "samples": info["num_samples"],
            "shards": len(info["shards"]),
            "path": split_dir,
        }
        log.info("%s %s: %d samples in %s", name, data.split, info["num_samples"], split_dir)
    return summary
