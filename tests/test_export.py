import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from condense_pipeline import formats, storage
from condense_pipeline.datasets import get_profile
from condense_pipeline.pipeline.export import export_condensed, sample_keys

CLASSES = ["zero", "one", "two"]


def normalised(pixels: torch.Tensor, profile) -> torch.Tensor:
    mean = torch.tensor(profile.mean).view(1, -1, 1, 1)
    std = torch.tensor(profile.std).view(1, -1, 1, 1)
    return (pixels - mean) / std


def condensed_set(profile, per_class: int = 3, seed: int = 0):
    """Images whose pixels lie in [0, 1] (so no clamping), normalised; labels 0,0,0,1,1,1,2,2,2."""
    g = torch.Generator().manual_seed(seed)
    n = per_class * len(CLASSES)
    res = profile.resolution
    pixels = torch.rand(n, profile.channels, res, res, generator=g)
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    return normalised(pixels, profile), labels, pixels


def export(tmp_path, profile, images, labels, **kw):
    out = str(tmp_path / "export")
    kw.setdefault("provenance", {"method": "dm", "ipc": 3})
    return out, export_condensed(images, labels, CLASSES, profile, out, **kw)


@pytest.mark.parametrize("name", ["digits", "cifar10"])
def test_webdataset_round_trip(tmp_path, name):
    profile = get_profile(name)
    images, labels, pixels = condensed_set(profile)
    out, summary = export(tmp_path, profile, images, labels, shard_size=4)

    tars = [storage.join(out, "wds", n) for n in storage.list_dir(storage.join(out, "wds"))]
    assert [t.rsplit("/", 1)[1] for t in tars] == [
        "condensed-000000.tar",
        "condensed-000001.tar",
        "condensed-000002.tar",
    ]
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert [s["__key__"] for s in samples] == sample_keys(labels)
    assert [int(s["cls"]) for s in samples] == labels.tolist()
    mode = "L" if profile.channels == 1 else "RGB"
    for i, s in enumerate(samples):
        image = Image.open(io.BytesIO(s["png"]))
        assert image.mode == mode
        stored = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
        stored = stored.view(profile.resolution, profile.resolution, -1).permute(2, 0, 1)
        # Rounding to 8 bits moves a pixel by at most half a level.
        assert (stored - pixels[i]).abs().max() <= 0.5 / 255 + 1e-6
        meta = json.loads(s["json"])
        assert meta == {
            "class_name": CLASSES[labels[i]],
            "label": int(labels[i]),
            "index": i,
            "method": "dm",
            "ipc": 3,
        }
    assert summary["float_vs_png_max_abs_diff_pixels"] <= 0.5 / 255 + 1e-6
    assert summary["clamped_fraction"] == 0


def test_parquet_schema_and_round_trip(tmp_path):
    profile = get_profile("cifar10")
    images, labels, pixels = condensed_set(profile)
    out, _ = export(tmp_path, profile, images, labels, shard_size=4)

    folder = storage.join(out, "parquet")
    files = storage.list_dir(folder)
    assert files == [f"condensed-00000{i}.parquet" for i in range(3)]
    table = pa.concat_tables([pq.read_table(storage.join(folder, f)) for f in files])
    schema = table.schema
    assert schema.names == list(formats.PARQUET_COLUMNS)
    assert schema.types == [
        pa.string(),
        pa.int64(),
        pa.string(),
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        pa.list_(pa.float32()),
    ]
    assert json.loads(schema.metadata[b"tensor_shape"]) == [3, 32, 32]
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["label"] == {"names": CLASSES, "_type": "ClassLabel"}
    assert features["image"] == {"_type": "Image"}

    rows = table.to_pydict()
    assert rows["key"] == sample_keys(labels)
    assert rows["label"] == labels.tolist()
    assert rows["class_name"] == [CLASSES[y] for y in labels]
    tensors = torch.tensor(rows["tensor"]).view(-1, 3, 32, 32)
    assert torch.equal(tensors, images)  # the floats are kept exactly
    assert [image["path"] for image in rows["image"]] == [f"{k}.png" for k in rows["key"]]
    for i, png in enumerate(image["bytes"] for image in rows["image"]):
        stored = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32) / 255)
        assert (stored.permute(2, 0, 1) - pixels[i]).abs().max() <= 0.5 / 255 + 1e-6


def test_manifest_preview_and_loss_plot(tmp_path):
    profile = get_profile("digits")
    images, labels, _ = condensed_set(profile)
    log = [{"step": s, "loss": 2.0 / (s + 1), "seconds": 0.1 * s} for s in range(50)]
    log += [{"step": s, "loss": 1.0 / (s + 1), "seconds": 0.1 * s, "group": "b"} for s in range(50)]
    out, summary = export(tmp_path, profile, images, labels, loss_log=log)

    manifest = storage.read_json(storage.join(out, formats.MANIFEST))
    assert manifest["format"] == formats.EXPORT_FORMAT
    assert manifest["num_images"] == 9
    assert manifest["classes"] == CLASSES
    assert (manifest["channels"], manifest["resolution"]) == (1, 8)
    assert manifest["mean"] == list(profile.mean) and manifest["std"] == list(profile.std)
    assert manifest["augment"] == list(profile.augment)
    assert manifest["provenance"] == {"method": "dm", "ipc": 3}
    recipe = manifest["recipe"]
    assert (recipe["model"], recipe["optimizer"], recipe["lr"]) == ("convnet", "sgd", 0.01)
    assert (recipe["momentum"], recipe["weight_decay"], recipe["batch_size"]) == (0.9, 5e-4, 256)
    assert recipe["epochs"] == profile.eval_epochs
    # Rounding to 8 bits costs at most half a level, divided by std in normalised units.
    assert manifest["float_vs_png_max_abs_diff"] <= 0.5 / 255 / profile.std[0] + 1e-6
    assert summary["num_images"] == 9 and summary["loss_plot"]

    preview = Image.open(storage.join(out, formats.PREVIEW_PNG))
    # One row per class; 8 px digits are blown up to cells of at least 32 px.
    assert preview.height >= len(CLASSES) * 32
    assert Image.open(storage.join(out, formats.LOSS_PNG)).size == (640, 400)
    card = open(storage.join(out, formats.DATASET_CARD)).read()
    assert "# Condensed digits: 9 synthetic images" in card
    assert "CC BY 4.0" in card and "Not evaluated yet" in card


def test_clamping_is_reported(tmp_path):
    profile = get_profile("digits")
    images, labels, _ = condensed_set(profile)
    images[0, 0, 0, 0] = 10.0  # far above white, as unclamped DM images can be
    _, summary = export(tmp_path, profile, images, labels)
    assert summary["float_vs_png_max_abs_diff_pixels"] > 1.0
    assert summary["clamped_fraction"] == pytest.approx(1 / images.numel())


def test_marker_is_written_last(tmp_path, monkeypatch):
    written = []
    original = storage.write_bytes

    def recording(location, data):
        written.append(location.rsplit("/", 1)[1])
        original(location, data)

    monkeypatch.setattr(storage, "write_bytes", recording)
    profile = get_profile("digits")
    images, labels, _ = condensed_set(profile)
    export(tmp_path, profile, images, labels, shard_size=4, loss_log=[{"step": 0, "loss": 1.0}])
    assert written[-1] == storage.DONE
    assert written.count(storage.DONE) == 1
    assert {"manifest.json", "preview.png", "loss.png", "condensed-000002.tar"} <= set(written)


def test_no_loss_log_no_plot(tmp_path):
    profile = get_profile("digits")
    images, labels, _ = condensed_set(profile)
    out, summary = export(tmp_path, profile, images, labels)
    assert not summary["loss_plot"]
    assert not storage.exists(storage.join(out, formats.LOSS_PNG))
    assert storage.is_done(out)
