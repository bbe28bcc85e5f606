"""prepare: every source kind, written as shards and read back exactly."""

import gzip
import hashlib
import json
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from condense_pipeline import storage
from condense_pipeline.datasets import get_profile
from condense_pipeline.errors import UserError
from condense_pipeline.formats import DATASET_FORMAT, DATASET_JSON, IMAGE, KEY, LABEL
from condense_pipeline.pipeline.read import iter_decoded, load_dataset_info
from condense_pipeline.prepare import folders, prepare_dataset, shards


def read_back(split_dir, name):
    """Decoded rows of a prepared split as {key: (image, label)}."""
    info = load_dataset_info(split_dir)
    profile = get_profile(name)
    rows = list(iter_decoded(storage.list_shards(split_dir), profile, len(info["classes"])))
    assert all(r["error"] == "" for r in rows), [r["error"] for r in rows if r["error"]]
    return {r[KEY]: (r[IMAGE], r[LABEL]) for r in rows}


def tar_members(split_dir):
    """{member name: bytes} over every shard of a split."""
    members = {}
    for shard in storage.list_shards(split_dir):
        with tarfile.open(shard) as tar:
            for m in tar:
                members[m.name] = tar.extractfile(m).read()
    return members


def smooth_image(rng, size=(40, 30), mode="RGB"):
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    return image.convert(mode)


def write_jpeg(path, rng, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    smooth_image(rng, **kw).save(path, format="JPEG", quality=90)


# --- digits: the built-in demo ---


def test_digits_round_trip_matches_sklearn_split(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    summary = prepare_dataset("digits", None, str(tmp_path), shard_size=500)
    assert summary["train"]["samples"] == 1337 and summary["train"]["shards"] == 3
    assert summary["test"]["samples"] == 360 and summary["test"]["shards"] == 1
    assert summary["validation"]["samples"] == 100  # the profile's 10 per class, held out

    digits = load_digits()
    x = np.round(digits.images * 255 / 16).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    held = read_back(str(tmp_path / "validation"), "digits")
    assert np.bincount([label for _, label in held.values()]).tolist() == [10] * 10
    for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        rows = read_back(str(tmp_path / split), "digits")
        if split == "train":
            assert not set(rows) & set(held)  # what the statistics see excludes validation
            rows.update(held)
        assert len(rows) == len(xs)
        for i in range(len(xs)):
            image, label = rows[f"{split}-{i:06d}"]
            np.testing.assert_array_equal(image[:, :, 0], xs[i])
            assert label == ys[i]
        info = load_dataset_info(str(tmp_path / split))
        assert info["format"] == DATASET_FORMAT and info["split"] == split
        assert info["classes"] == [str(i) for i in range(10)]
        held_out = 10 * (split == "train")
        assert info["counts"] == (np.bincount(ys, minlength=10) - held_out).tolist()
        assert info["channels"] == 1 and info["native_size"] == 8
        assert info["num_samples"] == sum(s["samples"] for s in info["shards"])
        assert info["num_samples"] == len(xs) - 10 * held_out


def test_digits_pixels_map_one_to_one():
    # 0..16 -> 0..255 must not merge two levels, or the demo loses information.
    levels = np.round(np.arange(17) * 255 / 16)
    assert len(set(levels)) == 17 and levels[0] == 0 and levels[-1] == 255


def test_shards_are_seeded_shuffled_and_reproducible(tmp_path):
    prepare_dataset("digits", None, str(tmp_path / "a"), split="test")
    prepare_dataset("digits", None, str(tmp_path / "b"), split="test")
    prepare_dataset("digits", None, str(tmp_path / "c"), split="test", seed=1)
    infos = [load_dataset_info(str(tmp_path / d / "test")) for d in "abc"]
    assert infos[0]["shards"] == infos[1]["shards"]  # byte-identical, same sha256
    assert infos[0]["shards"][0]["sha256"] != infos[2]["shards"][0]["sha256"]
    assert not (tmp_path / "a" / "train").exists()  # split= picks one split

    with tarfile.open(tmp_path / "a" / "test" / "test-000000.tar") as tar:
        names = tar.getnames()
    keys = [n.split(".")[0] for n in names[::2]]
    assert names[:2] == [f"{keys[0]}.png", f"{keys[0]}.cls"]
    assert keys != sorted(keys)  # shuffled
    digest = storage.read_bytes(str(tmp_path / "a" / "test" / "test-000000.tar"))
    assert hashlib.sha256(digest).hexdigest() == infos[0]["shards"][0]["sha256"]


def test_default_out_is_the_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDENSE_PIPELINE_DATA", str(tmp_path))
    summary = prepare_dataset("digits", None, None, split="test")
    assert summary["test"]["path"] == str(tmp_path / "digits" / "test")
    assert (tmp_path / "digits" / "test" / DATASET_JSON).exists()


# --- ImageFolder ---


def make_image_folder(root, rng, classes=("n03", "n01", "n02"), per_class=3):
    for c in classes:
        for i in range(per_class):
            write_jpeg(str(root / c / f"{c}_{i}.JPEG"), rng)
    return root


class _ReversedScandir:
    """os.scandir with its entries in reverse order: the file system's order must not matter."""

    def __init__(self, real, path):
        with real(path) as entries:
            self.entries = iter(list(entries)[::-1])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.entries)

    def close(self):
        pass


@pytest.mark.parametrize("reverse", [False, True])
def test_image_folder_classes_sorted_and_jpeg_kept_as_is(tmp_path, monkeypatch, reverse):
    rng = np.random.default_rng(0)
    root = make_image_folder(tmp_path / "src", rng)
    # PNG data inside a .JPEG file (ImageNet has one), and a real PNG.
    smooth_image(rng, size=(16, 16)).save(root / "n02" / "n02_png.JPEG", format="PNG")
    smooth_image(rng, size=(16, 16), mode="L").save(root / "n01" / "n01_gray.png")
    (root / "n01" / "notes.txt").write_text("not an image")
    if reverse:
        real = os.scandir
        monkeypatch.setattr(os, "scandir", lambda p=".": _ReversedScandir(real, p))

    out = tmp_path / "out"
    summary = prepare_dataset("imagenet", str(root), str(out))
    assert summary["train"]["samples"] == 11 and "test" not in summary
    info = load_dataset_info(str(out / "train"))
    assert info["classes"] == ["n01", "n02", "n03"]
    assert info["counts"] == [4, 4, 3]
    assert info["channels"] == 3 and info["native_size"] is None  # 40x30 and 16x16

    members = tar_members(str(out / "train"))
    original = (root / "n03" / "n03_1.JPEG").read_bytes()
    assert members["n03/n03_1.jpg"] == original  # never re-encoded
    assert members["n03/n03_1.cls"] == b"2"
    assert members["n02/n02_png.png"] == (root / "n02" / "n02_png.JPEG").read_bytes()
    assert members["n01/n01_gray.png"] == (root / "n01" / "n01_gray.png").read_bytes()
    assert not any("notes" in n for n in members)

    rows = read_back(str(out / "train"), "imagenet")
    assert rows["n01/n01_0"][1] == 0 and rows["n03/n03_2"][1] == 2
    assert rows["n01/n01_gray"][0].shape == (64, 64, 3)


def test_image_folder_native_size_when_all_images_match(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "src"
    for c in ("cat", "dog"):
        for i in range(2):
            path = root / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            smooth_image(rng, size=(32, 32)).save(path)
    prepare_dataset("cifar10", str(root), str(tmp_path / "out"), split="test")
    info = load_dataset_info(str(tmp_path / "out" / "test"))
    assert info["native_size"] == 32 and info["split"] == "test"
    # same stem in two classes: keys stay unique
    assert sorted(read_back(str(tmp_path / "out" / "test"), "cifar10")) == [
        "cat/0",
        "cat/1",
        "dog/0",
        "dog/1",
    ]


def test_split_folders_are_not_classes(tmp_path):
    for name in ("train", "val"):
        write_jpeg(str(tmp_path / name / "x" / "a.jpg"), np.random.default_rng(0))
    with pytest.raises(UserError, match="split folders"):
        prepare_dataset("imagenet", str(tmp_path), str(tmp_path / "out"))


# --- flat folder + labels file ---


def test_tinyimagenet_val_uses_train_class_order(tmp_path):
    rng = np.random.default_rng(2)
    out = tmp_path / "out"
    make_image_folder(tmp_path / "train", rng, classes=("n01", "n02", "n03"), per_class=1)
    prepare_dataset("tinyimagenet", str(tmp_path / "train"), str(out))

    val = tmp_path / "val"
    lines = []
    for i, synset in enumerate(["n03", "n01", "n03"]):
        write_jpeg(str(val / "images" / f"val_{i}.JPEG"), rng, size=(64, 64))
        lines.append(f"val_{i}.JPEG\t{synset}\t0\t0\t10\t10")
    (val / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    summary = prepare_dataset("tinyimagenet", str(val), str(out))
    assert summary["test"]["samples"] == 3
    info = load_dataset_info(str(out / "test"))
    # sorted labels of the file alone would be [n01, n03]: n03 must stay index 2
    assert info["classes"] == ["n01", "n02", "n03"] and info["counts"] == [1, 0, 2]
    assert info["native_size"] == 64
    rows = read_back(str(out / "test"), "tinyimagenet")
    assert {k: v[1] for k, v in rows.items()} == {
        "images/val_0": 2,
        "images/val_1": 0,
        "images/val_2": 2,
    }


def test_ilsvrc_val_solution_csv_passed_with_labels(tmp_path):
    rng = np.random.default_rng(3)
    val = tmp_path / "val"
    for i in range(1, 5):
        write_jpeg(str(val / f"ILSVRC2012_val_{i:08d}.JPEG"), rng)
    write_jpeg(str(val / "unlabelled.JPEG"), rng)
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000003,n09 1 2 3 4 n09 5 6 7 8\n"
        "ILSVRC2012_val_00000001,n02 1 2 3 4\n"
        "ILSVRC2012_val_00000004,n02 1 2 3 4\n"
        "ILSVRC2012_val_00000002,n05 1 2 3 4\n"
    )
    summary = prepare_dataset("imagenet", str(val), str(tmp_path / "out"), labels=str(csv))
    assert summary["test"]["samples"] == 4  # the unlabelled image is left out
    info = load_dataset_info(str(tmp_path / "out" / "test"))
    assert info["classes"] == ["n02", "n05", "n09"]
    labels = {k: v[1] for k, v in read_back(str(tmp_path / "out" / "test"), "imagenet").items()}
    assert labels == {
        "ILSVRC2012_val_00000001": 0,
        "ILSVRC2012_val_00000002": 1,
        "ILSVRC2012_val_00000003": 2,
        "ILSVRC2012_val_00000004": 0,
    }


def test_plain_labels_csv_with_numeric_labels(tmp_path):
    rng = np.random.default_rng(4)
    for i in range(3):
        smooth_image(rng, size=(28, 28), mode="L").save(tmp_path / f"img{i}.png")
    (tmp_path / "labels.csv").write_text("filename,label\nimg0.png,7\nimg1.png,0\nimg2,3\n")
    prepare_dataset("mnist", str(tmp_path), str(tmp_path / "out"), split="train")
    info = load_dataset_info(str(tmp_path / "out" / "train"))
    assert info["classes"] == [str(i) for i in range(8)]  # label value is the index
    labels = {k: v[1] for k, v in read_back(str(tmp_path / "out" / "train"), "mnist").items()}
    assert labels == {"img0": 7, "img1": 0, "img2": 3}


def test_labels_not_in_train_classes_are_refused(tmp_path):
    rng = np.random.default_rng(5)
    make_image_folder(tmp_path / "train", rng, classes=("a", "b"), per_class=1)
    prepare_dataset("imagenet", str(tmp_path / "train"), str(tmp_path / "out"))
    write_jpeg(str(tmp_path / "val" / "v1.jpg"), rng)
    (tmp_path / "val" / "labels.txt").write_text("v1.jpg zebra\n")
    with pytest.raises(UserError, match="zebra"):
        prepare_dataset("imagenet", str(tmp_path / "val"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "test").exists()


# --- array sources in their real file formats ---


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def test_fashion_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(6)
    x_train = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    y_train = rng.integers(0, 10, 7).astype(np.uint8)
    x_test = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    y_test = np.array([9, 0, 4], np.uint8)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte.gz", x_train)
    write_idx(raw / "train-labels-idx1-ubyte.gz", y_train)
    write_idx(raw / "t10k-images-idx3-ubyte", x_test)
    write_idx(raw / "t10k-labels-idx1-ubyte", y_test)

    out = tmp_path / "out"
    summary = prepare_dataset("fashion-mnist", str(tmp_path / "FashionMNIST"), str(out))
    # pointing at one of the files finds its folder
    one_file = str(raw / "t10k-images-idx3-ubyte")
    assert prepare_dataset("fashion-mnist", one_file, str(tmp_path / "o2"))["test"]["samples"] == 3
    assert summary["train"]["samples"] == 7 and summary["test"]["samples"] == 3
    assert load_dataset_info(str(out / "test"))["classes"][9] == "Ankle boot"
    for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        rows = read_back(str(out / split), "fashion-mnist")
        for i in range(len(xs)):
            np.testing.assert_array_equal(rows[f"{split}-{i:06d}"][0][:, :, 0], xs[i])
            assert rows[f"{split}-{i:06d}"][1] == ys[i]


def test_mnist_pickle_merges_train_and_valid(tmp_path):
    rng = np.random.default_rng(7)
    parts = []
    for n in (5, 3, 4):
        pixels = rng.integers(0, 256, (n, 784)).astype(np.uint8)
        pixels[0, :2] = (0, 255)
        parts.append((pixels, (pixels.astype(np.float32) / 256, rng.integers(0, 10, n))))
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(tuple(p[1] for p in parts), f)

    out = tmp_path / "out"
    summary = prepare_dataset("mnist", str(tmp_path), str(out))
    assert summary["train"]["samples"] == 8 and summary["test"]["samples"] == 4
    train = read_back(str(out / "train"), "mnist")
    merged = np.concatenate([parts[0][0], parts[1][0]]).reshape(-1, 28, 28)
    merged_y = np.concatenate([parts[0][1][1], parts[1][1][1]])
    for i in range(8):
        np.testing.assert_array_equal(train[f"train-{i:06d}"][0][:, :, 0], merged[i])
        assert train[f"train-{i:06d}"][1] == merged_y[i]
    test = read_back(str(out / "test"), "mnist")
    np.testing.assert_array_equal(test["test-000003"][0][:, :, 0], parts[2][0][3].reshape(28, 28))


def _cifar_batch(rng, n, label_key):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, n).tolist()
    # CIFAR's layout: each row holds the red plane, then green, then blue.
    rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)
    return images, labels, {b"data": rows, label_key: labels}


def _dump(path, value):
    with open(path, "wb") as f:
        pickle.dump(value, f)


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(8)
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    images, labels = [], []
    for i in range(1, 6):
        x, y, batch = _cifar_batch(rng, 2, b"labels")
        images.append(x)
        labels += y
        _dump(src / f"data_batch_{i}", batch)
    x_test, y_test, test = _cifar_batch(rng, 3, b"labels")
    _dump(src / "test_batch", test)
    _dump(src / "batches.meta", {b"label_names": [b"airplane", b"automobile", b"bird"]})

    out = tmp_path / "out"
    summary = prepare_dataset("cifar10", str(src), str(out), validation=0)  # every image back
    assert summary["train"]["samples"] == 10 and summary["test"]["samples"] == 3
    info = load_dataset_info(str(out / "train"))
    assert info["classes"] == ["airplane", "automobile", "bird"] and info["channels"] == 3
    train = read_back(str(out / "train"), "cifar10")
    x_train = np.concatenate(images)
    for i in range(10):
        np.testing.assert_array_equal(train[f"train-{i:06d}"][0], x_train[i])
        assert train[f"train-{i:06d}"][1] == labels[i]
    test = read_back(str(out / "test"), "cifar10")
    np.testing.assert_array_equal(test["test-000002"][0], x_test[2])


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(9)
    src = tmp_path / "cifar-100-python"
    src.mkdir()
    x, y, batch = _cifar_batch(rng, 4, b"fine_labels")
    _dump(src / "train", batch)
    _dump(src / "test", _cifar_batch(rng, 2, b"fine_labels")[2])
    _dump(src / "meta", {b"fine_label_names": [b"apple", b"bear", b"cup"]})
    out = tmp_path / "out"
    prepare_dataset("cifar100", str(src), str(out))
    assert load_dataset_info(str(out / "train"))["classes"] == ["apple", "bear", "cup"]
    train = read_back(str(out / "train"), "cifar100")
    np.testing.assert_array_equal(train["train-000001"][0], x[1])
    assert train["train-000003"][1] == y[3]


def test_npz_arrays(tmp_path):
    rng = np.random.default_rng(10)
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 1, 0])
    x_test = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y, x_test=x_test, y_test=np.array([4, 0]))
    out = tmp_path / "out"
    prepare_dataset("svhn", str(path), str(out))
    assert load_dataset_info(str(out / "train"))["classes"] == ["0", "1", "2", "3", "4"]
    train = read_back(str(out / "train"), "svhn")
    for i in range(5):
        np.testing.assert_array_equal(train[f"train-{i:06d}"][0], x[i])
    assert read_back(str(out / "test"), "svhn")["test-000000"][1] == 4


# --- refusals and failures ---


def test_bad_sources_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare_dataset("mnist", str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hello")
    with pytest.raises(UserError, match="cannot tell what"):
        prepare_dataset("mnist", str(tmp_path / "junk"), str(tmp_path / "out"))
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(UserError, match="extract it"):
        prepare_dataset("cifar10", str(tmp_path / "cifar-10-python.tar.gz"), str(tmp_path / "out"))
    with pytest.raises(UserError, match="no source given"):
        prepare_dataset("mnist", None, str(tmp_path / "out"))
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 4, 4), np.float32), y=np.zeros(2, int))
    with pytest.raises(UserError, match="uint8"):
        prepare_dataset("mnist", str(tmp_path / "f.npz"), str(tmp_path / "out"))
    with pytest.raises(UserError, match="unknown dataset"):
        prepare_dataset("nosuch", None, str(tmp_path / "out"))
    np.savez(tmp_path / "g.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.zeros(2, int))
    with pytest.raises(UserError, match="no test split"):
        prepare_dataset("mnist", str(tmp_path / "g.npz"), str(tmp_path / "out"), split="test")
    assert not (tmp_path / "out").exists()


def test_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare_dataset("digits", None, str(out), split="train", shard_size=300)  # 5 shards
    assert len(storage.list_shards(str(out / "train"))) == 5

    real = shards.encode_png
    calls = {"n": 0}

    def failing(image):
        calls["n"] += 1
        if calls["n"] == 900:  # in the middle of the third shard
            raise RuntimeError("disk on fire")
        return real(image)

    monkeypatch.setattr(shards, "encode_png", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare_dataset("digits", None, str(out), split="train", shard_size=400)
    # The old dataset.json is gone (readers refuse the split) and no temporary file is left.
    with pytest.raises(UserError, match="prepare"):
        load_dataset_info(str(out / "train"))
    left = os.listdir(out / "train")
    assert not [n for n in left if ".tmp" in n]
    # The shards this run finished before failing are removed again.
    assert "train-000000.tar" not in left and "train-000001.tar" not in left

    monkeypatch.setattr(shards, "encode_png", real)
    prepare_dataset("digits", None, str(out), split="train", shard_size=1000)
    # A rerun with fewer, larger shards removes the earlier run's leftovers.
    assert sorted(os.listdir(out / "train")) == [
        DATASET_JSON,
        "train-000000.tar",
        "train-000001.tar",
    ]
    assert json.loads((out / "train" / DATASET_JSON).read_text())["num_samples"] == 1337


# --- Ray tasks ---


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():  # another module's Ray: use it, leave it running
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_tasks_write_the_same_shards(tmp_path, ray_local, monkeypatch):
    rng = np.random.default_rng(11)
    root = make_image_folder(tmp_path / "src", rng, per_class=6)
    # Reference: the same shards written in this process.
    data = folders.load_image_folder(str(root), split="train", out=str(tmp_path / "ref"))
    expected = [shards.write_shard(job) for job in shards.plan_shards(data, str(tmp_path), 4, 0)]

    def no_local(*args):
        raise AssertionError("with use_ray=True, shards must be written by Ray tasks")

    monkeypatch.setattr(shards, "_run_local", no_local)
    summary = prepare_dataset(
        "imagenet", str(root), str(tmp_path / "out"), shard_size=4, validation=0, use_ray=True
    )
    assert summary["train"] == {"samples": 18, "shards": 5, "path": str(tmp_path / "out/train")}
    info = load_dataset_info(str(tmp_path / "out" / "train"))
    assert [s["sha256"] for s in info["shards"]] == [r["sha256"] for r in expected]
    assert len(read_back(str(tmp_path / "out" / "train"), "imagenet")) == 18
