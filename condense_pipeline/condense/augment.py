"""Differentiable Siamese augmentation (DSA) as in the DC/DM code, drawing kept apart from applying.

`sample` draws the random parameters of one op for n images; `apply` applies given parameters to a
batch. They are separate because Siamese augmentation needs the same transform on two batches that
are seen at different times: a probe's augmentation of class c is drawn once from a seeded
generator, applied to every real image of c during the statistics pass, and applied again to the
synthetic images of c during condensation. With explicit parameter tensors that is just calling
`apply` twice with one `params`; the DC code gets the same effect by re-seeding the global RNG
before every draw. Parameters with leading dim 1 broadcast over the batch (one transform per class).

All draws are on the CPU from the caller's `torch.Generator`, so a seed gives the same op and the
same parameters on any machine; `apply` moves them to the images' device.

Images are [n, C, H, W] in normalised space, square (H = W = size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")

# ParamDiffAug defaults of the DC repo (utils.py).
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5
CROP_RATIO = 0.125
CUTOUT_RATIO = 0.5
FLIP_PROB = 0.5
SCALE_RATIO = 1.2
ROTATE_DEGREES = 15.0


def _rand(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device="cpu")


def _randint(low: int, high: int, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(low, high, (n,), generator=generator, device="cpu")


def _half_up(value: float) -> int:
    # int(v + 0.5) as in the DC code, not Python's round() (which rounds halves to even).
    return int(value + 0.5)


def sample(op: str, n: int, generator: torch.Generator, *, size: int) -> dict[str, torch.Tensor]:
    """Draw parameters of `op` for n images of side `size`; every tensor has shape [n].

    color: brightness offset in [-0.5, 0.5), saturation factor in [0, 2), contrast factor in
      [0.5, 1.5) (float).
    crop: dy, dx integer shifts in [-s, s], s = round(0.125 * size) (int64).
    cutout: cy, cx centre of a square of side round(size / 2), in [0, size] for an even side,
      [0, size) for an odd one (int64).
    flip: flip, True with probability 0.5 (bool).
    scale: sx, sy in [1/1.2, 1.2) (float).
    rotate: angle in degrees, in [-15, 15) (float).
    """
    if op == "color":
        # Same draw order as the DC code: brightness, saturation, contrast.
        return {
            "brightness": (_rand(n, generator) - 0.5) * BRIGHTNESS,
            "saturation": _rand(n, generator) * SATURATION,
            "contrast": _rand(n, generator) + CONTRAST,
        }
    if op == "crop":
        s = _half_up(size * CROP_RATIO)
        return {"dy": _randint(-s, s + 1, n, generator), "dx": _randint(-s, s + 1, n, generator)}
    if op == "cutout":
        side = _half_up(size * CUTOUT_RATIO)
        # The DC range: an even side can centre one past the last pixel, an odd one cannot.
        high = size + (1 - side % 2)
        return {"cy": _randint(0, high, n, generator), "cx": _randint(0, high, n, generator)}
    if op == "flip":
        return {"flip": _rand(n, generator) < FLIP_PROB}
    if op == "scale":
        low = 1.0 / SCALE_RATIO
        return {
            "sx": _rand(n, generator) * (SCALE_RATIO - low) + low,
            "sy": _rand(n, generator) * (SCALE_RATIO - low) + low,
        }
    if op == "rotate":
        return {"angle": (_rand(n, generator) - 0.5) * 2 * ROTATE_DEGREES}
    raise ValueError(f"Unknown DSA op {op!r}; choose from {', '.join(OPS)}.")


def _column(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [m] float parameter as [m, 1, 1, 1] on x's device and dtype, to broadcast over pixels."""
    return p.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample x [n, C, H, W] through affine matrices theta [m, 2, 3], m in {1, n}."""
    theta = theta.expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _crop(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """out[i, :, r, c] = x[i, :, r + dy_i, c + dx_i], 0 where that falls outside the image."""
    n, _, h, w = x.shape
    dy = dy.to(x.device).expand(n)
    dx = dx.to(x.device).expand(n)
    # A one-pixel zero border plus clamped indices: every index outside lands on a zero.
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    rows = (torch.arange(h, device=x.device) + dy[:, None] + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device) + dx[:, None] + 1).clamp(0, w + 1)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """Zero rows [cy - side//2, cy - side//2 + side), same for columns, clipped to the image."""
    _, _, h, w = x.shape
    side_h, side_w = _half_up(h * CUTOUT_RATIO), _half_up(w * CUTOUT_RATIO)
    top = cy.to(x.device)[:, None] - side_h // 2
    left = cx.to(x.device)[:, None] - side_w // 2
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top) & (rows < top + side_h)
    in_cols = (cols >= left) & (cols < left + side_w)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


def apply(x: torch.Tensor, op: str, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply `op` with `params` (from `sample`) to x [n, C, H, W]; returns [n, C, H, W].

    Each parameter has leading dim n (one transform per image) or 1 (the same transform for every
    image: the Siamese case). Differentiable with respect to x.
    """
    n = x.shape[0]
    for key, p in params.items():
        if p.shape[0] not in (1, n):
            raise ValueError(
                f"DSA parameter {key!r} has leading dim {p.shape[0]}; it must be 1 or the batch "
                f"size {n}."
            )
    if op == "color":
        x = x + _column(params["brightness"], x)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * _column(params["saturation"], x) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * _column(params["contrast"], x) + mean
    if op == "crop":
        return _crop(x, params["dy"], params["dx"])
    if op == "cutout":
        return _cutout(x, params["cy"], params["cx"])
    if op == "flip":
        flip = params["flip"].to(x.device).view(-1, 1, 1, 1)
        return torch.where(flip, x.flip(3), x)
    if op == "scale":
        sx = params["sx"].to(device=x.device, dtype=x.dtype)
        sy = params["sy"].to(device=x.device, dtype=x.dtype)
        zero = torch.zeros_like(sx)
        theta = torch.stack([sx, zero, zero, zero, sy, zero], dim=1).view(-1, 2, 3)
        return _warp(x, theta)
    if op == "rotate":
        angle = params["angle"].to(device=x.device, dtype=x.dtype) * (math.pi / 180)
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        theta = torch.stack([cos, -sin, zero, sin, cos, zero], dim=1).view(-1, 2, 3)
        return _warp(x, theta)
    raise ValueError(f"Unknown DSA op {op!r}; choose from {', '.join(OPS)}.")


def _strategy_ops(strategy: Sequence[str]) -> list[str]:
    # Accept the DC-style string "color_crop_cutout" too; iterating it would give letters.
    ops = strategy.split("_") if isinstance(strategy, str) else list(strategy)
    if not ops:
        raise ValueError("The DSA strategy is empty; name at least one of " + ", ".join(OPS) + ".")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"Unknown DSA op(s) {unknown}; choose from {', '.join(OPS)}.")
    return ops


def _draw_op(ops: list[str], generator: torch.Generator) -> str:
    return ops[int(_randint(0, len(ops), 1, generator))]


def sample_siamese(
    strategy: Sequence[str], generator: torch.Generator, *, size: int
) -> tuple[str, dict[str, torch.Tensor]]:
    """Draw one op uniformly from `strategy` and its parameters for one image (every tensor [1]).

    Applied with `apply` to every real and synthetic image of a class under one probe.
    """
    op = _draw_op(_strategy_ops(strategy), generator)
    return op, sample(op, 1, generator, size=size)


def augment_batch(
    x: torch.Tensor, strategy: Sequence[str], generator: torch.Generator
) -> torch.Tensor:
    """Evaluation-time DSA: one op drawn per call, parameters per image; x [n, C, H, W] -> same.

    This is DM's `seed=-1` mode, used when training a network on the synthetic set.
    """
    op = _draw_op(_strategy_ops(strategy), generator)
    return apply(x, op, sample(op, x.shape[0], generator, size=x.shape[-1]))
