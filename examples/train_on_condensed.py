"""Train a torchvision model on a condensed export with Ray Train; test it on the real test split.

    python examples/train_on_condensed.py runs/demo/condense/ipc10-dm-XXXXXXXX/export \\
        --dataset digits --epochs 300 --workers 2

What a downstream training job does with an export:
- reads the export's Parquet files through Ray Data (`load_condensed_ray`) and decodes the PNGs in
  Ray Data tasks, normalised with the mean and std the export's manifest.json records;
- trains torchvision's ResNet-18 (first layer sized for small images) with Ray Train's
  TorchTrainer on CPU workers (`--gpu` for one GPU each), with the augmentation the manifest
  records (DSA: one op per mini-batch, parameters per sample, as the evaluation protocol does)
  and the manifest's recipe (SGD, momentum, weight decay, lr x0.1 at half);
- tests the trained model on the real test split (the shards `prepare` wrote, or `--test`).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile

import numpy as np
import ray
import ray.data
import ray.train
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from ray.train.torch import TorchTrainer

from condense_pipeline import storage
from condense_pipeline.api import default_data, load_split
from condense_pipeline.condense.augment import augment_batch
from condense_pipeline.datasets import get_profile
from condense_pipeline.evaluate.loader import load_condensed_ray, normalise, read_manifest
from condense_pipeline.evaluate.protocol import test_accuracy
from condense_pipeline.formats import TEST


def resnet18(channels: int, num_classes: int) -> torch.nn.Module:
    """torchvision's ResNet-18 with a 3x3 first convolution and no max-pool, for 8-64 px images."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = torch.nn.Conv2d(channels, 64, 3, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


def decoder(manifest: dict):
    """A Ray Data batch function: PNG structs -> normalised float32 images [n, C, H, W]."""
    mode = "L" if manifest["channels"] == 1 else "RGB"

    def decode(batch: dict) -> dict:
        pixels = np.stack(
            [
                np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert(mode))
                for cell in batch["image"]
            ]
        ).reshape(len(batch["label"]), manifest["resolution"], manifest["resolution"], -1)
        x = normalise(
            torch.from_numpy(pixels).permute(0, 3, 1, 2), manifest["mean"], manifest["std"]
        )
        return {"x": x.numpy(), "y": np.asarray(batch["label"], dtype=np.int64)}

    return decode


def train_loop(config: dict) -> None:
    """One Ray Train worker: its shard of the condensed set, DSA on every mini-batch, SGD."""
    manifest, epochs = config["manifest"], config["epochs"]
    recipe = manifest["recipe"]
    torch.manual_seed(config["seed"])
    model = ray.train.torch.prepare_model(resnet18(manifest["channels"], len(manifest["classes"])))
    device = ray.train.torch.get_device()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=recipe["lr"],
        momentum=recipe["momentum"],
        weight_decay=recipe["weight_decay"],
    )
    generator = torch.Generator().manual_seed(
        config["seed"] + ray.train.get_context().get_world_rank()
    )
    # A condensed set is small: this worker reads its shard once, then trains on it in memory.
    batches = list(ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=1024))
    x_all = torch.cat([b["x"] for b in batches])
    y_all = torch.cat([b["y"] for b in batches])
    for epoch in range(epochs):
        if epoch == epochs // 2 and epoch > 0:
            for group in optimizer.param_groups:
                group["lr"] = recipe["lr"] * 0.1
        model.train()
        order = torch.randperm(len(y_all), generator=generator)
        for start in range(0, len(order), recipe["batch_size"]):
            batch = order[start : start + recipe["batch_size"]]
            with torch.no_grad():  # DSA: one op per mini-batch, parameters per sample
                x = augment_batch(x_all[batch], manifest["augment"], generator)
            loss = F.cross_entropy(model(x.to(device)), y_all[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            state = getattr(model, "module", model).state_dict()  # unwrap DistributedDataParallel
            torch.save(state, os.path.join(tmp, "model.pt"))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"epochs": epochs, "last_loss": loss.item()}, checkpoint=checkpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="an export folder (RUN_DIR/condense/<config>/export)")
    parser.add_argument("--dataset", required=True, help="its profile, for the test split")
    parser.add_argument("--test", help="test shards (default: the prepared test split)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the manifest's recipe")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", default=None, help="Ray Train storage path (checkpoints)")
    args = parser.parse_args()

    profile = get_profile(args.dataset)
    manifest = read_manifest(args.export)
    ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one short read, no bars
    train = load_condensed_ray(args.export).map_batches(decoder(manifest), batch_format="numpy")
    epochs = args.epochs or manifest["recipe"]["epochs"]
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"manifest": manifest, "epochs": epochs, "seed": args.seed},
        scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=args.gpu),
        run_config=ray.train.RunConfig(
            name="train_on_condensed",
            storage_path=os.path.abspath(args.storage or os.path.join(args.export, "..", "train")),
        ),
        datasets={"train": train},
    )
    result = trainer.fit()

    model = resnet18(manifest["channels"], len(manifest["classes"]))
    with result.checkpoint.as_directory() as folder:
        model.load_state_dict(torch.load(os.path.join(folder, "model.pt"), weights_only=True))
    test = storage.list_shards(args.test or default_data(profile, TEST))
    test_x, test_y = load_split(test, profile)
    accuracy = test_accuracy(model, test_x, test_y)
    print(f"trained resnet18 on {manifest['num_images']} condensed images for {epochs} epochs")
    print(f"test accuracy on {len(test_y)} real test images: {accuracy:.2f}%")


if __name__ == "__main__":
    main()
