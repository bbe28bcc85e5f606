"""Reading shards: only image and label members, bad samples counted, never a failed run."""

import io
import pickle
import struct
import tarfile
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from condense_pipeline import storage
from condense_pipeline.datasets import get_profile
from condense_pipeline.errors import UserError
from condense_pipeline.formats import DATASET_JSON, ERROR, IMAGE, KEY, LABEL, SHARD
from condense_pipeline.pipeline.read import (
    UNUSED,
    ReadSummary,
    check_raw,
    check_rejects,
    decode_image,
    decode_row,
    iter_decoded,
    iter_shard,
    load_dataset_info,
    read_images,
    summarize,
    summarize_dataset,
)

CIFAR = get_profile("cifar10")  # 32 px RGB
IMAGENET = get_profile("imagenet")  # 64 px RGB, any size in
MNIST = get_profile("mnist")  # 28 px L


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def encode(image, fmt="PNG", **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(size=(32, 32), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(
        mode
    )


def png_header(width, height):
    """A PNG that only claims a size: opening it is enough to trip the bomb check."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def trap(marker):
    """Pickle bytes that create `marker` when unpickled (as torch.load would too)."""

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Trap())


# --- iter_shard ---


def test_iter_shard_reads_only_image_and_label(tmp_path):
    markers = [tmp_path / f"unpickled-{i}" for i in range(3)]
    png, jpeg = encode(noise()), encode(noise(seed=1), "JPEG")
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("s0.jpg", jpeg),
            ("s0.cls", b"3"),
            ("s0.json", b'{"not": "read"}'),
            ("s0.pickle", trap(markers[0])),
            ("README", b"no suffix: not a sample"),
            ("s1.png", png),
            ("s1.cls", b" 1\n"),
            ("s1.pt", trap(markers[1])),
            ("dir/s2.seg.png", png),  # suffix "seg.png": not the image
            ("dir/s2.JPEG", jpeg),
            ("dir/s2.cls", b"0"),
            ("dir/s2.pkl", trap(markers[2])),
        ],
    )
    rows = list(iter_shard(shard))
    assert [r[KEY] for r in rows] == ["s0", "s1", "dir/s2"]
    assert [r["data"] for r in rows] == [jpeg, png, jpeg]
    assert [r["label_text"] for r in rows] == ["3", " 1\n", "0"]
    assert all(r[SHARD] == shard and r[ERROR] == "" for r in rows)
    decoded = list(iter_decoded([shard], CIFAR, 10))
    assert [r[LABEL] for r in decoded] == [3, 1, 0] and all(r[ERROR] == "" for r in decoded)
    assert not any(m.exists() for m in markers)


def test_truncated_tar_keeps_samples_before_the_damage(tmp_path):
    members = []
    for i in range(5):
        members += [(f"k{i}.png", encode(noise(seed=i))), (f"k{i}.cls", b"1")]
    full = open(write_tar(tmp_path / "full.tar", members), "rb").read()
    with tarfile.open(tmp_path / "full.tar") as tar:
        cut = tar.getmember("k3.png").offset_data + 100  # inside the fourth image
    (tmp_path / "cut.tar").write_bytes(full[:cut])
    rows = list(iter_shard(str(tmp_path / "cut.tar")))
    assert [r[KEY] for r in rows[:3]] == ["k0", "k1", "k2"]
    assert all(r[ERROR] == "" for r in rows[:3])
    assert len(rows) == 4 and rows[3][KEY] == f"{tmp_path / 'cut.tar'}#truncated"
    assert rows[3][ERROR].startswith("truncated tar:")

    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
    assert [r[ERROR].split(":")[0] for r in iter_shard(str(tmp_path / "junk.tar"))] == [
        "truncated tar"
    ]


def test_huge_members_are_not_read(tmp_path, monkeypatch):
    from condense_pipeline.pipeline import read

    monkeypatch.setattr(read, "MAX_IMAGE_BYTES", 5000)
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("big.png", b"\x00" * 5001),
            ("big.cls", b"1"),
            ("ok.png", encode(noise())),
            ("ok.cls", b"1"),
        ],
    )
    rows = list(iter_decoded([shard], CIFAR, 10))
    assert [r[ERROR].split(":")[0] for r in rows] == ["oversized image", ""]


# --- decode_image ---


def test_modes_are_converted_to_the_profile_channels():
    gray = Image.new("L", (40, 30), 77)
    cmyk = Image.new("CMYK", (40, 30), (0, 0, 0, 0))  # white
    palette = Image.new("RGB", (40, 30), (200, 10, 30)).quantize(4)
    rgba = Image.new("RGBA", (40, 30), (5, 6, 7, 128))
    out = {
        "gray": decode_image(encode(gray, "JPEG"), IMAGENET),
        "cmyk": decode_image(encode(cmyk, "JPEG"), IMAGENET),
        "palette": decode_image(encode(palette), IMAGENET),
        "rgba": decode_image(encode(rgba), IMAGENET),
    }
    assert all(a.shape == (64, 64, 3) and a.dtype == np.uint8 for a in out.values())
    assert np.abs(out["gray"].astype(int) - 77).max() <= 2
    assert out["cmyk"].min() >= 250
    assert (out["palette"] == (200, 10, 30)).all()
    assert (out["rgba"] == (5, 6, 7)).all()
    small = decode_image(encode(Image.new("RGB", (40, 30), (255, 0, 0))), MNIST)
    assert small.shape == (28, 28, 1) and abs(int(small[0, 0, 0]) - 76) <= 1  # ITU-R 601 luma


def test_png_inside_a_jpg_member_is_decoded(tmp_path):
    shard = write_tar(
        tmp_path / "s.tar",
        [("a.jpg", encode(Image.new("RGB", (32, 32), (1, 2, 3)))), ("a.cls", b"0")],
    )
    (row,) = iter_decoded([shard], CIFAR, 10)
    assert row[ERROR] == "" and (row[IMAGE] == (1, 2, 3)).all()


def test_resize_squashes_the_whole_image_without_crop():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :40] = (255, 0, 0)
    image[:, 40:] = (0, 0, 255)
    out = decode_image(encode(Image.fromarray(image)), IMAGENET)
    assert (out[:, :32] == (255, 0, 0)).all() and (out[:, 32:] == (0, 0, 255)).all()
    # at the target size already: untouched
    exact = np.asarray(noise((64, 64)))
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(exact)), IMAGENET), exact)


def test_jpeg_draft_stays_close_to_a_full_decode():
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    big = encode(small.resize((1024, 768), Image.Resampling.BICUBIC), "JPEG", quality=90)
    full = Image.open(io.BytesIO(big)).convert("RGB").resize((64, 64), Image.Resampling.BOX)
    diff = np.abs(decode_image(big, IMAGENET).astype(int) - np.asarray(full).astype(int))
    # DCT-domain scaling to 128x96 then a box, against a box from 1024x768: about 2.4 levels.
    assert diff.mean() < 3 and np.median(diff) <= 2


def test_oversized_images_are_rejected():
    with pytest.raises(ValueError, match="^oversized image"):
        decode_image(png_header(20000, 20000), IMAGENET)  # PIL's bomb limit
    with pytest.raises(ValueError, match="^oversized image: 40x30"):
        decode_image(encode(noise((40, 30))), IMAGENET, max_pixels=1000)
    with pytest.raises(ValueError, match="^undecodable image"):
        decode_image(encode(noise(), "JPEG")[:300], IMAGENET)


# --- decode_row ---


def raw(data=b"", label_text="1", error=""):
    return {KEY: "k", "data": data, "label_text": label_text, SHARD: "s.tar", ERROR: error}


GOOD_PNG = encode(noise())


@pytest.mark.parametrize(
    "row, kind",
    [
        (raw(GOOD_PNG, "1"), ""),
        (raw(GOOD_PNG, "9"), ""),
        (raw(b"\xff\xd8\xff garbage", "1"), "undecodable image"),
        (raw(None, "1"), "missing image"),
        (raw(GOOD_PNG, None), "missing label"),
        (raw(GOOD_PNG, "cat"), "bad label"),
        (raw(GOOD_PNG, "10"), "label out of range"),
        (raw(GOOD_PNG, "-1"), "label out of range"),
        (raw(png_header(20000, 20000), "1"), "oversized image"),
        (raw(None, None, "truncated tar: unexpected end of data"), "truncated tar"),
    ],
)
def test_decode_row_rejections(row, kind):
    out = decode_row(row, CIFAR, 10)
    assert out[ERROR].split(":")[0] == kind
    assert out[KEY] == "k" and out[SHARD] == "s.tar" and out[IMAGE].shape == (32, 32, 3)
    if kind:
        assert out[LABEL] == -1 and not out[IMAGE].any()
    else:
        assert out[LABEL] == int(row["label_text"])


# --- a shard set with every kind of bad input ---

EXPECTED_REJECTS = {
    "undecodable image": 1,
    "missing label": 1,
    "missing image": 1,
    "bad label": 1,
    "label out of range": 1,
    "oversized image": 1,
    "multiple images": 1,
    "truncated tar": 1,
}


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """good.tar: 20 good samples; bad.tar: 3 good, one of each reject, truncated at the end."""
    root = tmp_path_factory.mktemp("shards")
    markers = [root / "unpickled-good", root / "unpickled-bad"]
    good = []
    for i in range(20):
        good += [(f"g{i:02d}.png", encode(noise(seed=i))), (f"g{i:02d}.cls", str(i % 10).encode())]
    good.append(("g19.pickle", trap(markers[0])))
    bad = [(f"b{i}.png", encode(noise(seed=100 + i))) for i in range(3)]
    bad = [m for i, b in enumerate(bad) for m in (b, (f"b{i}.cls", b"4"))]
    bad += [
        ("corrupt.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"),
        ("corrupt.cls", b"1"),
        ("nolabel.png", encode(noise())),
        ("noimage.cls", b"1"),
        ("noimage.pt", trap(markers[1])),
        ("badlabel.png", encode(noise())),
        ("badlabel.cls", b"one"),
        ("range.png", encode(noise())),
        ("range.cls", b"10"),
        ("bomb.png", png_header(20000, 20000)),
        ("bomb.cls", b"2"),
        ("two.png", encode(noise())),
        ("two.jpg", encode(noise(), "JPEG")),
        ("two.cls", b"2"),
        ("last.png", encode(noise((256, 256), seed=7))),
        ("last.cls", b"3"),
    ]
    good_path = write_tar(root / "good.tar", good)
    bad_path = write_tar(root / "bad.tar", bad)
    with tarfile.open(bad_path) as tar:
        cut = tar.getmember("last.png").offset_data + 50
    data = open(bad_path, "rb").read()[:cut]
    with open(bad_path, "wb") as f:
        f.write(data)
    empty_path = write_tar(root / "empty.tar", [])  # no samples: an empty block for Ray
    return {"shards": [good_path, bad_path, empty_path], "markers": markers}


def test_bad_samples_are_skipped_and_counted(shard_set):
    good_path, bad_path, _ = shard_set["shards"]
    rows = list(iter_decoded(shard_set["shards"], CIFAR, 10))
    summary = summarize(rows)
    assert summary.good == 23 and summary.total == 31
    assert summary.rejected == {bad_path: EXPECTED_REJECTS}
    assert summary.by_class[4] == 2 + 3 and sum(summary.by_class.values()) == 23
    assert [r[KEY] for r in rows if r[ERROR] == ""][-3:] == ["b0", "b1", "b2"]
    assert not any(m.exists() for m in shard_set["markers"])

    # Summaries add: per-shard parts equal one pass over everything.
    parts = [summarize(iter_decoded([s], CIFAR, 10)) for s in shard_set["shards"]]
    assert parts[0] + parts[1] + parts[2] == summary
    assert sum(parts, ReadSummary()) == summary


def test_reject_threshold(shard_set):
    summary = summarize(iter_decoded(shard_set["shards"], CIFAR, 10))
    with pytest.raises(UserError, match=r"8 of 31 samples \(25.81%\) were rejected.*1% threshold"):
        check_rejects(summary, 0.01)
    check_rejects(summary, 0.3)
    check_rejects(ReadSummary(good=1000, rejected={"s": {"missing label": 10}}), 0.01)
    with pytest.raises(UserError, match="11 of 1011"):
        check_rejects(ReadSummary(good=1000, rejected={"s": {"missing label": 11}}), 0.01)
    with pytest.raises(UserError, match="no samples"):
        check_rejects(ReadSummary(), 0.01)
    with pytest.raises(UserError, match="all 3 samples were rejected"):
        check_rejects(ReadSummary(rejected={"s": {"truncated tar": 3}}), 1.0)


def test_wrong_paths_and_empty_shard_sets(tmp_path):
    with pytest.raises(UserError, match="empty"):
        list(iter_decoded([], CIFAR, 10))
    with pytest.raises(UserError, match="empty"):
        read_images([], CIFAR, 10)
    with pytest.raises(UserError, match="does not exist"):
        list(iter_shard(str(tmp_path / "missing.tar")))
    with pytest.raises(UserError, match="condense-pipeline prepare"):
        load_dataset_info(str(tmp_path))


def test_load_dataset_info_from_folder_or_pattern(tmp_path):
    storage.write_json(str(tmp_path / DATASET_JSON), {"format": 1, "classes": ["a"]})
    write_tar(tmp_path / "train-000000.tar", [])
    for spec in (str(tmp_path), str(tmp_path / "train-{000000..000000}.tar"), f"{tmp_path}/*.tar"):
        assert load_dataset_info(spec)["classes"] == ["a"]
    storage.write_json(str(tmp_path / DATASET_JSON), {"format": 99})
    with pytest.raises(UserError, match="format 99"):
        load_dataset_info(str(tmp_path))


# --- the Ray Data path ---


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():  # another module's Ray: use it, leave it running
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_read_matches_the_plain_reader(shard_set, ray_local):
    ds = read_images(shard_set["shards"], CIFAR, 10)
    summary = summarize_dataset(ds)
    assert summary == summarize(iter_decoded(shard_set["shards"], CIFAR, 10))
    assert summary.rejected[shard_set["shards"][1]] == EXPECTED_REJECTS

    rows = {r[KEY]: r for r in ds.take_all()}
    plain = {r[KEY]: r for r in iter_decoded(shard_set["shards"], CIFAR, 10)}
    assert rows.keys() == plain.keys()
    for key, row in plain.items():
        assert rows[key][ERROR] == row[ERROR] and rows[key][LABEL] == row[LABEL]
        np.testing.assert_array_equal(rows[key][IMAGE], row[IMAGE])
    assert rows["g00"][IMAGE].dtype == np.uint8 and rows["g00"][IMAGE].shape == (32, 32, 3)
    assert not any(m.exists() for m in shard_set["markers"])


def test_ray_read_leaves_unwanted_samples_undecoded(shard_set, ray_local):
    ds = read_images(shard_set["shards"], CIFAR, 10, wanted=lambda keys, labels: labels % 2 == 0)
    rows = {r[KEY]: r for r in ds.take_all()}
    plain = {r[KEY]: r for r in iter_decoded(shard_set["shards"], CIFAR, 10)}
    assert rows.keys() == plain.keys()
    raws = [raw for shard in shard_set["shards"] for raw in iter_shard(shard)]
    unused = 0
    for raw in raws:
        got, row, label = rows[raw[KEY]], plain[raw[KEY]], check_raw(raw, 10)
        if isinstance(label, int) and label % 2:  # not wanted: not decoded, so not checked
            assert got[ERROR] == UNUSED and got[LABEL] == label and not got[IMAGE].any()
            unused += 1
        else:  # rejects found before decoding, and wanted samples: as without `wanted`
            assert got[ERROR] == row[ERROR] and got[LABEL] == row[LABEL]
            np.testing.assert_array_equal(got[IMAGE], row[IMAGE])
    assert unused > 0


def test_ray_read_of_prepared_digits(tmp_path, ray_local):
    from condense_pipeline.prepare import prepare_dataset

    prepare_dataset("digits", None, str(tmp_path), split="train", shard_size=300)
    info = load_dataset_info(str(tmp_path / "train"))
    ds = read_images(storage.list_shards(str(tmp_path / "train")), get_profile("digits"), 10)
    summary = summarize_dataset(ds)
    check_rejects(summary)
    assert summary.good == 1337 and summary.rejected == {}  # 1437 less the validation split
    assert [summary.by_class[c] for c in range(10)] == info["counts"]


def _executor_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("StreamingExecutor")]


def test_a_stopped_unit_reader_leaves_no_ray_data_thread(tmp_path, ray_local):
    """Bug caught: Ray Data's threads went on calling Ray after a unit's reader was stopped, and
    one that did so after the CLI's ray.shutdown ended a stopped `stats` with exit code 1 (and a
    core-worker error line) instead of 130."""
    from condense_pipeline.pipeline.dispatch import Readers
    from condense_pipeline.prepare import prepare_dataset

    prepare_dataset("digits", None, str(tmp_path), split="train", shard_size=50)
    shards = storage.list_shards(str(tmp_path / "train"))
    readers = Readers([shards], get_profile("digits"), None, depth=1)
    assert readers.blocks(0).get(timeout=300) is not None  # reading has started, more is to come
    readers.stop()
    assert _executor_threads() == []


def test_a_closed_pilot_read_leaves_no_ray_data_thread(tmp_path, ray_local):
    """As for the unit reader: the M3D bandwidth pilot reads on a thread too, and a stats pass
    stopped during the pilot must not leave Ray Data running into the CLI's ray.shutdown."""
    from condense_pipeline.pipeline.pilot import _candidates
    from condense_pipeline.prepare import prepare_dataset

    prepare_dataset("digits", None, str(tmp_path), split="train", shard_size=50)
    shards = storage.list_shards(str(tmp_path / "train"))
    everything = np.full(10, np.iinfo(np.uint64).max, dtype=np.uint64)
    candidates = _candidates(shards, get_profile("digits"), everything, 0, timeout=300)
    next(candidates)  # reading has started, more is to come
    candidates.close()
    assert _executor_threads() == []


def test_a_stopped_command_closes_its_ray_data_iterators_before_ray_shutdown(
    tmp_path, ray_local, monkeypatch
):
    """A stage stopped while it iterates a Ray Data dataset on the main thread (evaluate reading
    its test split) still holds the iterator in the exception's frames; the CLI lets them go
    before ray.shutdown, or Ray Data's threads call into a Ray that is gone."""
    import ray

    from condense_pipeline.cli import app
    from condense_pipeline.errors import Stopped
    from condense_pipeline.prepare import prepare_dataset

    prepare_dataset("digits", None, str(tmp_path), split="train", shard_size=50)
    shards = storage.list_shards(str(tmp_path / "train"))

    def stage(**_):
        batches = iter(read_images(shards, get_profile("digits"), 10).iter_batches())
        next(batches)
        raise Stopped("a stage")

    at_shutdown = []
    monkeypatch.setattr(app, "cli", lambda: stage)
    monkeypatch.setattr(ray, "shutdown", lambda: at_shutdown.append(_executor_threads()))
    with pytest.raises(SystemExit) as stopped:
        app.main()
    assert stopped.value.code == 130 and at_shutdown == [[]]
