"""Experts: ConvNets trained briefly on the real data, for trained probes (DANCE, NCFM).

Expert e starts from the profile's network seeded by (seed, e) and is trained with SGD and the
profile's DSA augmentation; its initial and final weights are stored as safetensors with a
fingerprint of the data and the recipe. A trained probe blends the two: theta = beta * theta_init
+ (1 - beta) * theta_final (DESIGN.md section 3). Training here is one plain loop per expert;
pipeline/train_probes.py runs it on Ray Train.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from condense_pipeline import storage
from condense_pipeline.condense.augment import augment_batch
from condense_pipeline.condense.networks import seeded_model
from condense_pipeline.condense.sampling import derive_seed
from condense_pipeline.errors import UserError
from condense_pipeline.pixels import normalise

log = logging.getLogger(__name__)

EXPERTS_DIR = "experts"
EXPERTS_JSON = "experts.json"
FINGERPRINT = "fingerprint"  # the safetensors metadata key of both weight files
PROGRESS_S = 60.0  # a progress line at least this often within an epoch (an ImageNet epoch is long)


@dataclass(frozen=True)
class ExpertRecipe:
    """How every expert is trained. SGD as DANCE's and NCFM's pretraining (and the evaluation
    protocol): lr 0.01, momentum 0.9, weight decay 5e-4, batch 256."""

    network: str
    channels: int
    resolution: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: tuple[str, ...]
    epochs: int
    seed: int = 0
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256

    def fingerprint(self, dataset: str) -> str:
        """Identifies expert weights: this recipe and the training data's fingerprint. The
        number of experts is not in it: expert e is the same whatever the count."""
        text = json.dumps({"recipe": asdict(self), "dataset": dataset}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def initial_model(recipe: ExpertRecipe, e: int) -> torch.nn.Module:
    """Expert e before training: the registry's classifier seeded by (seed, e)."""
    r = recipe
    return seeded_model(
        r.network, derive_seed(r.seed, "expert", e), r.channels, r.resolution, r.num_classes
    )


def train_expert(
    recipe: ExpertRecipe,
    e: int,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: str | torch.device = "cpu",
    progress: Callable[[str], None] | None = None,
) -> tuple[dict, dict]:
    """(initial, final) state dicts of expert e trained on images uint8 [n, H, W, C] with
    labels [n]. The mini-batch order and the augmentation come from (seed, e) alone, so the same
    data in the same order gives the same weights on a rerun."""
    model = initial_model(recipe, e)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model = model.to(device).train()
    opt = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )
    generator = torch.Generator().manual_seed(derive_seed(recipe.seed, "expert-batches", e))
    batches = -(-len(labels) // recipe.batch_size)
    last = time.monotonic()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(labels), generator=generator)
        total, seen = 0.0, 0
        for b, start in enumerate(range(0, len(order), recipe.batch_size)):
            idx = order[start : start + recipe.batch_size]
            x = normalise(images[idx].permute(0, 3, 1, 2), recipe.mean, recipe.std)
            with torch.no_grad():
                x = augment_batch(x, recipe.augment, generator)
            loss = F.cross_entropy(model(x.to(device)), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            if progress and time.monotonic() - last > PROGRESS_S and b + 1 < batches:
                where = f"epoch {epoch + 1}/{recipe.epochs} batch {b + 1}/{batches}"
                progress(f"{where} loss {total / seen:.4f}")
                last = time.monotonic()
        if progress:
            progress(f"epoch {epoch + 1}/{recipe.epochs} loss {total / seen:.4f}")
            last = time.monotonic()
    final = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return initial, final


# -- storage -----------------------------------------------------------------------------------
def experts_dir(run_dir: str) -> str:
    return storage.join(run_dir, EXPERTS_DIR)


def weight_path(folder: str, e: int, which: str) -> str:
    """`which`: init or final. The final file is written last: it marks the expert done."""
    return storage.join(folder, f"expert-{e:04d}-{which}.safetensors")


def save_expert(folder: str, e: int, fingerprint: str, initial: dict, final: dict) -> None:
    meta = {FINGERPRINT: fingerprint}
    for which, state in (("init", initial), ("final", final)):
        tensors = {k: v.contiguous() for k, v in state.items()}
        storage.write_bytes(weight_path(folder, e, which), st_save(tensors, metadata=meta))


def _fingerprint_of(location: str) -> str | None:
    """The fingerprint in a weight file's header (None when there is no file)."""
    if not storage.exists(location):
        return None
    return _metadata(storage.read_bytes(location)).get(FINGERPRINT)


def expert_done(folder: str, e: int, fingerprint: str) -> bool:
    """Expert e's final weights exist and were trained with this fingerprint."""
    return _fingerprint_of(weight_path(folder, e, "final")) == fingerprint


@dataclass
class Experts:
    """Every expert's initial and final weights (state dicts on the CPU)."""

    fingerprint: str
    initial: list[dict]
    final: list[dict]

    def __len__(self) -> int:
        return len(self.final)

    def blend(self, e: int, beta: float) -> dict:
        """theta = beta * theta_init + (1 - beta) * theta_final of expert e."""
        init, final = self.initial[e], self.final[e]
        return {k: beta * init[k] + (1 - beta) * final[k] for k in final}


def load_experts(folder: str, count: int, fingerprint: str) -> Experts:
    """Experts 0..count-1 from `folder`; refuses missing ones or ones of another recipe/data."""
    initial, final = [], []
    for e in range(count):
        for which, into in (("init", initial), ("final", final)):
            location = weight_path(folder, e, which)
            if not storage.exists(location):
                raise UserError(
                    f"expert {e} has no {which} weights at {location}; run "
                    "`condense-pipeline train-probes` with this run directory first"
                )
            data = storage.read_bytes(location)
            meta = _metadata(data)
            if meta.get(FINGERPRINT) != fingerprint:
                raise UserError(
                    f"expert {e} at {location} was trained on other data or with another recipe "
                    f"(fingerprint {meta.get(FINGERPRINT)}, the bank needs {fingerprint}); "
                    "rerun train-probes and stats"
                )
            into.append(st_load(data))
    return Experts(fingerprint, initial, final)


def _metadata(data: bytes) -> dict:
    """The __metadata__ of safetensors bytes (an 8-byte header length, then the JSON header)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})
