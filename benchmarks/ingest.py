"""Ingest throughput: prepare an ImageFolder of JPEGs into shards, then read and decode them to
64 px through Ray Data, against a bare PIL decode+resize loop over the same files.

    .venv/bin/python benchmarks/ingest.py --images 3000 --classes 10

The JPEGs are ImageNet-sized (400x350), smooth noise plus grain, so their size and decode cost
are realistic. Ray is started before the clock runs; its start-up is printed on its own.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image

from condense_pipeline import storage
from condense_pipeline.datasets import get_profile
from condense_pipeline.formats import LABEL
from condense_pipeline.pipeline.read import read_images, summarize_dataset
from condense_pipeline.prepare import prepare_dataset


def make_image_folder(root: str, images: int, classes: int, size: tuple[int, int]) -> int:
    """Write `images` JPEGs spread over `classes` folders; returns their total bytes."""
    rng = np.random.default_rng(0)
    width, height = size
    # Grain from random crops of one tile: drawing fresh noise per image dominated the run.
    grain = rng.normal(0, 16, (2 * height, 2 * width, 3)).astype(np.float32)
    total = 0
    for i in range(images):
        folder = os.path.join(root, f"n{i % classes:08d}")
        os.makedirs(folder, exist_ok=True)
        coarse = rng.integers(0, 256, (9, 10, 3), dtype=np.uint8)
        smooth = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
        y, x = rng.integers(0, height), rng.integers(0, width)
        pixels = np.asarray(smooth, np.float32) + grain[y : y + height, x : x + width]
        buf = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        with open(os.path.join(folder, f"img_{i:06d}.JPEG"), "wb") as f:
            f.write(buf.getvalue())
        total += buf.tell()
    return total


def bare_pil_loop(files: list[str], res: int) -> None:
    """What one process does without Ray: read, decode (JPEG draft), convert, box-resize."""
    for path in files:
        image = Image.open(path)
        image.draft("RGB", (res, res))
        np.asarray(image.convert("RGB").resize((res, res), Image.Resampling.BOX))


def read_pass(shards: list[str], profile, classes: int) -> int:
    """Consume decoded images the way a downstream stage would; returns the good samples."""
    n = 0
    for batch in read_images(shards, profile, classes).iter_batches(batch_size=256):
        n += int((batch[LABEL] >= 0).sum())
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import ray

    profile = get_profile("imagenet")  # 64 px RGB
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "src"), os.path.join(tmp, "out")
        t = time.perf_counter()
        size = make_image_folder(src, args.images, args.classes, (400, 350))
        print(
            f"generated {args.images} JPEGs (400x350, mean {size / args.images / 1024:.0f} KiB) "
            f"in {time.perf_counter() - t:.1f} s"
        )
        files = sorted(
            os.path.join(d, f) for d, _, names in os.walk(src) for f in names if f.endswith("JPEG")
        )

        t = time.perf_counter()
        ray.init(
            address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False
        )
        print(f"ray.init: {time.perf_counter() - t:.1f} s")

        timings = {}
        t = time.perf_counter()
        prepare_dataset("imagenet", src, out, shard_size=args.shard_size)
        timings[f"prepare (Ray tasks, {args.num_cpus} CPUs)"] = time.perf_counter() - t

        shards = storage.list_shards(storage.join(out, "train"))
        for attempt in ("first", "second"):
            t = time.perf_counter()
            good = read_pass(shards, profile, args.classes)
            timings[f"read_images + decode to 64 px, {attempt} pass"] = time.perf_counter() - t
            assert good == args.images, good
        summary = summarize_dataset(read_images(shards, profile, args.classes))
        assert summary.good == args.images and not summary.rejected

        t = time.perf_counter()
        bare_pil_loop(files, profile.resolution)
        bare = time.perf_counter() - t
        ray.shutdown()

    timings["bare PIL decode+resize loop (1 process)"] = bare
    print()
    print(
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {args.images} images in {len(shards)} shards"
    )
    print()
    print("| stage | seconds | images/s | vs bare PIL loop |")
    print("|---|---:|---:|---:|")
    for name, seconds in timings.items():
        rate = args.images / seconds
        print(f"| {name} | {seconds:.2f} | {rate:.0f} | {bare / seconds:.2f}x |")


if __name__ == "__main__":
    main()
