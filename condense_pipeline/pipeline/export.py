"""Export a condensed set for downstream training (DESIGN.md 9).

An export folder holds:
  wds/condensed-000000.tar ...      members png (8-bit), cls (label as text), json (class name,
                                    label, index, provenance)
  parquet/condensed-000000.parquet  columns formats.PARQUET_COLUMNS; the float tensors too; the
                                    image and class-label features that Hugging Face `datasets`
                                    reads, in the schema metadata
  preview.png                       one row per class
  loss.png                          the condensation loss curve (when there is a loss log)
  README.md                         the dataset card: recipe, accuracy once evaluated, license
  manifest.json                     normalisation, classes, evaluation recipe, provenance, and how
                                    far the float tensors are from their PNGs
  _DONE                             written last; readers trust only finished exports

The PNGs are what gets shared and evaluated. Storing them rounds every pixel to 1/255 and clamps
it to [0, 1]; DM does not clamp its synthetic images, so the manifest says how much that changed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw
from webdataset import TarWriter

from condense_pipeline import formats, plots, storage
from condense_pipeline.datasets import Profile
from condense_pipeline.evaluate.protocol import EvalConfig, recipe
from condense_pipeline.pixels import to_pixels

log = logging.getLogger(__name__)

PREVIEW_CLASSES = 20
PREVIEW_PER_CLASS = 10
PREVIEW_MIN_CELL = 32  # px; 8 px digits are upscaled (nearest) to be visible
PREVIEW_LABEL_WIDTH = 90  # px of class name left of each row


def _stats(profile: Profile) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(profile.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(profile.std, dtype=torch.float32).view(1, -1, 1, 1)
    return mean, std


def png_error(images: torch.Tensor, pixels: torch.Tensor, profile: Profile) -> dict:
    """How far the PNGs are from the float tensors: max |difference|, normalised and pixel units.

    Pixel units are fractions of the full range (1/255 is one 8-bit level); rounding alone gives at
    most 0.5/255, anything more is clamping.
    """
    mean, std = _stats(profile)
    exact = images * std + mean  # [0, 1] pixel space, unclamped
    stored = pixels.float() / 255
    return {
        "float_vs_png_max_abs_diff": float((images - (stored - mean) / std).abs().max()),
        "float_vs_png_max_abs_diff_pixels": float((exact - stored).abs().max()),
        "clamped_fraction": float(((exact < 0) | (exact > 1)).float().mean()),
    }


def encode_png(pixels: torch.Tensor) -> bytes:
    """uint8 [C, H, W], C in {1, 3} -> PNG bytes (grey or RGB)."""
    return storage.buffer_to_bytes(lambda f: _pil(pixels).save(f, format="PNG"))


def _pil(pixels: torch.Tensor) -> Image.Image:
    array = pixels.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def sample_keys(labels: torch.Tensor) -> list[str]:
    """Keys label-i ("00003-00007"), i counting the images of that label in order; unique."""
    seen: dict[int, int] = {}
    keys = []
    for label in labels.tolist():
        keys.append(f"{label:05d}-{seen.get(label, 0):05d}")
        seen[label] = seen.get(label, 0) + 1
    return keys


def shard_name(index: int, suffix: str) -> str:
    return f"{formats.EXPORT_SHARD_PREFIX}-{index:06d}.{suffix}"


def write_wds_shards(
    out_dir: str,
    keys: list[str],
    pngs: list[bytes],
    labels: list[int],
    class_names: list[str],
    provenance: dict,
    shard_size: int,
) -> list[str]:
    """Write wds/condensed-NNNNNN.tar files of `shard_size` samples; returns their names."""
    names = []
    with tempfile.TemporaryDirectory() as tmp:
        for shard, start in enumerate(range(0, len(keys), shard_size)):
            name = shard_name(shard, "tar")
            local = os.path.join(tmp, name)
            # A fixed mtime makes a rerun write byte-identical tars.
            with TarWriter(local, mtime=0) as writer:
                for i in range(start, min(start + shard_size, len(keys))):
                    meta = {
                        **provenance,
                        "class_name": class_names[labels[i]],
                        "label": labels[i],
                        "index": i,
                    }
                    writer.write(
                        {
                            "__key__": keys[i],
                            "png": pngs[i],
                            "cls": str(labels[i]).encode(),
                            "json": json.dumps(meta, sort_keys=True).encode(),
                        }
                    )
            storage.upload_file(local, storage.join(out_dir, formats.EXPORT_WDS_DIR, name))
            names.append(name)
    return names


# The image column is a struct {bytes, path}: what Hugging Face `datasets` stores an Image as.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def hf_features(class_names: list[str]) -> dict:
    """The columns as Hugging Face `datasets` features, in the form its Parquet reader takes from
    the schema metadata key "huggingface": the image as an Image, the label as a ClassLabel with
    the class names. The tensor column is left for it to infer (a list of float32)."""
    key, label, class_name, image, _ = formats.PARQUET_COLUMNS
    return {
        key: {"dtype": "string", "_type": "Value"},
        label: {"names": list(class_names), "_type": "ClassLabel"},
        class_name: {"dtype": "string", "_type": "Value"},
        image: {"_type": "Image"},
    }


def parquet_schema(shape: tuple[int, int, int], class_names: list[str]) -> pa.Schema:
    """The export's Parquet schema; the tensor's [C, H, W] and the features are in its metadata."""
    types = (pa.string(), pa.int64(), pa.string(), IMAGE_TYPE, pa.list_(pa.float32()))
    features = {"info": {"features": hf_features(class_names)}}
    return pa.schema(
        list(zip(formats.PARQUET_COLUMNS, types, strict=True)),
        metadata={
            formats.TENSOR_SHAPE_METADATA: json.dumps(list(shape)),
            formats.HF_METADATA: json.dumps(features),
        },
    )


def write_parquet_shards(
    out_dir: str,
    keys: list[str],
    labels: list[int],
    class_names: list[str],
    pngs: list[bytes],
    images: torch.Tensor,
    shard_size: int,
) -> list[str]:
    """Write parquet/condensed-NNNNNN.parquet files of `shard_size` rows; returns their names."""
    schema = parquet_schema(tuple(images.shape[1:]), class_names)
    flat = images.flatten(1).numpy()  # float32 already: a view, not a copy
    names = []
    for shard, start in enumerate(range(0, len(keys), shard_size)):
        rows = slice(start, min(start + shard_size, len(keys)))
        chunk = flat[rows]
        offsets = np.arange(0, chunk.size + 1, chunk.shape[1], dtype=np.int32)
        tensor = pa.ListArray.from_arrays(offsets, pa.array(chunk.reshape(-1)))
        image = pa.StructArray.from_arrays(
            [pa.array(pngs[rows], pa.binary()), pa.array([f"{k}.png" for k in keys[rows]])],
            fields=list(IMAGE_TYPE),
        )
        columns = [
            pa.array(keys[rows], pa.string()),
            pa.array(labels[rows], pa.int64()),
            pa.array([class_names[label] for label in labels[rows]], pa.string()),
            image,
            tensor,
        ]
        table = pa.Table.from_arrays(columns, schema=schema)
        name = shard_name(shard, "parquet")
        data = storage.buffer_to_bytes(lambda f, t=table: pq.write_table(t, f))
        storage.write_bytes(storage.join(out_dir, formats.EXPORT_PARQUET_DIR, name), data)
        names.append(name)
    return names


def preview_png(pixels: torch.Tensor, labels: list[int], class_names: list[str]) -> bytes:
    """A grid: a row per class (up to 20), up to 10 images each, upscaled (nearest) to >= 32 px."""
    classes = sorted(set(labels))[:PREVIEW_CLASSES]
    res = pixels.shape[-1]
    cell = res * max(1, math.ceil(PREVIEW_MIN_CELL / res))
    pad = 2
    width = PREVIEW_LABEL_WIDTH + PREVIEW_PER_CLASS * (cell + pad) + pad
    height = max(1, len(classes)) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, label in enumerate(classes):
        top = pad + row * (cell + pad)
        draw.text((4, top + cell // 2 - 5), class_names[label][:14], fill=(0, 0, 0))
        members = [i for i, y in enumerate(labels) if y == label][:PREVIEW_PER_CLASS]
        for col, i in enumerate(members):
            image = _pil(pixels[i]).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(image, (PREVIEW_LABEL_WIDTH + pad + col * (cell + pad), top))
    return storage.buffer_to_bytes(lambda f: canvas.save(f, format="PNG"))


# What the source data's terms say, in short; the condensed images derive from it, so they apply.
SOURCE_LICENSES = {
    "digits": "scikit-learn's copy of the UCI Optical Recognition of Handwritten Digits data, "
    "CC BY 4.0.",
    "mnist": "MNIST (LeCun, Cortes, Burges); redistributed under various terms (CC BY-SA 3.0, "
    "MIT on the Hugging Face Hub); check those of the copy you used.",
    "fashion-mnist": "Fashion-MNIST (Zalando Research), MIT.",
    "cifar10": "CIFAR-10 (Krizhevsky, 2009): no formal license; cite the technical report.",
    "cifar100": "CIFAR-100 (Krizhevsky, 2009): no formal license; cite the technical report.",
    "svhn": "SVHN (Netzer et al., 2011): non-commercial use only.",
    "tinyimagenet": "Tiny ImageNet, a subset of ImageNet: ImageNet's terms of access apply "
    "(non-commercial research and education; the images' copyright stays with their owners).",
    "imagenet": "ImageNet's terms of access apply (non-commercial research and education; the "
    "images' copyright stays with their owners).",
}
UNKNOWN_LICENSE = "Not recorded: the license of the source data applies; check it before sharing."


def dataset_card(manifest: dict, dataset: str, report: dict | None = None) -> str:
    """README.md for an export folder: front matter the Hugging Face Hub reads, what the set is,
    how to load it, the recipe, the accuracy when it is known, and the source data's license."""
    prov = manifest["provenance"]
    r = manifest["recipe"]
    lines = [
        "---",
        "task_categories:",
        "- image-classification",
        "tags:",
        "- dataset-condensation",
        "- synthetic",
        "configs:",
        "- config_name: default",
        f"  data_files: {formats.EXPORT_PARQUET_DIR}/*.parquet",
        "---",
        "",
        f"# Condensed {dataset}: {manifest['num_images']} synthetic images",
        "",
        f"{len(manifest['classes'])} classes, {manifest['channels']} channel(s), "
        f"{manifest['resolution']} px, made with condense-pipeline "
        f"(method {prov.get('method')}, {prov.get('ipc')} stored images per class, "
        f"multi-formation factor {prov.get('factor')}).",
        "",
        "## Files and columns",
        "",
        f"- `{formats.EXPORT_PARQUET_DIR}/*.parquet`: `key`, `label` (a class label with names), "
        "`class_name`, `image` (PNG, 8 bit), `tensor` (the float32 image before rounding, "
        "normalised, flattened [C, H, W]).",
        f"- `{formats.EXPORT_WDS_DIR}/*.tar`: WebDataset shards, members `png`, `cls`, `json`.",
        f"- `{formats.MANIFEST}`: normalisation (mean {manifest['mean']}, std {manifest['std']}), "
        "classes, training recipe, provenance.",
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        f'files = "{formats.EXPORT_PARQUET_DIR}/*.parquet"',
        'ds = load_dataset("parquet", data_files=files)["train"]  # image: PIL, label: ClassLabel',
        "",
        "from condense_pipeline.evaluate import load_condensed  # a torch Dataset, normalised",
        "```",
        "",
        "## Training recipe",
        "",
        f"{r['model']}, SGD lr {r['lr']}, momentum {r['momentum']}, weight decay "
        f"{r['weight_decay']}, batch {r['batch_size']}, {r['epochs']} epochs, "
        f"lr {r['lr_schedule']}; "
        f"augmentation: {r['augment']} ({', '.join(r['augment_strategy'])}). "
        "Test on the real test split.",
        "",
        "## Accuracy",
        "",
    ]
    if report and report.get("condensed"):
        c, b = report["condensed"], report.get("random_real")
        line = (
            f"{report['model']}, {report['epochs']} epochs, {report['runs']} runs, on "
            f"{report['num_test']} real test images: condensed {c['mean']:.2f} ± {c['std']:.2f} %"
        )
        if b:
            line += f"; random real images, same IPC: {b['mean']:.2f} ± {b['std']:.2f} %"
        lines.append(line + ".")
    else:
        lines.append("Not evaluated yet (`condense-pipeline evaluate` fills this in).")
    lines += ["", "## Provenance", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(prov.items())]
    lines += ["", "## Source data and license", ""]
    lines.append(
        "The images derive from the source data, whose terms apply to them. For the data of the "
        f"`{dataset}` profile: {SOURCE_LICENSES.get(dataset, UNKNOWN_LICENSE)} (Data of your own "
        "condensed with this profile keeps its own terms.)"
    )
    return "\n".join(lines) + "\n"


def write_dataset_card(out_dir: str, dataset: str, report: dict | None = None) -> None:
    """(Re)write the export's README.md, e.g. once its evaluation report exists."""
    manifest = storage.read_json(storage.join(out_dir, formats.MANIFEST))
    card = dataset_card(manifest, dataset, report)
    storage.write_bytes(storage.join(out_dir, formats.DATASET_CARD), card.encode())


def _check_inputs(images: torch.Tensor, labels: torch.Tensor, class_names: list[str], profile):
    expected = (profile.channels, profile.resolution, profile.resolution)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"images have shape {tuple(images.shape)}, expected [n, *{expected}]")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected [{images.shape[0]}]")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must lie in [0, {len(class_names)}) to have a class name")


def export_condensed(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    profile: Profile,
    out_dir: str,
    *,
    provenance: dict,
    loss_log: list[dict] | None = None,
    probe_of_step=None,
    shard_size: int = 10000,
) -> dict:
    """Write a condensed set to `out_dir` (local or object store); returns a summary.

    images: [n, C, H, W] float32 in the profile's normalised space, already decoded (f^2 images per
    stored image when a multi-formation factor was used); labels: [n] int class indices into
    class_names. `provenance` (JSON values) goes into every sample's json and the manifest.
    `probe_of_step` maps a logged step to its probe, for the loss plot (plots.loss_png).
    """
    started = time.perf_counter()
    _check_inputs(images, labels, class_names, profile)
    # A rerun overwrites in place: drop the old marker first so a crash midway is not "done".
    storage.delete(storage.join(out_dir, storage.DONE))
    images = images.detach().to("cpu", torch.float32).contiguous()
    label_list = [int(y) for y in labels.tolist()]
    pixels = to_pixels(images, profile.mean, profile.std)
    keys = sample_keys(labels.cpu())
    pngs = [encode_png(p) for p in pixels]
    error = png_error(images, pixels, profile)

    wds = write_wds_shards(out_dir, keys, pngs, label_list, class_names, provenance, shard_size)
    parquet = write_parquet_shards(out_dir, keys, label_list, class_names, pngs, images, shard_size)
    storage.write_bytes(
        storage.join(out_dir, formats.PREVIEW_PNG), preview_png(pixels, label_list, class_names)
    )
    plot = plots.loss_png(loss_log, probe_of_step) if loss_log else None
    if plot is not None:
        storage.write_bytes(storage.join(out_dir, formats.LOSS_PNG), plot)

    manifest = {
        "format": formats.EXPORT_FORMAT,
        "num_images": len(label_list),
        "classes": list(class_names),
        "channels": profile.channels,
        "resolution": profile.resolution,
        "mean": list(profile.mean),
        "std": list(profile.std),
        "augment": list(profile.augment),
        "recipe": recipe(EvalConfig(epochs=profile.eval_epochs), profile.augment),
        "provenance": provenance,
        "shards": {"wds": wds, "parquet": parquet},
        **error,
    }
    storage.write_json(storage.join(out_dir, formats.MANIFEST), manifest)
    storage.write_bytes(
        storage.join(out_dir, formats.DATASET_CARD), dataset_card(manifest, profile.name).encode()
    )
    summary = {
        "out_dir": out_dir,
        "num_images": len(label_list),
        "wds_shards": len(wds),
        "parquet_files": len(parquet),
        "loss_plot": plot is not None,
        **error,
        "seconds": time.perf_counter() - started,
    }
    storage.mark_done(out_dir, summary)
    log.info(
        "exported %d images to %s (%d tar, %d parquet); PNG vs float max diff %.4f (%.2f/255)",
        len(label_list),
        out_dir,
        len(wds),
        len(parquet),
        error["float_vs_png_max_abs_diff"],
        error["float_vs_png_max_abs_diff_pixels"] * 255,
    )
    return summary
