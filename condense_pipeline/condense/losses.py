"""Matching losses, summed over the classes of a group.

Synthetic features arrive grouped by class: [G, n, ...] (G classes, n images each): the embeddings
and, for DataDAM, the normalised attention maps, never the block activations, so that the loop can
compute them in chunks and backpropagate the loss's feature gradients chunk by chunk. Real targets
are class means computed from the statistics (mu = sum / count) or, in the online reference mode,
from a fresh real batch.
"""

from __future__ import annotations

import torch

from condense_pipeline.condense.bank import BANDWIDTH_MULTIPLIERS, mean_pairwise_sqdist


def dm_loss(syn_emb: torch.Tensor, real_mean: torch.Tensor) -> torch.Tensor:
    """DM: sum_c ||mu_c - mean_i psi(s_i)||^2. syn_emb [G, n, D], real_mean [G, D] -> scalar."""
    return ((real_mean - syn_emb.mean(1)) ** 2).sum()


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """M3D's kernel sum_m exp(-||u - v||^2 / (h m)), m in {1/4, 1/2, 1, 2, 4}.

    a [G, n, D], b [G, p, D], h [G] -> [G, n, p], values in (0, 5].
    """
    d2 = torch.cdist(a, b).pow(2)
    h = h.view(-1, 1, 1)
    return sum(torch.exp(-d2 / (h * m)) for m in BANDWIDTH_MULTIPLIERS)


def m3d_rff_loss(
    syn_emb: torch.Tensor, syn_phi: torch.Tensor, real_phi_mean: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """M3D against statistics: sum_c [mean k(y, y') - 2 mean_i phi(y_i) . mu_phi,c].

    The synthetic-synthetic term is exact; the cross term uses the random Fourier features, whose
    real side is a class mean (the real-real term is a constant and is left out).
    syn_emb [G, n, D], syn_phi [G, n, R], real_phi_mean [G, R], h [G] -> scalar.
    """
    self_term = gaussian_kernel(syn_emb, syn_emb, h).mean((1, 2))
    cross = (syn_phi.mean(1) * real_phi_mean).sum(-1)
    return (self_term - 2 * cross).sum()


def m3d_exact_loss(syn_emb: torch.Tensor, real_emb: torch.Tensor) -> torch.Tensor:
    """M3D as its code computes it: biased MMD^2 with the 5-Gaussian kernel and, per class, the
    bandwidth h = mean off-diagonal squared distance of the pooled [Y; R] (no gradient through h).
    syn_emb [G, n, D], real_emb [G, p, D] -> scalar."""
    pooled = torch.cat([syn_emb, real_emb], 1).detach().double()
    h = mean_pairwise_sqdist(pooled).to(syn_emb.dtype)
    xx = gaussian_kernel(syn_emb, syn_emb, h).mean((1, 2))
    xy = gaussian_kernel(syn_emb, real_emb, h).mean((1, 2))
    yy = gaussian_kernel(real_emb, real_emb, h).mean((1, 2))
    return (xx - 2 * xy + yy).sum()


def datadam_loss(
    syn_att: list[torch.Tensor],
    syn_emb: torch.Tensor,
    real_att_mean: list[torch.Tensor],
    real_emb_mean: torch.Tensor,
    attention_weight: float,
    embedding_weight: float,
) -> torch.Tensor:
    """DataDAM: w_att sum_l ||mu_att,l - mean z_l(s)||^2 + w_emb ||mu_emb - mean psi(s)||^2.

    syn_att[l] [G, n, A_l] (normalised attention of block l < L), syn_emb [G, n, D],
    real_att_mean[l] [G, A_l], real_emb_mean [G, D] -> scalar.
    """
    att = sum(((r - s.mean(1)) ** 2).sum() for s, r in zip(syn_att, real_att_mean))
    return attention_weight * att + embedding_weight * dm_loss(syn_emb, real_emb_mean)
