"""Shared fixtures: the digits data as arrays, a small probe bank, a local Ray."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from condense_pipeline.condense.bank import BankSpec, ProbeBank
from condense_pipeline.datasets import get_profile


def free_port() -> int:
    """A local port where nothing listens (one the OS just handed out and took back)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def digits():
    """(uint8 images [n, 8, 8, 1], labels [n], keys) of scikit-learn's digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * 255 / 16).astype(np.uint8)[..., None]
    keys = [f"d{i:05d}" for i in range(len(d.target))]
    return torch.from_numpy(images), d.target.astype(np.int64), keys


def small_spec(statistics=("emb", "rff", "att"), probes=6, real_per_probe=None, seed=0):
    p = get_profile("digits")
    return BankSpec(
        seed=seed,
        probes=probes,
        num_classes=10,
        channels=1,
        resolution=8,
        depth=2,
        mean=p.mean,
        std=p.std,
        augment=p.augment,
        real_per_probe=real_per_probe,
        statistics=tuple(statistics),
        rff_dim=500,
        pilot_per_class=8 if "rff" in statistics else 0,
    )


@pytest.fixture
def bank():
    return ProbeBank(small_spec())


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # "local": a new Ray of our own, never a cluster another process started on this machine
    ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()
