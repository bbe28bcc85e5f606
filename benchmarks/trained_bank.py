"""Issue 14: what the trained bank changes at MNIST IPC 1 under dm, on the validation split.

    .venv/bin/python benchmarks/trained_bank.py --data D --experts RUN/experts --work W \
        random "beta=0" "beta=0.5" "beta=0.8" "beta=1" "trained=1,calibration=10"

D is `condense-pipeline prepare mnist`'s folder and RUN/experts what `train-probes` wrote (or,
with `--train N --train-images I`, N experts trained here on the first I training images, one
pass each, as train-probes trains them). Each variant is one statistics pass (K = 200 probes,
M = 32, cached while the bank stays the same) and one condensation (dm, IPC 1, 1000 steps), its
8-bit images trained `--runs` times by the common protocol (1000 epochs) and tested on
validation. Variant keys (comma-separated):

- `random`: the random bank (every probe its own random network);
- `beta=L`: every probe a trained probe, beta drawn uniform in [L, 1) instead of [0, 1); beta = 1
  is the experts' initial weights alone, so `beta=1` is a random bank of only E networks;
- `experts=E` (default: all in the folder), `trained=T` (default: every probe), `calibration=W`,
  `lr=X`, `steps=N`.

The beta range is not a setting of the tool: this script patches the draw (BankSpec.trained_probe)
to measure it. Like gpu_quality.py it runs the stages in process, without Ray.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context

import gpu_quality as gq
import numpy as np
import torch

from condense_pipeline import storage
from condense_pipeline.condense.bank import BankSpec
from condense_pipeline.condense.experts import EXPERTS_JSON
from condense_pipeline.condense.loop import initial_state
from condense_pipeline.config import TrainProbesConfig, condense_config, stats_config
from condense_pipeline.datasets import get_profile
from condense_pipeline.evaluate.protocol import EvalConfig
from condense_pipeline.formats import TRAIN, VALIDATION
from condense_pipeline.pipeline import read

BETA_LOW = [0.0]  # the lower end of beta's range, read by the patched draw below


_DRAW = BankSpec.trained_probe  # beta uniform in [0, 1)


def trained_probe(spec: BankSpec, k: int) -> tuple[int, float]:
    """The tool's draw with beta rescaled into [BETA_LOW, 1) (the same expert, the same u)."""
    expert, u = _DRAW(spec, k)
    return expert, BETA_LOW[0] + (1 - BETA_LOW[0]) * u


BankSpec.trained_probe = trained_probe


def parse(text: str) -> dict:
    v = dict(random=False, beta=0.0, experts=None, trained=None, calibration=0.0, lr=1.0)
    v["steps"] = 1000
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in v:
            sys.exit(f"trained_bank: unknown key {key!r} in {text!r}")
        v[key] = True if key == "random" else float(value)
    return v


def name_of(v: dict) -> str:
    if v["random"]:
        return f"random bank, lr {v['lr']:g}, {v['steps']:g} steps"
    parts = [f"beta in [{v['beta']:g}, 1)" if v["beta"] < 1 else "beta 1 (initial weights)"]
    parts += [f"{key} {v[key]:g}" for key in ("experts", "trained") if v[key] is not None]
    parts += [f"calibration {v['calibration']:g}", f"lr {v['lr']:g}", f"{v['steps']:g} steps"]
    return ", ".join(parts)


def main() -> None:
    gq.no_ray()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--data", required=True, help="prepare mnist's folder")
    parser.add_argument("--experts", required=True, help="the experts' folder")
    parser.add_argument("--train", type=int, default=0, help="experts to train here first")
    parser.add_argument("--train-images", type=int, default=None, help="their training images")
    parser.add_argument("--work", default="/tmp/trained_bank")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    variants = [parse(t) for t in args.variants]
    profile = get_profile("mnist")
    os.makedirs(args.work, exist_ok=True)
    train = gq.split_in_memory(os.path.join(args.data, TRAIN), profile)
    counts = np.asarray(read.load_dataset_info(os.path.join(args.data, TRAIN))["counts"])
    if args.train and not os.path.exists(os.path.join(args.experts, EXPERTS_JSON)):
        tcfg = TrainProbesConfig(experts=args.train, epochs=1)
        os.makedirs(args.experts, exist_ok=True)
        gq.trained_experts(profile, train, tcfg, args.data, args.experts, "cpu", args.train_images)
    experts = storage.read_json(os.path.join(args.experts, EXPERTS_JSON))
    splits_file = os.path.join(args.work, "validation.pt")
    images, labels, *_ = gq.split_in_memory(os.path.join(args.data, VALIDATION), profile)
    torch.save(
        {VALIDATION: (gq.normalised(images, profile), torch.from_numpy(labels))}, splits_file
    )
    ecfg = EvalConfig(epochs=args.epochs, device="cpu")
    header = {"device": "cpu", "torch": torch.__version__, "budget": {}, "tiny": False}
    with ProcessPoolExecutor(2, get_context("spawn"), gq._load_splits, (splits_file,)) as pool:
        rows = gq.Rows(os.path.join(args.work, "rows.json"), pool, header)
        bank_key, cached = None, None
        for v in variants:
            name = name_of(v)
            if not rows.wanted(name):
                continue
            trained = 0 if v["random"] else int(v["trained"] or args.probes)
            key = (trained, v["beta"], v["experts"])
            if key != bank_key:
                BETA_LOW[0] = v["beta"]
                scfg = stats_config(
                    profile,
                    ("dm",),
                    probes=args.probes,
                    real_per_probe=32,
                    init_pool=20,
                    trained_probes=trained,
                    experts=int(v["experts"]) if trained and v["experts"] else None,
                )
                bank_key, cached = key, None  # one bank's statistics in memory at a time
                folder = args.experts if trained else None
                cached = gq.statistics(
                    profile, scfg, train, counts, "cpu", experts if trained else None, folder
                )
            bank, stats, h = cached
            cfg = condense_config(
                profile, "dm", 1, steps=int(v["steps"]), lr=v["lr"], calibration=v["calibration"]
            )
            started = time.perf_counter()
            x = gq.condensed(bank, stats, h, cfg, (cfg.steps,))[cfg.steps]
            seconds = time.perf_counter() - started
            x0 = initial_state(stats, list(range(10)), 0, cfg, bank).images
            moved = float((x - x0).pow(2).mean().sqrt())  # how far the images left the init
            gq.say(f"{name}: condensed in {seconds:.0f} s, rms change {moved:.3f}")
            row = dict(name=name, bank="random" if v["random"] else "trained", method="dm")
            row.update(ipc=1, steps=cfg.steps, split=VALIDATION, rms_change=moved)
            row.update(condense_s=round(seconds, 1), config=asdict(cfg), variant=v)
            row["experts"] = experts if trained else None
            rows.submit(row, [(x, torch.arange(10))] * args.runs, VALIDATION, ecfg)
        rows.wait()
    for r in rows.data["rows"]:
        runs = ", ".join(f"{a:.2f}" for a in r["runs"])
        print(
            f"| {r['name']} | {r['mean']:.2f} ± {r['std']:.2f} | {runs} | {r['rms_change']:.3f} |"
        )


if __name__ == "__main__":
    main()
