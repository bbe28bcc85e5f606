"""The probe bank: K fixed random networks, each with one Siamese augmentation per class and, for
M3D, random Fourier features. Everything is derived from (seed, probe, class) so any process on any
machine rebuilds the same probe without anything being shipped (DESIGN.md section 3).
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field

import torch

from condense_pipeline.condense import augment
from condense_pipeline.condense.networks import ConvNet
from condense_pipeline.condense.sampling import derive_seed
from condense_pipeline.errors import UserError
from condense_pipeline.pixels import normalise

# M3D's kernel is a sum of 5 Gaussians with bandwidths h*m (mul_factor 2 around the mean distance).
BANDWIDTH_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
STATISTICS = ("emb", "rff", "att")  # what a bank can hold: DM needs emb; M3D rff; DataDAM att + emb
# M3D also keeps the embedding sums: with the squared norms they give the exact bandwidth, to
# report how far the pilot's estimate was.
NEEDS = {"dm": ("emb",), "m3d": ("emb", "rff"), "datadam": ("att", "emb")}
# Random-feature bases kept per bank (host or device memory): 25 bases at D = 2048, R = 5120.
RFF_CACHE_BYTES = 2**30
_RFF_LOCK = threading.Lock()


@dataclass(frozen=True)
class BankSpec:
    """Everything the statistics depend on; saved as bank.json and compared before reuse."""

    seed: int
    probes: int
    num_classes: int
    channels: int
    resolution: int
    depth: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: tuple[str, ...]
    real_per_probe: int | None  # None: every image under every probe
    statistics: tuple[str, ...]  # a subset of STATISTICS
    rff_dim: int = 0
    attention_power: float = 1.0
    network: str = "convnet"
    extra: dict = field(default_factory=dict, compare=False)  # recorded, never compared

    def __post_init__(self):
        if "rff" in self.statistics and self.rff_dim % len(BANDWIDTH_MULTIPLIERS):
            raise UserError(f"--rff-dim must be a multiple of 5, got {self.rff_dim}")

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> BankSpec:
        d = dict(d)
        for name in ("mean", "std", "augment", "statistics"):
            d[name] = tuple(d[name])
        return BankSpec(**d)


class ProbeBank:
    """Builds probe k's network, augmentation and random features from the spec alone."""

    def __init__(self, spec: BankSpec, device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self._nets: dict[int, ConvNet] = {}
        self._rff: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._aug_ops, self._aug_params = self._augment_table()
        lo = [(0.0 - m) / s for m, s in zip(spec.mean, spec.std)]
        hi = [(1.0 - m) / s for m, s in zip(spec.mean, spec.std)]
        self.pixel_low = torch.tensor(lo, device=self.device).view(1, -1, 1, 1)
        self.pixel_high = torch.tensor(hi, device=self.device).view(1, -1, 1, 1)

    # -- networks ---------------------------------------------------------------------------
    def network(self, k: int) -> ConvNet:
        """Probe k's frozen network: default init on the CPU from (seed, k), then moved."""
        if k not in self._nets:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.spec.seed, "net", k))
                net = ConvNet(self.spec.channels, self.spec.resolution, depth=self.spec.depth)
            self._nets[k] = net.requires_grad_(False).to(self.device).eval()
        return self._nets[k]

    @property
    def embed_dim(self) -> int:
        return self.network(0).embed_dim

    # -- augmentation -----------------------------------------------------------------------
    def _augment_table(self):
        """One DSA op and parameter set per (probe, class), drawn from (seed, k, c)."""
        K, C, ops = self.spec.probes, self.spec.num_classes, self.spec.augment
        op_index = torch.empty(K, C, dtype=torch.long)
        params: dict[str, dict[str, torch.Tensor]] = {}
        for k in range(K):
            for c in range(C):
                g = torch.Generator().manual_seed(derive_seed(self.spec.seed, "aug", k, c))
                op, p = augment.sample_siamese(ops, g, size=self.spec.resolution)
                op_index[k, c] = ops.index(op)
                table = params.setdefault(op, {})
                for name, value in p.items():
                    if name not in table:
                        table[name] = torch.zeros((K, C, *value.shape[1:]), dtype=value.dtype)
                    table[name][k, c] = value[0]
        return op_index, params

    def augment(self, k: int, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Apply probe k's per-class Siamese transform: x [n, C, H, W], labels [n] (class ids)."""
        labels_cpu = labels.cpu()
        ops = self._aug_ops[k, labels_cpu]
        out = torch.zeros_like(x)
        for i, op in enumerate(self.spec.augment):
            sel = (ops == i).nonzero().squeeze(1)
            if len(sel) == 0:
                continue
            params = {name: t[k, labels_cpu[sel]] for name, t in self._aug_params[op].items()}
            sel = sel.to(x.device)
            out = out.index_copy(0, sel, augment.apply(x[sel], op, params))
        return out

    # -- random Fourier features ------------------------------------------------------------
    def rff_basis(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(G [D, R] standard normal, b [R] uniform in [0, 2pi)) for probe k, from (seed, k).

        Drawn on the CPU so every device gets the same matrix; scaled per class and bandwidth by
        `rff_scales`, never stored on disk (84 MB per probe at D = 2048, R = 10240). A draw
        costs about as much as 60 forwards at 32 px on a CPU, so callers visit the probes one
        after the other (PendingForwards, the condensation schedule), and the cache keeps the
        RFF_CACHE_BYTES of bases used last.
        """
        with _RFF_LOCK:  # a thread may be drawing the next probe's basis (PendingForwards)
            if k in self._rff:
                self._rff[k] = self._rff.pop(k)  # now the most recently used (dicts keep order)
                return self._rff[k]
        g = torch.Generator().manual_seed(derive_seed(self.spec.seed, "rff", k))
        basis = torch.randn(self.embed_dim, self.spec.rff_dim, generator=g)
        phase = torch.rand(self.spec.rff_dim, generator=g) * (2 * math.pi)
        drawn = (basis.to(self.device), phase.to(self.device))
        with _RFF_LOCK:
            while self._rff and (len(self._rff) + 1) * basis.nbytes > RFF_CACHE_BYTES:
                del self._rff[next(iter(self._rff))]  # the least recently used
            self._rff[k] = drawn
        return drawn

    def rff_scales(self, h: torch.Tensor) -> torch.Tensor:
        """Column scales sqrt(2 / (h m)) for bandwidths h [n] -> [n, R]: W = G * scale."""
        R_b = self.spec.rff_dim // len(BANDWIDTH_MULTIPLIERS)
        m = torch.tensor(BANDWIDTH_MULTIPLIERS, dtype=h.dtype, device=h.device)
        return torch.sqrt(2.0 / (h[:, None] * m[None, :])).repeat_interleave(R_b, dim=1)

    def rff(self, k: int, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """phi(u) [n, R] for embeddings u [n, D] with per-row bandwidths h [n]."""
        basis, phase = self.rff_basis(k)
        R_b = self.spec.rff_dim // len(BANDWIDTH_MULTIPLIERS)
        proj = (emb @ basis) * self.rff_scales(h.to(emb.dtype))
        return math.sqrt(2.0 / R_b) * torch.cos(proj + phase)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [n, H, W, C] -> float [n, C, H, W] in the bank's normalised space."""
        return normalise(
            images_uint8.to(self.device).permute(0, 3, 1, 2), self.spec.mean, self.spec.std
        )


def mean_pairwise_sqdist(emb: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal squared distance of the rows of each [n, D] slice of emb [..., n, D]."""
    n = emb.shape[-2]
    s1 = emb.sum(-2)
    s2 = (emb * emb).sum((-2, -1))
    return (2 * n * s2 - 2 * (s1 * s1).sum(-1)) / (n * (n - 1))


def pilot_bandwidths(bank: ProbeBank, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """M3D bandwidth h[k, c]: mean pairwise squared distance of class c's pilot embeddings under
    probe k (its network and its Siamese augmentation). images uint8 [n, H, W, C], labels [n]."""
    K, C = bank.spec.probes, bank.spec.num_classes
    x = bank.normalize(images)
    labels = labels.to(bank.device)
    h = torch.zeros(K, C, dtype=torch.float64)
    for k in range(K):
        with torch.no_grad():
            emb = bank.network(k).embed(bank.augment(k, x, labels)).double()
        for c in labels.unique().tolist():
            rows = emb[labels == c]
            if len(rows) < 2:
                raise UserError(f"class {c} has fewer than 2 images for the M3D bandwidth pilot")
            h[k, c] = mean_pairwise_sqdist(rows).cpu()
    return h
