"""The synthetic set's parameterisation: initialisation and multi-formation (IDC/M3D "factor")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from condense_pipeline.config import init_images

INITS = ("real", "noise", "mix")


def decode_factor(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Split each stored image into factor x factor patches, each upsampled to full size.

    x [n, C, H, W] -> [n * f^2, C, H, W]; the f^2 images of a stored image stay contiguous, so a
    set ordered by class stays ordered by class.
    """
    if factor == 1:
        return x
    n, c, h, w = x.shape
    p, q = h // factor, w // factor
    patches = x.view(n, c, factor, p, factor, q).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(n * factor * factor, c, p, q)
    return F.interpolate(patches, size=(h, w), mode="bilinear", align_corners=False)


def initial_images(
    pools: list[torch.Tensor],
    ipc: int,
    factor: int,
    init: str,
    normalize,
    generator: torch.Generator,
) -> torch.Tensor:
    """Synthetic images [G * ipc, C, H, W] in normalised space, in the order of `pools`.

    pools[i]: uint8 [P, H, W, ch] real images of the i-th class, smallest key hash first;
    normalize: uint8 [n, H, W, ch] -> float [n, C, H, W].
    """
    need = init_images(ipc, factor, init)  # config.check_pool has made sure each pool has it
    out = []
    for pool in pools:
        if init == "noise":
            shape = (ipc, pool.shape[3], pool.shape[1], pool.shape[2])
            out.append(torch.randn(shape, generator=generator))
        elif init == "real":
            out.append(normalize(pool[:ipc]).cpu())
        else:  # mix: f^2 real images, each shrunk to 1/f, tiled into one stored image
            x = normalize(pool[:need]).cpu()
            n, c, h, w = x.shape
            small = F.interpolate(x, size=(h // factor, w // factor), mode="area")
            tiles = small.view(ipc, factor, factor, c, h // factor, w // factor)
            out.append(tiles.permute(0, 3, 1, 4, 2, 5).reshape(ipc, c, h, w))
    return torch.cat(out)
