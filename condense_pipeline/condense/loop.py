"""The condensation loop for one group of classes: match synthetic images to real targets."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from condense_pipeline.condense.synthetic import decode_factor
from condense_pipeline.config import CondenseConfig

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Everything a resumed run needs to continue exactly where it stopped."""

    step: int
    images: torch.Tensor  # [G * ipc, C, H, W], normalised space, ordered by class
    velocity: torch.Tensor  # SGD momentum buffer, same shape
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "seconds"}


def condense_loop(
    state: LoopState,
    targets,
    cfg: CondenseConfig,
    lr: torch.Tensor,
    pixel_low: torch.Tensor,
    pixel_high: torch.Tensor,
    checkpoint: Callable[[LoopState], None] | None = None,
    checkpoint_every: int = 200,
    log_every: int = 50,
    progress: Callable[[str], None] | None = None,
) -> LoopState:
    """Run steps state.step .. cfg.steps - 1 of SGD with momentum on the synthetic images.

    Each step: the provider's network and Siamese augmentation for this step, the decoded images
    (factor f: f^2 per stored image), the matching loss summed over the group's classes, one step
    for every class at once, then clamping to the valid pixel range so exported images are real
    images. lr is a [1, C, 1, 1] tensor (per channel where M3D's pixel-space lr was converted).
    """
    f2 = cfg.factor * cfg.factor
    groups = state.images.shape[0] // cfg.ipc
    labels = torch.arange(groups).repeat_interleave(cfg.ipc * f2)
    started = time.perf_counter() - (state.history[-1]["seconds"] if state.history else 0.0)
    images, velocity = state.images, state.velocity
    for step in range(state.step, cfg.steps):
        t = targets.at(step)
        syn = images.detach().requires_grad_(True)
        x = t.augment(decode_factor(syn, cfg.factor), labels)
        emb, acts = t.net.activations(x)
        loss = t.loss(
            emb.view(groups, -1, emb.shape[-1]), [a.view(groups, -1, *a.shape[1:]) for a in acts]
        )
        (grad,) = torch.autograd.grad(loss, syn)
        with torch.no_grad():
            velocity = cfg.momentum * velocity + grad
            images = torch.maximum(torch.minimum(images - lr * velocity, pixel_high), pixel_low)
        done = step + 1
        if done % log_every == 0 or done == cfg.steps:
            seconds = time.perf_counter() - started
            state.history.append({"step": done, "loss": loss.item(), "seconds": round(seconds, 3)})
            if progress:
                progress(f"step {done}/{cfg.steps} loss {loss.item():.4g} {seconds:.1f}s")
        state = LoopState(done, images, velocity, state.history)
        if checkpoint and (done % checkpoint_every == 0 or done == cfg.steps):
            checkpoint(state)
    return state
