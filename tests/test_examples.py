"""examples/ run as a user would run them, at a tiny size."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

from condense_pipeline.datasets import get_profile
from condense_pipeline.evaluate.loader import normalise
from condense_pipeline.pipeline.export import export_condensed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_on_condensed_with_ray_train(digits, tmp_path):
    from condense_pipeline.prepare import prepare_dataset

    profile = get_profile("digits")
    data = tmp_path / "data"
    prepare_dataset("digits", None, str(data))
    # Real digits stand in for a condensed set: 10 per class, exported as `run` exports.
    images, labels, _ = digits
    y = torch.from_numpy(labels)
    pick = torch.cat([(y == c).nonzero()[:10, 0] for c in range(10)])
    x = normalise(images[pick].permute(0, 3, 1, 2), profile.mean, profile.std)
    export = str(tmp_path / "export")
    export_condensed(x, y[pick], [str(c) for c in range(10)], profile, export, provenance={})

    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train_on_condensed.py"), export,
         "--dataset", "digits", "--test", str(data / "test"), "--epochs", "30",
         "--storage", str(tmp_path / "train")],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.search(r"test accuracy on (\d+) real test images: ([\d.]+)%", out.stdout)
    assert found, out.stdout
    assert int(found.group(1)) > 0
    # 30 epochs on 100 images: well above the 10 % of guessing
    assert float(found.group(2)) > 30
