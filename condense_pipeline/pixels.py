"""Pixels <-> the normalised space every network sees: the one place that maps between them.

Pixels are uint8 [n, C, H, W] in 0..255; normalised images are float32 [n, C, H, W],
(pixels / 255 - mean) / std per channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _channel(values: Sequence[float], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels [n, C, H, W] -> float32 [n, C, H, W]: (x / 255 - mean) / std."""
    device = pixels.device
    return (pixels.float() / 255.0 - _channel(mean, device)) / _channel(std, device)


def to_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised float [n, C, H, W] -> uint8 [n, C, H, W]: de-normalised, clamped, rounded."""
    device = images.device
    pixels = (images * _channel(std, device) + _channel(mean, device)) * 255
    return pixels.round().clamp(0, 255).to(torch.uint8)
