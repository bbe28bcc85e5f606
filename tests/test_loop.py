"""The condensation loop: grouping does not matter, resume is exact, each method makes progress."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import small_spec

from condense_pipeline.condense.bank import ProbeBank, pilot_bandwidths
from condense_pipeline.condense.loop import LoopState, condense_loop
from condense_pipeline.condense.stats import ClassStats, accumulate
from condense_pipeline.condense.synthetic import decode_factor, initial_images
from condense_pipeline.condense.targets import BankTargets, OnlineTargets
from condense_pipeline.config import condense_config
from condense_pipeline.datasets import get_profile

PROFILE = get_profile("digits")


@pytest.fixture(scope="module")
def bank_and_stats(digits):
    images, labels, keys = digits
    bank = ProbeBank(small_spec(probes=4))
    h = pilot_bandwidths(bank, images[:400], torch.from_numpy(labels[:400]))
    stats = ClassStats.zeros(bank, 8)
    accumulate(stats, bank, images, labels, keys, np.bincount(labels), h)
    return bank, stats, h


def _run(bank, stats, h, classes, cfg, steps=None, state=None):
    cfg = replace(cfg, steps=steps or cfg.steps)
    sel = stats.select(classes)
    if state is None:
        pools = [sel.pool(i)[0] for i in range(len(classes))]
        init = initial_images(
            pools, classes, cfg.ipc, cfg.factor, cfg.init, bank.normalize, torch.Generator()
        )
        state = LoopState(0, init, torch.zeros_like(init))
    targets = BankTargets(bank, sel, classes, h, cfg)
    lr = torch.full((1, 1, 1, 1), cfg.lr)
    return condense_loop(state, targets, cfg, lr, bank.pixel_low, bank.pixel_high, log_every=5)


@pytest.mark.parametrize("method", ["dm", "m3d", "datadam"])
def test_grouping_does_not_change_the_images(bank_and_stats, method):
    bank, stats, h = bank_and_stats
    cfg = condense_config(PROFILE, method, 2, steps=30, iters_per_probe=1)
    together = _run(bank, stats, h, [1, 4, 7], cfg).images
    alone = torch.cat([_run(bank, stats, h, [c], cfg).images for c in (1, 4, 7)])
    rel = (together - alone).abs().max() / together.abs().max()
    assert rel < 1e-4


def test_resume_gives_the_same_images(bank_and_stats):
    bank, stats, h = bank_and_stats
    cfg = condense_config(PROFILE, "m3d", 2, steps=20)
    straight = _run(bank, stats, h, [0, 3], cfg)
    half = _run(bank, stats, h, [0, 3], cfg, steps=10)
    resumed = _run(bank, stats, h, [0, 3], cfg, state=half)
    assert resumed.step == 20
    assert torch.equal(resumed.images, straight.images)


def _mean_bank_loss(bank, stats, h, classes, cfg, images):
    """The loss of `images` averaged over every probe of the bank (no step taken)."""
    targets = BankTargets(bank, stats.select(classes), classes, h, cfg)
    f2 = cfg.factor**2
    labels = torch.arange(len(classes)).repeat_interleave(cfg.ipc * f2)
    total = 0.0
    for k in range(bank.spec.probes):
        t = targets.at(targets.order.index(k) * cfg.iters_per_probe)
        with torch.no_grad():
            emb, acts = t.net.activations(t.augment(decode_factor(images, cfg.factor), labels))
            g = len(classes)
            total += t.loss(
                emb.view(g, -1, emb.shape[-1]), [a.view(g, -1, *a.shape[1:]) for a in acts]
            )
    return total / bank.spec.probes


@pytest.mark.parametrize("method", ["dm", "m3d", "datadam"])
def test_loss_falls_and_images_move(bank_and_stats, method):
    bank, stats, h = bank_and_stats
    classes = [0, 1, 2]
    cfg = condense_config(PROFILE, method, 2, steps=40)
    start = _run(bank, stats, h, classes, cfg, steps=1)  # a 1-step run gives the init back
    end = _run(bank, stats, h, classes, cfg)
    before = _mean_bank_loss(bank, stats, h, classes, cfg, start.images)
    after = _mean_bank_loss(bank, stats, h, classes, cfg, end.images)
    assert after < before
    assert (end.images - start.images).abs().mean() > 1e-3


@pytest.mark.parametrize("method", ["dm", "m3d", "datadam"])
def test_online_targets_run_every_method(digits, method):
    images, labels, _ = digits
    bank = ProbeBank(small_spec(probes=2))
    cfg = condense_config(PROFILE, method, 1, steps=3, batch_real=16)
    real = [images[labels == c] for c in (0, 1)]
    init = initial_images(
        [r[:4] for r in real], [0, 1], 1, cfg.factor, cfg.init, bank.normalize, torch.Generator()
    )
    state = LoopState(0, init, torch.zeros_like(init))
    lr = torch.full((1, 1, 1, 1), cfg.lr)
    out = condense_loop(
        state, OnlineTargets(real, bank, cfg), cfg, lr, bank.pixel_low, bank.pixel_high, log_every=1
    )
    assert len(out.history) == 3 and np.isfinite([r["loss"] for r in out.history]).all()
