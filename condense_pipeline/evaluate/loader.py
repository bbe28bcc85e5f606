"""The public loader of an exported condensed set: what a downstream training job uses.

`load_condensed` reads the export's WebDataset tars (the 8-bit PNGs, not the float tensors, since
the PNGs are what gets shared) and normalises them with the mean and std in the export's
manifest.json. Any other WebDataset reader works on the same tars too, e.g.
`webdataset.WebDataset(urls).decode("pil").to_tuple("png", "cls")` ("pill" instead of "pil" keeps
one-channel images grey).

Augmentation. The evaluation protocol draws one DSA op per mini-batch with per-sample parameters
(`augment_batch`); for a DataLoader that is `collate_fn=dsa_collate(strategy)`. `augment=True`
instead augments each item on its own (one op per image), which suits any loader. Either way the
random draws come from a generator per process: seeded with `seed` in the main process, and in a
DataLoader worker with the seed the DataLoader gives that worker, which it draws afresh every epoch,
so workers never repeat each other's augmentations or last epoch's.

`load_condensed_ray` gives the Parquet copy (float tensors included) as a Ray Dataset.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from condense_pipeline import formats, storage
from condense_pipeline.condense.augment import augment_batch
from condense_pipeline.errors import UserError
from condense_pipeline.pixels import normalise

if TYPE_CHECKING:
    import ray.data


def decode_png(data: bytes, channels: int) -> torch.Tensor:
    """PNG bytes -> uint8 [C, H, W], converted to 1 (L) or 3 (RGB) channels."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class _Generators:
    """One torch.Generator per process (see the module docstring for the seeding)."""

    def __init__(self, seed: int):
        self.seed = seed
        self._key: int | None = None
        self._generator: torch.Generator | None = None

    def get(self) -> torch.Generator:
        worker = get_worker_info()
        key = None if worker is None else worker.seed
        if self._generator is None or key != self._key:
            self._generator = torch.Generator().manual_seed(self.seed if key is None else key)
            self._key = key
        return self._generator


class CondensedDataset(Dataset):
    """An exported condensed set in memory: items are (image float32 [C, H, W] normalised, label).

    Pixels are kept as uint8 and normalised per item, so even a large set stays small in memory.
    """

    def __init__(
        self,
        pixels: torch.Tensor,
        labels: torch.Tensor,
        keys: list[str],
        manifest: dict,
        augment: bool = False,
        seed: int = 0,
    ):
        self.pixels = pixels
        self.labels = labels
        self.keys = keys
        self.manifest = manifest
        self.classes: list[str] = manifest["classes"]
        self.strategy: list[str] = manifest["augment"]
        self.augment = augment
        self._generators = _Generators(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = normalise(self.pixels[index : index + 1], self.manifest["mean"], self.manifest["std"])
        if self.augment:
            x = augment_batch(x, self.strategy, self._generators.get())
        return x[0], int(self.labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set at once, unaugmented: (images float32 [n, C, H, W], labels int64 [n])."""
        return normalise(self.pixels, self.manifest["mean"], self.manifest["std"]), self.labels


class DSACollate:
    """A DataLoader collate_fn: stack a batch, then one DSA op with per-sample parameters."""

    def __init__(self, strategy: Sequence[str], seed: int = 0):
        self.strategy = list(strategy)
        self._generators = _Generators(seed)

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([item[0] for item in items])
        y = torch.tensor([item[1] for item in items], dtype=torch.int64)
        return augment_batch(x, self.strategy, self._generators.get()), y


def dsa_collate(strategy: Sequence[str], seed: int = 0) -> DSACollate:
    """collate_fn applying the protocol's batch-level DSA; strategy e.g. dataset.strategy."""
    return DSACollate(strategy, seed)


def read_manifest(path: str) -> dict:
    """The manifest of a finished export; a clear error for a missing or unfinished one."""
    if not storage.is_done(path):
        raise UserError(
            f"{path} is not a finished export (no {storage.DONE} marker); run the export again"
        )
    manifest = storage.read_json(storage.join(path, formats.MANIFEST))
    if manifest.get("format") != formats.EXPORT_FORMAT:
        raise UserError(
            f"{path} has export format {manifest.get('format')}, this version reads "
            f"{formats.EXPORT_FORMAT}; export it again with this version"
        )
    return manifest


def iter_samples(shards: list[str]):
    """Samples {"__key__", "png", "cls", "json", ...} of WebDataset tars on any storage."""
    for shard in shards:
        with storage.open_input(shard) as stream:
            yield from group_by_keys(tar_file_expander([{"url": shard, "stream": stream}]))


def load_condensed(path: str, augment: bool = False, seed: int = 0) -> CondensedDataset:
    """Read an export folder's WebDataset tars (PNG) into a torch Dataset.

    Only the shards the manifest lists are read, so stale files from an earlier export are ignored.
    """
    manifest = read_manifest(path)
    shards = [storage.join(path, formats.EXPORT_WDS_DIR, n) for n in manifest["shards"]["wds"]]
    images, labels, keys = [], [], []
    for sample in iter_samples(shards):
        images.append(decode_png(sample["png"], manifest["channels"]))
        labels.append(int(sample["cls"]))
        keys.append(sample["__key__"])
    if len(labels) != manifest["num_images"]:
        raise UserError(
            f"the export at {path} holds {len(labels)} images but its manifest says "
            f"{manifest['num_images']}; export it again"
        )
    pixels = torch.stack(images) if images else torch.zeros(0, manifest["channels"], 1, 1)
    return CondensedDataset(
        pixels, torch.tensor(labels, dtype=torch.int64), keys, manifest, augment, seed
    )


def load_condensed_ray(path: str) -> ray.data.Dataset:
    """The export's Parquet files as a Ray Dataset with columns formats.PARQUET_COLUMNS."""
    import ray.data  # here, so the torch loader works without Ray

    manifest = read_manifest(path)
    files = [
        storage.join(path, formats.EXPORT_PARQUET_DIR, n) for n in manifest["shards"]["parquet"]
    ]
    filesystem, _ = storage.resolve(path)
    return ray.data.read_parquet([storage.resolve(f)[1] for f in files], filesystem=filesystem)
