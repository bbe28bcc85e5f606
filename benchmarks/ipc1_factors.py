"""MNIST IPC 1, dm, one factor at a time from the same statistics (issue 16): clamping every
step, never, or once after the last step; learning rate; initial image (init pool index r);
the evaluation's DSA strategy. Condenses in this process (no Ray, the loop's own step_gradient
and BankTargets) and trains the common protocol's network on the float images.

    condense-pipeline stats mnist --data DATA/train --out RUN --probes 200 --real-per-probe 32 \
        --method dm --init-pool 20
    .venv/bin/python benchmarks/ipc1_factors.py --run RUN --data DATA --clamp step --inits 0,1
    .venv/bin/python benchmarks/ipc1_factors.py --run RUN --data DATA --clamp never --inits 0,1

Each result is one JSON line appended to --out. `--bank flip` reads the flip bank's statistics
from --flip-stats (a torch file with emb_sum, count and spec computed by a plain loop).
"""

import argparse
import dataclasses
import json
import os
import time

import torch

from condense_pipeline import storage
from condense_pipeline.condense.bank import BankSpec, ProbeBank
from condense_pipeline.condense.loop import step_gradient
from condense_pipeline.condense.targets import BankTargets
from condense_pipeline.config import condense_config
from condense_pipeline.datasets import AUGMENT_ALL, AUGMENT_DIGITS, get_profile
from condense_pipeline.evaluate.protocol import EvalConfig, train_and_test
from condense_pipeline.pipeline.stats import load_stats, stats_dir

ap = argparse.ArgumentParser()
ap.add_argument("--run", required=True, help="run directory with dm statistics")
ap.add_argument("--data", required=True, help="prepared MNIST (train, validation, test)")
ap.add_argument("--flip-stats", default=None)
ap.add_argument("--bank", default="noflip")
ap.add_argument("--clamp", default="step", choices=["step", "never", "end"])
ap.add_argument("--lr", type=float, default=1.0)
ap.add_argument("--steps", type=int, default=500)
ap.add_argument("--inits", default="0,1")
ap.add_argument("--eval-aug", default="noflip")
ap.add_argument("--epochs", type=int, default=1000)
ap.add_argument("--split", default="validation")
ap.add_argument("--eval-seeds", default="0")
ap.add_argument("--out", default="ipc1_factors.jsonl")
ap.add_argument("--tag", default="")
a = ap.parse_args()
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
run = a.run
bank = ProbeBank(
    BankSpec.from_json(storage.read_json(os.path.join(stats_dir(run), "bank.json"))["spec"])
)
classes = list(range(10))
stats = load_stats(run, classes)
if a.bank == "flip":  # the plain loop's statistics (flipstats.py), the same pools
    flip = torch.load(a.flip_stats)
    bank = ProbeBank(BankSpec.from_json(flip["spec"]))
    stats.emb_sum, stats.count = flip["emb_sum"], flip["count"]
prof = get_profile("mnist")
eprof = dataclasses.replace(
    prof, augment={"noflip": AUGMENT_DIGITS, "flip": AUGMENT_ALL}[a.eval_aug]
)
cfg = condense_config(prof, "dm", 1, steps=a.steps, lr=a.lr)
cache = os.path.join(a.run, f"{a.split}.pt")
if not os.path.exists(cache):
    import numpy as np

    from condense_pipeline.formats import ERROR, IMAGE, LABEL
    from condense_pipeline.pipeline import read
    from condense_pipeline.pixels import normalise

    shards = storage.list_shards(os.path.join(a.data, a.split))
    rows = [x for x in read.iter_decoded(shards, prof, 10) if not x[ERROR]]
    px = torch.from_numpy(np.stack([x[IMAGE] for x in rows])).permute(0, 3, 1, 2)
    torch.save((normalise(px, prof.mean, prof.std), torch.tensor([x[LABEL] for x in rows])), cache)
tx, ty = torch.load(cache)
print("loaded", time.strftime("%T"), flush=True)
labels = torch.arange(10)
for r in [int(v) for v in a.inits.split(",")]:
    t0 = time.time()
    images = torch.cat([bank.normalize(stats.pool_images[c][r : r + 1]) for c in classes])
    velocity = torch.zeros_like(images)
    targets = BankTargets(bank, stats, classes, None, cfg)
    for step in range(cfg.steps):
        loss, grad = step_gradient(images, targets.at(step), cfg)
        velocity = cfg.momentum * velocity + grad
        images = images - a.lr * velocity
        if a.clamp == "step":
            images = torch.maximum(torch.minimum(images, bank.pixel_high), bank.pixel_low)
    if a.clamp == "end":
        images = torch.maximum(torch.minimum(images, bank.pixel_high), bank.pixel_low)
    tc = time.time() - t0
    print("condensed", tc, flush=True)
    accs = [
        train_and_test(images, labels, tx, ty, eprof, 10, EvalConfig(epochs=a.epochs, runs=1), s)
        for s in [int(v) for v in a.eval_seeds.split(",")]
    ]
    row = dict(
        vars(a),
        init=r,
        acc=accs,
        loss=loss.item(),
        condense_s=round(tc, 1),
        eval_s=round(time.time() - t0 - tc, 1),
        date=time.strftime("%F %T"),
        range=[images.min().item(), images.max().item()],
    )
    print(json.dumps(row), flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
