"""Where the condensation loop gets its real targets at each step.

BankTargets reads the probe bank's statistics (the default). OnlineTargets does what the papers
do: a fresh seeded network and a fresh real batch per class, with the papers' exact losses (M3D:
the exact kernel with its pooled bandwidth). Comparing the two measures what the bank costs.

Each method is one entry of METHODS: the per-image features its loss needs, and its loss against
the bank and against a real batch. The loss takes features, not activations, so the loop can
compute the features in chunks (condense/loop.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from condense_pipeline.condense import losses
from condense_pipeline.condense.bank import ProbeBank, SiameseTable
from condense_pipeline.condense.networks import ConvNet, attention_map, seeded_model
from condense_pipeline.condense.sampling import derive_seed
from condense_pipeline.condense.stats import ClassStats
from condense_pipeline.config import CondenseConfig
from condense_pipeline.errors import UserError

Features = list[torch.Tensor]  # per image: [m, D] embedding first, then any attention [m, A_l]


def embedding(net: ConvNet, x: torch.Tensor, power: float) -> Features:
    return [net.embed(x)]


def embedding_and_attention(net: ConvNet, x: torch.Tensor, power: float) -> Features:
    """The embedding and DataDAM's normalised attention of every block but the last."""
    emb, acts = net.activations(x)
    return [emb, *(attention_map(a, power) for a in acts[:-1])]


@dataclass(frozen=True)
class StepTargets:
    """What one step matches against.

    features(x [m, C, H, W] in normalised space, group_labels [m]) -> Features, the Siamese
    augmentation and the network applied; loss(features grouped [G, n, ...]) -> scalar.
    """

    features: Callable[[torch.Tensor, torch.Tensor], Features]
    loss: Callable[[Features], torch.Tensor]


def calibration_loss(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of grouped logits [G, n, C] against each group's class [G], summed over
    the classes of the mean over their images (as the matching losses sum class terms), so the
    value does not depend on how classes are grouped."""
    G, n, _ = logits.shape
    target = classes.to(logits.device).repeat_interleave(n)
    return F.cross_entropy(logits.reshape(G * n, -1), target, reduction="sum") / n


def calibrated(t: StepTargets, expert: torch.nn.Module, classes, weight: float) -> StepTargets:
    """DANCE's and NCFM's calibration: `t`'s loss + weight * the cross-entropy of the synthetic
    images (decoded, before the probe's augmentation) under a trained expert. The expert's
    logits ride along as one more per-image feature, so chunking keeps the gradient exact."""

    def features(x, group_labels):
        return [*t.features(x, group_labels), expert(x)]

    def loss(f):
        return t.loss(f[:-1]) + weight * calibration_loss(f[-1], classes).float()

    return StepTargets(features, loss)


def calibration_expert(num_experts: int, seed: int) -> int:
    """The expert the calibration uses, from the condensation seed."""
    return derive_seed(seed, "calibration") % num_experts


def probe_order(probes: int, seed: int) -> list[int]:
    """The seeded permutation of the bank that BankTargets cycles through."""
    g = torch.Generator().manual_seed(derive_seed(seed, "schedule"))
    return torch.randperm(probes, generator=g).tolist()


def scheduled_probe(order: list[int], step: int, iters_per_probe: int) -> int:
    """The probe used at (0-based) `step`: each for `iters_per_probe` consecutive steps."""
    return order[(step // iters_per_probe) % len(order)]


# -- the methods -------------------------------------------------------------------------------
# bank losses: (features [G, n, ...], BankTargets, probe k); online: (features, real [G, b, ...])


def _dm_bank(f: Features, t: BankTargets, k: int) -> torch.Tensor:
    return losses.dm_loss(f[0], t.mean(t.stats.emb_sum, k))


def _m3d_bank(f: Features, t: BankTargets, k: int) -> torch.Tensor:
    emb = f[0]
    G, m, D = emb.shape
    h = t.h[k].to(emb.device)
    phi = t.bank.rff(k, emb.reshape(G * m, D), h.repeat_interleave(m).float())
    mu_phi = t.mean(t.stats.rff_sum, k).float()
    return losses.m3d_rff_loss(emb, phi.view(G, m, -1), mu_phi, h.float())


def _datadam_bank(f: Features, t: BankTargets, k: int) -> torch.Tensor:
    att = [t.mean(a, k) for a in t.stats.att_sum]
    w = t.cfg.attention_weight, t.cfg.embedding_weight
    return losses.datadam_loss(f[1:], f[0], att, t.mean(t.stats.emb_sum, k), *w)


def _dm_online(f: Features, real: Features, cfg: CondenseConfig) -> torch.Tensor:
    return losses.dm_loss(f[0], real[0].mean(1))


def _m3d_online(f: Features, real: Features, cfg: CondenseConfig) -> torch.Tensor:
    return losses.m3d_exact_loss(f[0], real[0])


def _datadam_online(f: Features, real: Features, cfg: CondenseConfig) -> torch.Tensor:
    att = [a.mean(1) for a in real[1:]]
    w = cfg.attention_weight, cfg.embedding_weight
    return losses.datadam_loss(f[1:], f[0], att, real[0].mean(1), *w)


@dataclass(frozen=True)
class Method:
    features: Callable[[ConvNet, torch.Tensor, float], Features]
    bank_loss: Callable[[Features, BankTargets, int], torch.Tensor]
    online_loss: Callable[[Features, Features, CondenseConfig], torch.Tensor]


METHODS = {
    "dm": Method(embedding, _dm_bank, _dm_online),
    "m3d": Method(embedding, _m3d_bank, _m3d_online),
    "datadam": Method(embedding_and_attention, _datadam_bank, _datadam_online),
}


# -- the providers -----------------------------------------------------------------------------
class BankTargets:
    """Targets from the probe bank's statistics. The probe schedule is a seeded permutation of
    the bank, cycled, each probe used for `iters_per_probe` consecutive steps."""

    def __init__(
        self,
        bank: ProbeBank,
        stats: ClassStats,
        classes: list[int],
        bandwidths: torch.Tensor | None,
        cfg: CondenseConfig,
    ):
        self.bank, self.cfg, self.method = bank, cfg, METHODS[cfg.method]
        self.classes = torch.tensor(classes)
        self.stats = stats  # already restricted to `classes`
        self.h = None if bandwidths is None else bandwidths[:, self.classes]
        self.order = probe_order(bank.spec.probes, cfg.seed)
        self.expert = None
        if cfg.calibration:
            if bank.experts is None:
                raise UserError(
                    "--calibration needs trained probes: rerun stats with --trained-probes"
                )
            self.expert = bank.expert_classifier(calibration_expert(len(bank.experts), cfg.seed))

    def probe(self, step: int) -> int:
        return scheduled_probe(self.order, step, self.cfg.iters_per_probe)

    def mean(self, sums: torch.Tensor, k: int) -> torch.Tensor:
        """Class means [G, ...] of probe k's sums [K, G, ...]."""
        n = self.stats.count[k].to(self.bank.device).clamp(min=1)
        return sums[k].to(self.bank.device) / n.view(-1, *[1] * (sums.dim() - 2))

    def at(self, step: int) -> StepTargets:
        k, bank = self.probe(step), self.bank
        net, power = bank.network(k), bank.spec.attention_power

        def features(x, group_labels):
            return self.method.features(
                net, bank.augment(k, x, self.classes[group_labels.cpu()]), power
            )

        t = StepTargets(features, lambda f: self.method.bank_loss(f, self, k).float())
        if self.expert is None:
            return t
        return calibrated(t, self.expert, self.classes, self.cfg.calibration)


class OnlineTargets:
    """The papers' way: a fresh network (M3D: renewed every `iters_per_probe` steps) and a fresh
    real batch of `batch_real` images per class at every step, Siamese-augmented like the
    synthetic images. Everything a class gets is seeded by its class id, so the images do not
    depend on how classes are grouped. For datasets that fit in memory."""

    def __init__(
        self,
        real: list[torch.Tensor],
        classes: list[int],
        bank: ProbeBank,
        cfg: CondenseConfig,
        smallest_class: int,
    ):
        self.real = real  # per group class: uint8 [n_c, H, W, ch]
        self.classes = list(classes)
        self.bank, self.cfg = bank, cfg  # the bank gives the profile's network shape and norm
        self.method = METHODS[cfg.method]
        # one batch size for every class of the dataset (smallest_class: its smallest class's
        # images), so the class batches stack into [G, b, D] and do not depend on the grouping
        self.batch = min(cfg.batch_real, smallest_class)

    def at(self, step: int) -> StepTargets:
        spec, cfg, method = self.bank.spec, self.cfg, self.method
        renew = cfg.iters_per_probe if cfg.method == "m3d" else 1
        seed = derive_seed(cfg.seed, "online-net", step // renew)
        net = seeded_model(spec.network, seed, spec.channels, spec.resolution)
        net = net.requires_grad_(False).to(self.bank.device)
        seeds = [derive_seed(cfg.seed, "online-aug", step, c) for c in self.classes]
        siamese = SiameseTable(spec.augment, seeds, spec.resolution)

        def features(x, group_labels):
            return method.features(net, siamese.apply(x, group_labels.cpu()), spec.attention_power)

        per_class = []
        for i, (c, images) in enumerate(zip(self.classes, self.real)):
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "online-batch", step, c))
            pick = torch.randperm(len(images), generator=g)[: self.batch]
            with torch.no_grad():
                per_class.append(
                    features(self.bank.normalize(images[pick]), torch.full((len(pick),), i))
                )
        real = [torch.stack(f) for f in zip(*per_class)]
        return StepTargets(features, lambda f: method.online_loss(f, real, cfg))
