"""The probe bank: K fixed random networks, each with one Siamese augmentation per class and, for
M3D, random Fourier features. Everything is derived from (seed, probe, class) so any process on any
machine rebuilds the same probe without anything being shipped (DESIGN.md section 3). The first
`trained` probes are blends of trained experts instead (condense/experts.py): their expert and
blend come from (seed, probe) too, their weights from the run directory's experts.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field

import torch

from condense_pipeline.condense import augment
from condense_pipeline.condense.experts import Experts, load_experts
from condense_pipeline.condense.networks import ConvNet, seeded_model
from condense_pipeline.condense.sampling import derive_seed
from condense_pipeline.errors import UserError
from condense_pipeline.pixels import normalise

# M3D's kernel is a sum of 5 Gaussians with bandwidths h*m (mul_factor 2 around the mean distance).
BANDWIDTH_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
STATISTICS = ("emb", "rff", "att")  # what a bank can hold: DM needs emb; M3D rff; DataDAM att + emb
# M3D also keeps the embedding sums: with the squared norms they give the exact bandwidth, to
# report how far the pilot's estimate was.
NEEDS = {"dm": ("emb",), "m3d": ("emb", "rff"), "datadam": ("att", "emb")}
# Random-feature bases kept per bank (host or device memory): 128 bases at D = 2048, R = 5120.
RFF_CACHE_BYTES = 2**30
_RFF_LOCK = threading.Lock()
TRAINED_FIELDS = ("trained", "experts", "experts_fingerprint")  # BankSpec's, left out when 0


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
    pilot_per_class: int = 0  # M3D: images per class of the bandwidth pilot (0 without rff)
    extra: dict = field(default_factory=dict, compare=False)  # recorded, never compared
    # probes 0..trained-1 blend one of `experts` experts whose weights have this fingerprint
    trained: int = 0
    experts: int = 0
    experts_fingerprint: str = ""

    def __post_init__(self):
        if "rff" in self.statistics and self.rff_dim % len(BANDWIDTH_MULTIPLIERS):
            raise UserError(f"--rff-dim must be a multiple of 5, got {self.rff_dim}")
        if "rff" in self.statistics and self.pilot_per_class < 2:
            raise UserError("the M3D bandwidth pilot needs at least 2 images per class")
        if self.trained and not (self.experts and self.experts_fingerprint):
            raise UserError("trained probes need experts: run `condense-pipeline train-probes`")

    def to_json(self) -> dict:
        d = asdict(self)
        if not d["pilot_per_class"]:
            del d["pilot_per_class"]  # so banks without M3D keep the fingerprint they had
        if not self.trained:  # a random bank's bank.json (and fingerprint) as before trained probes
            for name in TRAINED_FIELDS:
                del d[name]
        return d

    def trained_probe(self, k: int) -> tuple[int, float]:
        """(expert, beta) of trained probe k, from (seed, k): theta = beta * theta_init +
        (1 - beta) * theta_final, beta uniform in [0, 1) as DANCE and NCFM draw it."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "trained", k))
        expert = int(torch.randint(self.experts, (1,), generator=g))
        return expert, float(torch.rand(1, generator=g, dtype=torch.float64))

    @staticmethod
    def from_json(d: dict) -> BankSpec:
        d = dict(d)
        for name in ("mean", "std", "augment", "statistics"):
            d[name] = tuple(d[name])
        return BankSpec(**d)


class ProbeBank:
    """Builds probe k's network, augmentation and random features from the spec alone (and, for
    trained probes, the experts at `experts`: the run directory's experts folder)."""

    def __init__(
        self, spec: BankSpec, device: str | torch.device = "cpu", experts: str | None = None
    ):
        self.spec = spec
        self.device = torch.device(device)
        self.experts: Experts | None = None
        if spec.trained:
            if experts is None:
                raise UserError("this bank has trained probes: give the experts' folder")
            self.experts = load_experts(experts, spec.experts, spec.experts_fingerprint)
        self._nets: dict[int, ConvNet] = {}
        self._rff: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # row k * C + c: probe k's transform of class c
        seeds = [
            derive_seed(spec.seed, "aug", k, c)
            for k in range(spec.probes)
            for c in range(spec.num_classes)
        ]
        self._siamese = SiameseTable(spec.augment, seeds, spec.resolution)
        lo = [(0.0 - m) / s for m, s in zip(spec.mean, spec.std)]
        hi = [(1.0 - m) / s for m, s in zip(spec.mean, spec.std)]
        self.pixel_low = torch.tensor(lo, device=self.device).view(1, -1, 1, 1)
        self.pixel_high = torch.tensor(hi, device=self.device).view(1, -1, 1, 1)

    # -- networks ---------------------------------------------------------------------------
    def network(self, k: int) -> ConvNet:
        """Probe k's frozen network (the spec's registry model, embedding only), seeded by
        (seed, k)."""
        if k not in self._nets:
            s = self.spec
            net = seeded_model(s.network, derive_seed(s.seed, "net", k), s.channels, s.resolution)
            if k < s.trained:
                expert, beta = s.trained_probe(k)
                weights = self.experts.blend(expert, beta)
                net.load_state_dict({n: w for n, w in weights.items() if n in net.state_dict()})
            self._nets[k] = net.requires_grad_(False).to(self.device).eval()
        return self._nets[k]

    def expert_classifier(self, e: int) -> torch.nn.Module:
        """Expert e's trained classifier (frozen), for the calibration loss."""
        s = self.spec
        net = seeded_model(s.network, 0, s.channels, s.resolution, s.num_classes)
        net.load_state_dict(self.experts.final[e])
        return net.requires_grad_(False).to(self.device).eval()

    @property
    def embed_dim(self) -> int:
        return self.network(0).embed_dim

    # -- augmentation -----------------------------------------------------------------------
    def augment(self, k: int, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Apply probe k's per-class Siamese transform: x [n, C, H, W], labels [n] (class ids)."""
        return self._siamese.apply(x, k * self.spec.num_classes + labels.cpu())

    # -- random Fourier features ------------------------------------------------------------
    def rff_basis(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(G [D, R / 5] standard normal, b [R] uniform in [0, 2pi)) for probe k, from (seed, k).

        The five bandwidth blocks share G, each scaling it by its own bandwidth: each block alone
        is an unbiased feature map of its Gaussian, and sharing draws and projects a fifth as
        much (a draw of 2048 x 1024 normals costs about 12 forwards at 32 px on a CPU). Drawn on
        the CPU so every device gets the same matrix, never stored on disk; the cache keeps the
        RFF_CACHE_BYTES of bases used last, and callers visit the probes one after the other
        (PendingForwards, the condensation schedule).
        """
        with _RFF_LOCK:  # a thread may be drawing the next probe's basis (PendingForwards)
            if k in self._rff:
                self._rff[k] = self._rff.pop(k)  # now the most recently used (dicts keep order)
                return self._rff[k]
        g = torch.Generator().manual_seed(derive_seed(self.spec.seed, "rff", k))
        block = self.spec.rff_dim // len(BANDWIDTH_MULTIPLIERS)
        basis = torch.randn(self.embed_dim, block, generator=g)
        phase = torch.rand(self.spec.rff_dim, generator=g) * (2 * math.pi)
        drawn = (basis.to(self.device), phase.to(self.device))
        with _RFF_LOCK:
            while self._rff and (len(self._rff) + 1) * basis.nbytes > RFF_CACHE_BYTES:
                del self._rff[next(iter(self._rff))]  # the least recently used
            self._rff[k] = drawn
        return drawn

    def rff(self, k: int, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """phi(u) [n, R] for embeddings u [n, D] with per-row bandwidths h [n]: block m is
        sqrt(2 / R_b) cos(u G sqrt(2 / (h m)) + b_m)."""
        basis, phase = self.rff_basis(k)
        n, block = len(emb), basis.shape[1]
        m = torch.tensor(BANDWIDTH_MULTIPLIERS, dtype=emb.dtype, device=emb.device)
        scales = torch.sqrt(2.0 / (h.to(emb.dtype)[:, None] * m[None, :]))  # [n, 5]
        proj = ((emb @ basis)[:, None, :] * scales[:, :, None]).reshape(n, -1)
        return math.sqrt(2.0 / block) * torch.cos(proj + phase)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [n, H, W, C] -> float [n, C, H, W] in the bank's normalised space."""
        return normalise(
            images_uint8.to(self.device).permute(0, 3, 1, 2), self.spec.mean, self.spec.std
        )


class SiameseTable:
    """One DSA op and its parameters per row, row i drawn from its own seed `seeds[i]`, applied
    to every image that names row i: the same transform for real and synthetic images of a class
    whenever they name the same row (a probe's class, or the online reference's class at a step).
    """

    def __init__(self, ops: tuple[str, ...], seeds: list[int], size: int):
        self.ops = ops
        self.op_index = torch.empty(len(seeds), dtype=torch.long)
        self.params: dict[str, dict[str, torch.Tensor]] = {}  # op -> name -> [rows, ...]
        for row, seed in enumerate(seeds):
            op, p = augment.sample_siamese(ops, torch.Generator().manual_seed(seed), size=size)
            self.op_index[row] = ops.index(op)
            table = self.params.setdefault(op, {})
            for name, value in p.items():
                if name not in table:
                    table[name] = torch.zeros((len(seeds), *value.shape[1:]), dtype=value.dtype)
                table[name][row] = value[0]

    def apply(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """x [n, C, H, W], rows [n] (CPU) -> each image under its row's transform."""
        ops = self.op_index[rows]
        out = torch.zeros_like(x)
        for i, op in enumerate(self.ops):
            sel = (ops == i).nonzero().squeeze(1)
            if len(sel) == 0:
                continue
            params = {name: t[rows[sel]] for name, t in self.params[op].items()}
            sel = sel.to(x.device)
            out = out.index_copy(0, sel, augment.apply(x[sel], op, params))
        return out


def mean_sqdist_from_sums(
    n: torch.Tensor, total: torch.Tensor, sqnorm_total: torch.Tensor
) -> torch.Tensor:
    """Mean off-diagonal squared distance of n points from their sum [..., D] and the sum of
    their squared norms [...]: sum_(i != j) ||u_i - u_j||^2 = 2 n sum ||u||^2 - 2 ||sum u||^2.
    The one bandwidth formula: the pilot, the exact bandwidth of the statistics and the online
    M3D loss all use it. Fewer than 2 points give 0 / 1 = 0."""
    pairs = torch.as_tensor(n * (n - 1), dtype=total.dtype, device=total.device).clamp(min=1)
    squared_total = torch.linalg.vector_norm(total, dim=-1).square()  # no [..., D] temporary
    return (2 * n * sqnorm_total - 2 * squared_total) / pairs


def mean_pairwise_sqdist(emb: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal squared distance of the rows of each [n, D] slice of emb [..., n, D]."""
    return mean_sqdist_from_sums(emb.shape[-2], emb.sum(-2), (emb * emb).sum((-2, -1)))


PILOT_CHUNK = 512  # pilot images per forward: bounded memory whatever the class count


def pilot_size(real_per_probe: int | None) -> int:
    """Pilot images per class: 32, but at most a quarter of the images each probe takes from a
    class (and at least 8), so that the pilot's forwards cost at most a quarter of the pass's.
    At M = 32 (the 32 px profiles) a 32-image pilot forwards as much as the whole pass; from 8
    images the median bandwidth lands within a few per cent of the pass's exact one
    (benchmarks/RESULTS.md, "The M3D pilot")."""
    if real_per_probe is None:
        return 32
    return min(32, max(8, real_per_probe // 4))


def pilot_bandwidths(
    bank: ProbeBank, images: torch.Tensor, labels: torch.Tensor, chunk: int = PILOT_CHUNK
) -> torch.Tensor:
    """M3D bandwidth h[k, c]: mean pairwise squared distance of class c's pilot embeddings under
    probe k (its network and its Siamese augmentation). images uint8 [n, H, W, C], labels [n].

    Chunks of `chunk` images are normalised and embedded without keeping activations; per class,
    only float64 sums (count, sum, sum of squared norms) are kept, so memory is bounded by the
    chunk and the classes x D sums, and the result equals one batch's up to float32 batching."""
    K, C = bank.spec.probes, bank.spec.num_classes
    counts = torch.bincount(labels.cpu(), minlength=C)
    few = [c for c in labels.unique().tolist() if counts[c] < 2]
    if few:
        raise UserError(f"class {few[0]} has fewer than 2 images for the M3D bandwidth pilot")
    present = counts > 0
    h = torch.zeros(K, C, dtype=torch.float64)
    f64 = dict(dtype=torch.float64, device=bank.device)
    for k in range(K):
        total = torch.zeros(C, bank.embed_dim, **f64)
        sqnorm = torch.zeros(C, **f64)
        for i in range(0, len(images), chunk):
            lab = labels[i : i + chunk].cpu()
            with torch.no_grad():
                x = bank.augment(k, bank.normalize(images[i : i + chunk]), lab)
                emb = bank.network(k).embed(x).double()
            lab = lab.to(bank.device)
            total.index_add_(0, lab, emb)
            sqnorm.index_add_(0, lab, (emb * emb).sum(1))
        n = counts.to(bank.device, torch.float64)
        h[k] = torch.where(present, mean_sqdist_from_sums(n, total, sqnorm).cpu(), 0.0)
    return h
