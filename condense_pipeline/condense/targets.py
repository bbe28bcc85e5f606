"""Where the condensation loop gets its real targets at each step.

BankTargets reads the probe bank's statistics (the default). OnlineTargets does what the papers
do: a fresh seeded network and a fresh real batch per class, with the papers' exact losses (M3D:
the exact kernel with its pooled bandwidth). Comparing the two measures what the bank costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from condense_pipeline.condense import augment, losses
from condense_pipeline.condense.bank import ProbeBank
from condense_pipeline.condense.networks import ConvNet, attention_map
from condense_pipeline.condense.sampling import derive_seed
from condense_pipeline.condense.stats import ClassStats
from condense_pipeline.config import CondenseConfig


@dataclass
class StepTargets:
    """What one step matches against: a network, the Siamese augmentation, and the loss.

    augment(x [m, C, H, W], group_labels [m]) -> x'; loss(emb [G, n, D], acts) -> scalar, where
    acts[l] is [G, n, 128, H_l, W_l] for every block.
    """

    net: ConvNet
    augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    loss: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]


def probe_order(probes: int, seed: int) -> list[int]:
    """The seeded permutation of the bank that BankTargets cycles through."""
    g = torch.Generator().manual_seed(derive_seed(seed, "schedule"))
    return torch.randperm(probes, generator=g).tolist()


def scheduled_probe(order: list[int], step: int, iters_per_probe: int) -> int:
    """The probe used at (0-based) `step`: each for `iters_per_probe` consecutive steps."""
    return order[(step // iters_per_probe) % len(order)]


def _attention(acts: list[torch.Tensor], power: float) -> list[torch.Tensor]:
    """Normalised attention of every block but the last: [G, n, A_l] each."""
    return [attention_map(a.flatten(0, 1), power).view(*a.shape[:2], -1) for a in acts[:-1]]


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
        self.bank, self.cfg = bank, cfg
        self.classes = torch.tensor(classes)
        self.stats = stats  # already restricted to `classes`
        self.h = None if bandwidths is None else bandwidths[:, self.classes]
        self.order = probe_order(bank.spec.probes, cfg.seed)

    def probe(self, step: int) -> int:
        return scheduled_probe(self.order, step, self.cfg.iters_per_probe)

    def at(self, step: int) -> StepTargets:
        k, s, bank, cfg = self.probe(step), self.stats, self.bank, self.cfg
        dev = bank.device
        n = s.count[k].to(dev).clamp(min=1)[:, None]

        def aug(x, group_labels):
            return bank.augment(k, x, self.classes[group_labels.cpu()])

        def loss(emb, acts):
            if cfg.method == "dm":
                return losses.dm_loss(emb, s.emb_sum[k].to(dev) / n)
            if cfg.method == "m3d":
                G, m, D = emb.shape
                h = self.h[k].to(dev)
                phi = bank.rff(k, emb.reshape(G * m, D), h.repeat_interleave(m).float())
                mu_phi = s.rff_sum[k].to(dev) / n
                return losses.m3d_rff_loss(emb, phi.view(G, m, -1), mu_phi.float(), h.float())
            att = _attention(acts, bank.spec.attention_power)
            mu_att = [a[k].to(dev) / n for a in s.att_sum]
            return losses.datadam_loss(
                att,
                emb,
                mu_att,
                s.emb_sum[k].to(dev) / n,
                cfg.attention_weight,
                cfg.embedding_weight,
            )

        return StepTargets(bank.network(k), aug, lambda e, a: loss(e, a).float())


class OnlineTargets:
    """The papers' way: a fresh network (M3D: renewed every `iters_per_probe` steps) and a fresh
    real batch of `batch_real` images per class at every step, Siamese-augmented like the
    synthetic images. For datasets that fit in memory."""

    def __init__(
        self,
        real: list[torch.Tensor],
        bank: ProbeBank,
        cfg: CondenseConfig,
    ):
        self.real = real  # per group class: uint8 [n_c, H, W, ch]
        self.bank, self.cfg = bank, cfg  # the bank gives the profile's network shape and norm
        # the same batch size for every class, so the class batches stack into [G, b, D]
        self.batch = min(cfg.batch_real, *(len(r) for r in real))

    def at(self, step: int) -> StepTargets:
        spec, cfg, dev = self.bank.spec, self.cfg, self.bank.device
        renew = cfg.iters_per_probe if cfg.method == "m3d" else 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "online-net", step // renew))
            net = ConvNet(spec.channels, spec.resolution, depth=spec.depth)
        net = net.requires_grad_(False).to(dev)
        transforms = []
        for c in range(len(self.real)):
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "online-aug", step, c))
            transforms.append(augment.sample_siamese(spec.augment, g, size=spec.resolution))

        def aug(x, group_labels):
            out = torch.zeros_like(x)
            for c, (op, params) in enumerate(transforms):
                sel = (group_labels == c).nonzero().squeeze(1).to(x.device)
                if len(sel) == 0:
                    continue
                out = out.index_copy(0, sel, augment.apply(x[sel], op, params))
            return out

        feats = []
        for c, images in enumerate(self.real):
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "online-batch", step, c))
            pick = torch.randperm(len(images), generator=g)[: self.batch]
            x = self.bank.normalize(images[pick])
            with torch.no_grad():
                feats.append(net.activations(aug(x, torch.full((len(x),), c))))
        real_emb = torch.stack([f[0] for f in feats])
        real_acts = [torch.stack([f[1][i] for f in feats]) for i in range(len(feats[0][1]))]

        def loss(emb, acts):
            if cfg.method == "dm":
                return losses.dm_loss(emb, real_emb.mean(1))
            if cfg.method == "m3d":
                return losses.m3d_exact_loss(emb, real_emb)
            p = spec.attention_power
            real_att = [a.mean(1) for a in _attention(real_acts, p)]
            return losses.datadam_loss(
                _attention(acts, p),
                emb,
                real_att,
                real_emb.mean(1),
                cfg.attention_weight,
                cfg.embedding_weight,
            )

        return StepTargets(net, aug, loss)
