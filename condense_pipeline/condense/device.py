"""How many synthetic images a device can put through one forward and backward at once.

The condensation loop forwards a group's images in chunks of this size (condense/loop.py), so the
memory a step takes is set by the chunk, not by the group's classes x IPC x factor^2.
"""

from __future__ import annotations

import torch

from condense_pipeline.condense.networks import WIDTH, block_sizes

# What autograd holds per image, in block activations (WIDTH x s_l x s_l float32 each): the conv
# output (instance norm's input), the norm's output (ReLU's), the ReLU's output (the pool's) and
# the pooled input of the next conv, plus the gradient buffers of the block being backpropagated.
# 3.5 copies give 9.3 MiB per image at 64 px, against the 8.9 MiB measured (docs/scaling.md).
ACTIVATION_COPIES = 3.5
# DataDAM's attention (|f|^p, its channel sum and the normalisation) keeps about two more copies.
ATTENTION_COPIES = 2.0
SAFETY = 0.5  # the share of the free memory a chunk may take: the rest is for what we did not count


def image_bytes(resolution: int, depth: int, attention: bool = False) -> int:
    """Bytes one synthetic training image holds through forward and backward."""
    copies = ACTIVATION_COPIES + (ATTENTION_COPIES if attention else 0.0)
    return int(copies * 4 * WIDTH * sum(s * s for s in block_sizes(resolution, depth)))


def free_bytes(device: torch.device) -> int:
    """Free memory of the device: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def chunk_size(device: torch.device, per_image: int, share: float = 1.0) -> int:
    """Images per chunk: SAFETY x `share` of the device's free memory over `per_image` bytes
    (share < 1 where several tasks use one device's memory at once)."""
    return max(1, int(SAFETY * share * free_bytes(device) // per_image))
