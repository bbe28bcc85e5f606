"""How far condensation moved the images from their initial ones, and whether two condensed
sets that start from the same initial images (two banks, same pool and seed) moved alike.

    .venv/bin/python benchmarks/image_moves.py RUN_A/condense/FOLDER RUN_B/condense/FOLDER

Per set: the RMS of the initial images and of the change (normalised pixels); for a pair: the
RMS between the two final sets and the cosine between their changes (1: the same direction).
Reads a folder condensed in one group (as on MNIST and digits on one machine).
"""

import argparse
import json
import os

import torch
from safetensors.torch import load_file

from condense_pipeline.condense.bank import BankSpec, ProbeBank
from condense_pipeline.condense.loop import initial_state
from condense_pipeline.config import CondenseConfig
from condense_pipeline.pipeline.condense import experts_dir, load_stats, read_bank


def change(folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial images, final - initial images) of a folder condensed in one group."""
    run = os.path.dirname(os.path.dirname(os.path.abspath(folder)))
    with open(os.path.join(folder, "config.json")) as f:
        cfg = CondenseConfig(**json.load(f))
    (group,) = [d for d in os.listdir(folder) if d.startswith("group-")]
    final = load_file(os.path.join(folder, group, "images.safetensors"))["images"]
    spec = BankSpec.from_json(read_bank(run)["spec"])
    bank = ProbeBank(spec, "cpu", experts_dir(run) if spec.trained else None)
    classes = list(cfg.classes or range(len(final) // cfg.ipc))  # one group: every class
    init = initial_state(load_stats(run, classes, "cpu"), classes, 0, cfg, bank).images
    return init, final - init


def rms(t: torch.Tensor) -> float:
    return t.pow(2).mean().sqrt().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help="condensed folders (condense/<name>)")
    moves = {}
    for folder in parser.parse_args().folders:
        init, moves[folder] = change(folder)
        print(f"{folder}: initial RMS {rms(init):.3f}, change RMS {rms(moves[folder]):.3f}")
    names = list(moves)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            cos = torch.nn.functional.cosine_similarity(moves[a].flatten(), moves[b].flatten(), 0)
            apart = rms(moves[a] - moves[b])
            print(f"{a} vs {b}: final sets {apart:.3f} apart, changes' cosine {cos:.2f}")


if __name__ == "__main__":
    main()
