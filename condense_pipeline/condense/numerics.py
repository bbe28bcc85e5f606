"""The float settings a device computes with, read where the computing happens (in a stats
worker, not the driver), for bank.json: with TF32 on, results differ at about 1e-3 relative."""

from __future__ import annotations

import torch


def numerics(device: str | torch.device) -> dict:
    """{"device": the kind ("cpu", "cuda"), "name": the CUDA device's name (else the kind),
    "matmul_tf32" and "cudnn_tf32": whether matrix products and cuDNN convolutions may use TF32
    there}. TF32 exists only on CUDA devices: on any other both flags are False."""
    device = torch.device(device)
    if device.type != "cuda":
        return {
            "device": device.type,
            "name": device.type,
            "matmul_tf32": False,
            "cudnn_tf32": False,
        }
    return {
        "device": "cuda",
        "name": torch.cuda.get_device_name(device),
        "matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
    }
