"""The condensation loop for one group of classes: match synthetic images to real targets."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from condense_pipeline.condense.bank import ProbeBank
from condense_pipeline.condense.sampling import derive_seed
from condense_pipeline.condense.stats import ClassStats
from condense_pipeline.condense.synthetic import decode_factor, initial_images
from condense_pipeline.condense.targets import StepTargets
from condense_pipeline.config import CondenseConfig

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Everything a resumed run needs to continue exactly where it stopped."""

    step: int
    images: torch.Tensor  # [G * ipc, C, H, W], normalised space, ordered by class
    velocity: torch.Tensor  # SGD momentum buffer, same shape
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "seconds"}


def initial_state(
    stats: ClassStats, classes: list[int], g: int, cfg: CondenseConfig, bank: ProbeBank
) -> LoopState:
    """Step 0 of group g (`classes`, whose statistics `stats` holds in that order): the initial
    images from the init pools, on the bank's device, clamped to the valid pixel range."""
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "init", g, *classes))
    pools = [stats.pool(i)[0] for i in range(len(classes))]
    init = initial_images(pools, cfg.ipc, cfg.factor, cfg.init, bank.normalize, generator)
    init = torch.maximum(torch.minimum(init.to(bank.device), bank.pixel_high), bank.pixel_low)
    return LoopState(0, init, torch.zeros_like(init))


def image_lr(cfg: CondenseConfig, std: tuple[float, ...], device) -> torch.Tensor:
    """The images' learning rate per channel, [1, C, 1, 1]. M3D's lr is for [0, 1] pixels: in
    the normalised space the images live in, a pixel step of lr * g is lr / std^2 per channel."""
    lr = torch.full((1, len(std), 1, 1), cfg.lr, device=device)
    if cfg.preset.lr_pixel_space:
        lr = lr / torch.tensor(std, device=device).view(1, -1, 1, 1) ** 2
    return lr


def step_gradient(
    images: torch.Tensor, t: StepTargets, cfg: CondenseConfig, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d loss / d images) of one step, images [G * ipc, C, H, W] ordered by class.

    Up to `chunk` stored images (None: all) go through the network at once. With more, the
    gradient is still exact (gradient caching): a first pass computes every chunk's features
    without autograd; the loss of the whole group, computed on those features, gives d loss /
    d features; a second pass re-forwards each chunk with autograd and backpropagates its share.
    The features are per image and small (an embedding, DataDAM's attention maps), so the loss
    sees the whole group: DM and DataDAM need only class means, M3D's self term every pair.
    """
    f2 = cfg.factor * cfg.factor
    groups = images.shape[0] // cfg.ipc
    labels = torch.arange(groups, device=images.device).repeat_interleave(cfg.ipc * f2)

    def features(lo: int, syn: torch.Tensor) -> list[torch.Tensor]:
        return t.features(decode_factor(syn, cfg.factor), labels[lo * f2 : (lo + len(syn)) * f2])

    def grouped(feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [f.view(groups, -1, *f.shape[1:]) for f in feats]

    if chunk is None or chunk >= len(images):  # one pass: no second forward
        syn = images.detach().requires_grad_(True)
        loss = t.loss(grouped(features(0, syn)))
        (grad,) = torch.autograd.grad(loss, syn)
        return loss.detach(), grad
    spans = range(0, len(images), chunk)
    with torch.no_grad():
        parts = [features(lo, images[lo : lo + chunk]) for lo in spans]
    feats = [torch.cat(p).requires_grad_(True) for p in zip(*parts)]
    del parts
    loss = t.loss(grouped(feats))
    feat_grads = torch.autograd.grad(loss, feats)
    grad = torch.empty_like(images)
    for lo in spans:
        syn = images[lo : lo + chunk].detach().requires_grad_(True)
        rows = slice(lo * f2, (lo + len(syn)) * f2)
        torch.autograd.backward(features(lo, syn), [g[rows] for g in feat_grads])
        grad[lo : lo + len(syn)] = syn.grad
    return loss.detach(), grad


def condense_loop(
    state: LoopState,
    targets,
    cfg: CondenseConfig,
    bank: ProbeBank,
    chunk: int | None = None,
    checkpoint: Callable[[LoopState], None] | None = None,
    checkpoint_every: int = 200,
    log_every: int = 50,
    progress: Callable[[str], None] | None = None,
) -> LoopState:
    """Run steps state.step .. cfg.steps - 1 of SGD with momentum on the synthetic images.

    Each step: the provider's network and Siamese augmentation for this step, the decoded images
    (factor f: f^2 per stored image), the matching loss summed over the group's classes and its
    gradient (`step_gradient`, in chunks of `chunk` stored images), one step for every class at
    once, then clamping to the bank's valid pixel range (every step, or with
    `cfg.clamp_each_step` False only after the last, as DM's and DataDAM's code never clamp), so
    exported images are real images.
    """
    lr = image_lr(cfg, bank.spec.std, state.images.device)
    started = time.perf_counter() - (state.history[-1]["seconds"] if state.history else 0.0)
    images, velocity = state.images, state.velocity
    for step in range(state.step, cfg.steps):
        loss, grad = step_gradient(images, targets.at(step), cfg, chunk)
        done = step + 1
        with torch.no_grad():
            velocity = cfg.momentum * velocity + grad
            images = images - lr * velocity
            if cfg.clamp_each_step or done == cfg.steps:
                images = torch.maximum(torch.minimum(images, bank.pixel_high), bank.pixel_low)
        if done % log_every == 0 or done == cfg.steps:
            seconds = time.perf_counter() - started
            state.history.append({"step": done, "loss": loss.item(), "seconds": round(seconds, 3)})
            if progress:
                progress(f"step {done}/{cfg.steps} loss {loss.item():.4g} {seconds:.1f}s")
        state = LoopState(done, images, velocity, state.history)
        if checkpoint and (done % checkpoint_every == 0 or done == cfg.steps):
            checkpoint(state)
    return state
