"""The ConvNet family of the DM/M3D/DataDAM code, and a registry that builds models by name.

ConvNet: blocks of Conv 3x3 (width 128) -> instance norm (GroupNorm(128, 128)) -> ReLU -> AvgPool 2,
depth by resolution; the embedding is the flattened output of the last pool. Instance norm keeps
every sample independent of the rest of its batch, which is what lets real statistics be summed
and classes be condensed together or apart with the same result.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from condense_pipeline.datasets import DEPTH_BY_RESOLUTION

WIDTH = 128


def _first_padding(resolution: int) -> int:
    # 28 px inputs (MNIST) get padding 3 so the network sees 32 px, as in the reference code.
    return 3 if resolution == 28 else 1


class ConvNet(nn.Module):
    """ConvNet-D with instance norm. `num_classes=None` builds the embedding network alone."""

    def __init__(
        self,
        channels: int,
        resolution: int,
        num_classes: int | None = None,
        depth: int | None = None,
        width: int = WIDTH,
    ):
        super().__init__()
        depth = depth or DEPTH_BY_RESOLUTION[resolution]
        blocks = []
        size = resolution + 2 * (_first_padding(resolution) - 1)
        for i in range(depth):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(
                        channels if i == 0 else width,
                        width,
                        3,
                        padding=_first_padding(resolution) if i == 0 else 1,
                    ),
                    nn.GroupNorm(width, width, affine=True),
                    nn.ReLU(inplace=False),
                )
            )
            size //= 2
        self.blocks = nn.ModuleList(blocks)
        self.embed_dim = width * size * size
        self.classifier = None if num_classes is None else nn.Linear(self.embed_dim, num_classes)

    def activations(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(embedding [n, D], post-ReLU pre-pool activations of every block [n, 128, H_l, W_l])."""
        acts = []
        for block in self.blocks:
            x = block(x)
            acts.append(x)
            x = F.avg_pool2d(x, 2)
        return x.flatten(1), acts

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding [n, D] of images [n, C, H, W]; no block's activation outlives its block."""
        for block in self.blocks:
            x = F.avg_pool2d(block(x), 2)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise RuntimeError("this ConvNet was built without a classifier head")
        return self.classifier(self.embed(x))


def attention_map(activation: torch.Tensor, power: float) -> torch.Tensor:
    """DataDAM's attention: L2-normalised channel sum of |f|^p. [n, C, H, W] -> [n, H*W]."""
    return F.normalize(activation.abs().pow(power).sum(1).flatten(1), dim=1)


def block_sizes(resolution: int, depth: int | None = None) -> list[int]:
    """Side of each block's activation map (before its pool)."""
    depth = depth or DEPTH_BY_RESOLUTION[resolution]
    size = resolution + 2 * (_first_padding(resolution) - 1)
    return [size // 2**i for i in range(depth)]


def attention_dims(resolution: int, depth: int | None = None) -> list[int]:
    """Sizes of the attention vectors DataDAM matches: every block but the last."""
    return [s * s for s in block_sizes(resolution, depth)[:-1]]


# (channels, resolution, num_classes); num_classes None: the embedding network alone (probes)
ModelFactory = Callable[[int, int, int | None], nn.Module]
MODELS: dict[str, ModelFactory] = {
    "convnet": lambda channels, resolution, num_classes: ConvNet(channels, resolution, num_classes),
}


def build_model(name: str, channels: int, resolution: int, num_classes: int) -> nn.Module:
    """A freshly initialised classifier from the registry."""
    from condense_pipeline.errors import UserError

    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](channels, resolution, num_classes)


_SEEDED_INIT = threading.Lock()


def seeded_model(
    name: str, seed: int, channels: int, resolution: int, num_classes: int | None = None
) -> nn.Module:
    """build_model with PyTorch's default init drawn on the CPU from `seed`, so that every process
    on every machine builds the same weights; the caller's global RNG is left as it was."""
    # The default init draws from PyTorch's one global generator: two threads building at once
    # (a GPU stats worker's flush and basis threads) would interleave their draws.
    with _SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name, channels, resolution, num_classes)


# Other architectures, for evaluating a condensed set across architectures: the small-image
# variants of the DC repo's networks.py. Its VGG and ResNet use instance norm (GroupNorm with one
# group per channel) and its AlexNet has no norm; both are kept. Two changes, so one class serves
# every resolution: 28 px inputs get the extra padding that makes them 32 px (as ConvNet does; the
# DC code keys this on one channel instead), and the classifier's input size follows from the
# resolution instead of being fixed for 32 px.


def _instance_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(channels, channels, affine=True)


class AlexNet(nn.Module):
    """The DC repo's AlexNet for 28/32 px: five convs, three max pools, one linear layer."""

    def __init__(self, channels: int, resolution: int, num_classes: int):
        super().__init__()
        # A 5x5 first conv needs one more pixel of padding than ConvNet's 3x3 to keep the size.
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, 5, padding=_first_padding(resolution) + 1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 192, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(192, 256, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 192, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(192, 192, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        size = (resolution + 2 * (_first_padding(resolution) - 1)) // 8
        self.fc = nn.Linear(192 * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """The DC repo's VGG11 with instance norm; five max pools, so it needs at least 28 px."""

    def __init__(self, channels: int, resolution: int, num_classes: int):
        super().__init__()
        size = (resolution + 2 * (_first_padding(resolution) - 1)) // 32
        if size == 0:
            from condense_pipeline.errors import UserError

            raise UserError(
                f"vgg11 needs images of at least 28 px, not {resolution}; use convnet or alexnet"
            )
        layers: list[nn.Module] = []
        in_channels = channels
        for i, width in enumerate(VGG11_LAYERS):
            if width == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            padding = _first_padding(resolution) if i == 0 else 1
            layers += [
                nn.Conv2d(in_channels, width, 3, padding=padding),
                _instance_norm(width),
                nn.ReLU(),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512 * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block, instance norm; a 1x1 conv shortcut when shapes change."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _instance_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.norm2 = _instance_norm(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), _instance_norm(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The DC repo's ResNet-18 for small images (3x3 stem, no stem pool) with instance norm."""

    def __init__(self, channels: int, resolution: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 3, padding=1, bias=False)
        self.norm1 = _instance_norm(64)
        blocks = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.norm1(self.conv1(x))))
        # The DC code averages a fixed 4x4 window, which is the whole 4x4 map at 28 and 32 px;
        # a global average is the same there and also works at other sizes.
        out = F.adaptive_avg_pool2d(out, 1)
        return self.classifier(out.flatten(1))


MODELS["alexnet"] = AlexNet
MODELS["vgg11"] = VGG11
MODELS["resnet18"] = ResNet18
