"""The run report (report.py), its plots (plots.py), and the export as other tools read it.

The run directory here is built from the real stages that need no Ray: export_condensed writes
the exports, evaluate_condensed trains and tests (2 epochs) and writes report.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from condense_pipeline import formats, plots, storage
from condense_pipeline.config import condense_config
from condense_pipeline.datasets import get_profile
from condense_pipeline.evaluate.loader import normalise
from condense_pipeline.evaluate.protocol import EvalConfig, class_accuracy, evaluate_condensed
from condense_pipeline.pipeline.export import export_condensed
from condense_pipeline.report import build_report, write_report

DIGITS = get_profile("digits")
CLASSES = [str(c) for c in range(10)]
LAPTOP = (1366, 768)


def test_loss_is_relative_to_each_probes_first_use():
    log = [
        {"step": 1, "loss": 4.0},  # probe 1, first use
        {"step": 2, "loss": 2.0},  # probe 0, first use
        {"step": 3, "loss": 2.0},  # probe 1 again: half its first loss
        {"step": 4, "loss": 1.5},  # probe 0 again
        {"step": 1, "loss": 8.0, "group": 1},  # another group: its own first uses
        {"step": 3, "loss": 2.0, "group": 1},
    ]
    points, relative = plots.relative_loss(log, lambda step: step % 2)
    assert relative
    assert points == [(1.0, 1.0), (1.0, 1.0), (2.0, 1.0), (3.0, 0.25), (3.0, 0.5), (4.0, 0.75)]
    # No probe seen twice (every logged step another probe): the raw losses, not all ones.
    points, relative = plots.relative_loss(log[:2], lambda step: step)
    assert not relative and points == [(1.0, 4.0), (2.0, 2.0)]


def test_class_accuracy_by_hand():
    predicted = torch.tensor([0, 1, 1, 2, 0])
    truth = torch.tensor([0, 1, 0, 2, 2])
    per_class = class_accuracy(predicted, truth, 4)
    assert per_class[:3] == [50.0, 100.0, 50.0] and np.isnan(per_class[3])


def _digits_split(digits, seed: int):
    images, labels, _ = digits
    x = normalise(images.permute(0, 3, 1, 2), DIGITS.mean, DIGITS.std)
    y = torch.from_numpy(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


@pytest.fixture(scope="module")
def run_dir(digits, tmp_path_factory):
    """Two evaluated condensations that differ only in their steps (real digits as stand-ins for
    the synthetic images), each with a loss log whose probes recur."""
    run = str(tmp_path_factory.mktemp("report") / "run")
    x, y = _digits_split(digits, seed=0)
    test_x, test_y, train_x, train_y = x[:300], y[:300], x[300:], y[300:]
    ecfg = EvalConfig(epochs=2, runs=2)
    for steps in (20, 40):
        cfg = condense_config(DIGITS, "dm", 2, steps=steps)
        folder = storage.join(run, formats.CONDENSE_DIR, cfg.folder_name())
        storage.write_json(storage.join(folder, "config.json"), asdict(cfg))
        pick = torch.cat([(train_y == c).nonzero()[: steps // 10, 0] for c in range(10)])
        log = [{"step": s, "loss": 10.0 / s + s % 3, "group": 0} for s in range(1, steps + 1)]
        export_dir = storage.join(folder, formats.EXPORT_DIR)
        export_condensed(
            train_x[pick], train_y[pick], CLASSES, DIGITS, export_dir,
            provenance={"method": "dm", "ipc": 2, "factor": 1}, loss_log=log,
            probe_of_step=lambda step: step % 3,
        )  # fmt: skip
        evaluate_condensed(
            export_dir, test_x, test_y, train_x, train_y, DIGITS, 10, 2, ecfg,
            report_dir=storage.join(folder, formats.EVAL_DIR),
        )  # fmt: skip
    return run


def test_report_json_has_accuracy_per_class(run_dir):
    folder = sorted(os.listdir(os.path.join(run_dir, "condense")))[0]
    report = storage.read_json(os.path.join(run_dir, "condense", folder, "eval", "report.json"))
    for key in ("condensed", "random_real"):
        per_class = report[key]["per_class"]
        assert len(per_class) == 10 and all(0 <= a <= 100 for a in per_class)
        # 300 test images, about 30 per class: the class mean is near the overall mean
        assert abs(np.mean(per_class) - report[key]["mean"]) < 10


def test_report_page_holds_every_part(run_dir):
    page = build_report(run_dir)
    images = re.findall(r'<img[^>]*alt="([^"]+)"[^>]*src="data:image/png;base64,', page)
    # per condensation: preview, loss, per-class; then accuracy against steps
    assert images.count("preview: condensed images, a row per class") == 2
    assert images.count("condensation loss") == 2
    assert images.count("accuracy per class") == 2 and images.count("accuracy") == 1
    for folder in os.listdir(os.path.join(run_dir, "condense")):
        report = storage.read_json(os.path.join(run_dir, "condense", folder, "eval", "report.json"))
        c, b = report["condensed"], report["random_real"]
        runs = ", ".join(f"{a:.2f}" for a in c["runs"])
        assert f'{c["mean"]:.2f} ± {c["std"]:.2f}</td><td class="num">{runs}' in page
        assert f"{b['mean']:.2f} ± {b['std']:.2f}" in page
    assert "Accuracy against steps" in page and 'src="http' not in page  # self-contained


def test_dataset_card_gets_the_accuracy(run_dir):
    folder = sorted(os.listdir(os.path.join(run_dir, "condense")))[0]
    from condense_pipeline.pipeline.export import write_dataset_card

    base = os.path.join(run_dir, "condense", folder)
    report = storage.read_json(os.path.join(base, "eval", "report.json"))
    write_dataset_card(os.path.join(base, "export"), "digits", report)
    card = open(os.path.join(base, "export", formats.DATASET_CARD)).read()
    c = report["condensed"]
    assert f"condensed {c['mean']:.2f} ± {c['std']:.2f} %" in card
    assert "data_files: parquet/*.parquet" in card and "Not evaluated" not in card


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip(
            "no chromium: `make test` installs Debian's chromium (apt-get install chromium)"
        )
    return found


def _chromium_run(browser: str, profile_dir, *args) -> subprocess.CompletedProcess:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", f"--user-data-dir={profile_dir}",
        f"--window-size={LAPTOP[0]},{LAPTOP[1]}",
    ]  # fmt: skip
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


# Added to a copy of the page: after load, every image's decoded width and where it and the
# accuracy table sit, written into the DOM that --dump-dom prints.
PROBE = """<script>
window.addEventListener("load", () => {
  const box = (e) => {
    const r = e.getBoundingClientRect();
    return [r.top, r.bottom, r.left, r.right];
  };
  const out = [...document.images].map((i) => [i.alt, i.naturalWidth, ...box(i)]);
  const table = document.querySelector("table.accuracy");
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({images: out, table: table ? box(table) : null});
  document.body.appendChild(probe);
});
</script>"""


def test_report_renders_in_a_browser(run_dir, tmp_path):
    browser = _chromium()
    page = open(write_report(run_dir)).read()
    copy = tmp_path / "probed.html"
    copy.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = _chromium_run(
        browser, tmp_path / "profile-dom", "--virtual-time-budget=10000", "--dump-dom",
        copy.as_uri(),
    )  # fmt: skip
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    probe = json.loads(found.group(1).replace("&quot;", '"'))
    assert probe["images"] and all(width > 0 for _, width, *_ in probe["images"])  # all decoded
    first = {alt: box for alt, _, *box in reversed(probe["images"])}  # the first of each alt
    preview = first["preview: condensed images, a row per class"]
    # On a laptop screen, without scrolling: the accuracy table, the first preview, its loss plot.
    assert probe["table"][1] <= LAPTOP[1]
    assert preview[1] <= LAPTOP[1] and first["condensation loss"][1] <= LAPTOP[1]

    shot = tmp_path / "report.png"
    out = _chromium_run(browser, tmp_path / "profile-shot", f"--screenshot={shot}", copy.as_uri())
    assert shot.exists(), out.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (LAPTOP[1], LAPTOP[0])
    # Where the preview is, the screenshot shows images (light digits on black), not blank page.
    top, bottom, left, right = (int(v) for v in preview)
    region = pixels[top:bottom, left:right]
    assert region.std() > 40 and (region < 60).mean() > 0.04


def test_export_reads_as_a_hugging_face_dataset(run_dir):
    folder = sorted(os.listdir(os.path.join(run_dir, "condense")))[0]
    parquet = os.path.join(run_dir, "condense", folder, "export", "parquet")
    files = sorted(os.path.join(parquet, f) for f in os.listdir(parquet))
    manifest = storage.read_json(os.path.join(parquet, "..", formats.MANIFEST))
    try:
        import datasets
    except ImportError:  # pyarrow alone: the same columns and the features in the metadata
        table = pq.read_table(files[0])
        features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
        assert features["label"]["names"] == CLASSES
        assert set(table.column("image").type.names) == {"bytes", "path"}
        return
    ds = datasets.load_dataset(
        "parquet", data_files=files, cache_dir=str(os.path.join(run_dir, "..", "hf"))
    )["train"]
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"].names == CLASSES
    assert len(ds) == manifest["num_images"]
    row = ds[0]
    assert row["image"].size == (8, 8) and row["image"].mode == "L"
    assert ds.features["label"].int2str(row["label"]) == row["class_name"]
