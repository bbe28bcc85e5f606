"""Losses against hand-computed values, and M3D's random-feature loss against the exact kernel."""

import math
from dataclasses import replace

import torch
from conftest import small_spec

from condense_pipeline.condense import losses
from condense_pipeline.condense.bank import BANDWIDTH_MULTIPLIERS, ProbeBank

KERNEL_AT_1 = sum(math.exp(-1 / m) for m in BANDWIDTH_MULTIPLIERS)  # d^2 = h = 1


def test_dm_loss_by_hand():
    syn = torch.tensor([[[1.0, 0.0], [3.0, 2.0]]])  # mean (2, 1)
    assert losses.dm_loss(syn, torch.zeros(1, 2)).item() == 5.0
    assert losses.dm_loss(syn, torch.tensor([[2.0, 1.0]])).item() == 0.0


def test_gaussian_kernel_by_hand():
    k = losses.gaussian_kernel(torch.zeros(1, 1, 1), torch.ones(1, 1, 1), torch.tensor([1.0]))
    assert math.isclose(k.item(), KERNEL_AT_1, rel_tol=1e-6)
    assert losses.gaussian_kernel(torch.ones(1, 1, 3), torch.ones(1, 1, 3), torch.ones(1)) == 5


def test_m3d_exact_loss_by_hand():
    # one synthetic and one real point at distance 1: pooled bandwidth h = 1
    y, r = torch.zeros(1, 1, 1), torch.ones(1, 1, 1)
    assert math.isclose(losses.m3d_exact_loss(y, r).item(), 10 - 2 * KERNEL_AT_1, rel_tol=1e-6)


def test_m3d_rff_loss_by_hand():
    y = torch.zeros(1, 1, 3)
    phi = torch.tensor([[[0.5, 1.0]]])
    mu = torch.tensor([[2.0, -1.0]])
    # self term k(y, y) = 5; cross term phi . mu = 0
    assert losses.m3d_rff_loss(y, phi, mu, torch.ones(1)).item() == 5.0
    mu = torch.tensor([[2.0, 1.0]])
    assert losses.m3d_rff_loss(y, phi, mu, torch.ones(1)).item() == 5.0 - 2 * 2.0


def test_datadam_loss_by_hand():
    att = [torch.tensor([[[1.0, 0.0]]])]
    emb = torch.tensor([[[1.0, 1.0]]])
    got = losses.datadam_loss(att, emb, [torch.tensor([[0.0, 0.0]])], torch.zeros(1, 2), 100, 1)
    assert got.item() == 100 * 1.0 + 1 * 2.0


def _rff_grad(bank, y, real, h):
    y = y.clone().requires_grad_(True)
    hy, hr = h.expand(len(y)), h.expand(len(real))
    mu = bank.rff(0, real, hr).mean(0, keepdim=True)
    loss = losses.m3d_rff_loss(y[None], bank.rff(0, y, hy)[None], mu, h)
    return torch.autograd.grad(loss, y)[0]


def _setup():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(6, 512, generator=g)
    real = torch.randn(60, 512, generator=g) * 1.1 + 0.2
    h = torch.tensor([2.0 * 512])
    yy = y.clone().requires_grad_(True)
    exact = (
        losses.gaussian_kernel(yy[None], yy[None], h).mean()
        - 2 * losses.gaussian_kernel(yy[None], real[None], h).mean()
    )
    return y, real, h, torch.autograd.grad(exact, yy)[0]


def test_rff_gradient_matches_exact_on_average():
    y, real, h, exact = _setup()
    spec = replace(small_spec(), rff_dim=2000)
    grads = [_rff_grad(ProbeBank(replace(spec, seed=s)), y, real, h) for s in range(60)]
    mean = torch.stack(grads).mean(0)
    cos = torch.nn.functional.cosine_similarity(mean.flatten(), exact.flatten(), dim=0)
    assert cos > 0.9


def test_rff_gradient_error_shrinks_with_r():
    y, real, h, exact = _setup()

    def err(R):
        spec = replace(small_spec(), rff_dim=R)
        gs = [_rff_grad(ProbeBank(replace(spec, seed=s)), y, real, h) for s in range(6)]
        return sum((g - exact).norm() for g in gs) / len(gs)

    assert err(10000) < 0.6 * err(500)
