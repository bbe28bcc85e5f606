"""Sources held as arrays: MNIST idx files, mnist.pkl.gz, CIFAR python batches, .npz, digits.

MNIST's pickle and CIFAR's batches are pickles by their publishers' choice. They are loaded only
here, from a file the user points `prepare` at as its source; nothing read from a shard is ever
unpickled (DESIGN.md section 10).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np

from condense_pipeline.errors import UserError
from condense_pipeline.formats import TEST, TRAIN
from condense_pipeline.prepare.sources import SplitData, from_arrays

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
DIGIT_CLASSES = [str(i) for i in range(10)]

IDX_FILES = {
    TRAIN: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    TEST: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_PICKLE = "mnist.pkl.gz"


def load(path: str, name: str) -> list[SplitData] | None:
    """The splits of an array source at `path`, or None if it is not one."""
    if os.path.isfile(path):
        if path.endswith(".npz"):
            return load_npz(path)
        if path.endswith(".pkl.gz"):
            return load_mnist_pickle(path)
        if os.path.basename(path).split(".")[0] in {n for pair in IDX_FILES.values() for n in pair}:
            return load_idx(os.path.dirname(path), name)  # one idx file: take its folder
        return None
    for folder in (path, os.path.join(path, "raw")):  # torchvision keeps idx files in raw/
        if _find(folder, IDX_FILES[TRAIN][0]) or _find(folder, IDX_FILES[TEST][0]):
            return load_idx(folder, name)
    if os.path.isfile(os.path.join(path, MNIST_PICKLE)):
        return load_mnist_pickle(os.path.join(path, MNIST_PICKLE))
    if os.path.isfile(os.path.join(path, "data_batch_1")):
        return load_cifar10(path)
    if os.path.isfile(os.path.join(path, "train")) and os.path.isfile(os.path.join(path, "meta")):
        return load_cifar100(path)
    return None


def _find(folder: str, stem: str) -> str | None:
    for candidate in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return None


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
    """An idx file (MNIST's format): big-endian magic, dimension sizes, then uint8 data."""
    with _open(path) as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise UserError(f"{path} is not a uint8 idx file; re-download it")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated; re-download it")
    return array.reshape(shape)


def load_idx(folder: str, name: str) -> list[SplitData]:
    classes = FASHION_CLASSES if name == "fashion-mnist" else DIGIT_CLASSES
    splits = []
    for split, (images, labels) in IDX_FILES.items():
        image_path, label_path = _find(folder, images), _find(folder, labels)
        if image_path is None:
            continue
        if label_path is None:
            raise UserError(f"{image_path} has no labels file {labels}[.gz] beside it")
        splits.append(from_arrays(split, read_idx(image_path), read_idx(label_path), classes))
    return splits


def load_mnist_pickle(path: str) -> list[SplitData]:
    """mnist.pkl.gz: ((x, y) train 50k, valid 10k, test 10k); x float = uint8 / 256 exactly."""
    try:
        with gzip.open(path, "rb") as f:
            train, valid, test = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, ValueError, EOFError) as e:
        raise UserError(f"{path} is not the mnist.pkl.gz layout ({e}); re-download it") from None

    def pixels(x: np.ndarray) -> np.ndarray:
        # x * 256 is exact for k / 256 in float32, so rounding recovers the original byte.
        return np.round(np.asarray(x) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)

    x_train = np.concatenate([pixels(train[0]), pixels(valid[0])])
    y_train = np.concatenate([train[1], valid[1]]).astype(np.int64)
    return [
        from_arrays(TRAIN, x_train, y_train, DIGIT_CLASSES),
        from_arrays(TEST, pixels(test[0]), np.asarray(test[1]).astype(np.int64), DIGIT_CLASSES),
    ]


def _unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_images(batch: dict) -> np.ndarray:
    # Rows are 3072 bytes: the red plane, then green, then blue, each 32x32 row-major.
    return np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def load_cifar10(folder: str) -> list[SplitData]:
    meta = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta):
        classes = [c.decode() for c in _unpickle(meta)[b"label_names"]]
    else:
        classes = None
    batches = [_unpickle(os.path.join(folder, f"data_batch_{i}")) for i in range(1, 6)]
    x = np.concatenate([_cifar_images(b) for b in batches])
    y = np.concatenate([np.asarray(b[b"labels"], np.int64) for b in batches])
    splits = [from_arrays(TRAIN, x, y, classes)]
    test_path = os.path.join(folder, "test_batch")
    if os.path.isfile(test_path):
        test = _unpickle(test_path)
        y_test = np.asarray(test[b"labels"], np.int64)
        splits.append(from_arrays(TEST, _cifar_images(test), y_test, classes))
    return splits


def load_cifar100(folder: str) -> list[SplitData]:
    classes = [c.decode() for c in _unpickle(os.path.join(folder, "meta"))[b"fine_label_names"]]
    splits = []
    for split, file in ((TRAIN, "train"), (TEST, "test")):
        path = os.path.join(folder, file)
        if os.path.isfile(path):
            batch = _unpickle(path)
            y = np.asarray(batch[b"fine_labels"], np.int64)
            splits.append(from_arrays(split, _cifar_images(batch), y, classes))
    return splits


def load_npz(path: str) -> list[SplitData]:
    """An .npz with x, y and optionally x_test, y_test (and `classes`, names in index order)."""
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as .npz ({e})") from None
    with arrays:
        if "x" not in arrays or "y" not in arrays:
            raise UserError(f"{path} needs arrays named x and y; it has {', '.join(arrays.files)}")
        classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
        if classes is None:
            # Both splits share one class list, sized by the largest label in either.
            top = max(int(arrays[k].max()) for k in ("y", "y_test") if k in arrays)
            classes = [str(i) for i in range(top + 1)]
        splits = [from_arrays(TRAIN, arrays["x"], arrays["y"], classes)]
        if "x_test" in arrays and "y_test" in arrays:
            splits.append(from_arrays(TEST, arrays["x_test"], arrays["y_test"], classes))
    return splits


def load_digits() -> list[SplitData]:
    """scikit-learn's bundled digits with a fixed stratified 80/20 split."""
    from sklearn.model_selection import train_test_split

    x, y = digits_arrays()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    return [
        from_arrays(TRAIN, x_train, y_train, DIGIT_CLASSES),
        from_arrays(TEST, x_test, y_test, DIGIT_CLASSES),
    ]


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 [n, 8, 8] (0..16 scaled to 0..255, one-to-one) and labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = np.round(digits.images * 255 / 16).astype(np.uint8)
    return x, digits.target.astype(np.int64)
