"""The probe bank: reproducible probes, the subsampling rule, and M3D's random features."""

import subprocess
import sys

import numpy as np
import torch
from conftest import small_spec

from condense_pipeline.condense.bank import ProbeBank, pilot_bandwidths, pilot_size
from condense_pipeline.condense.losses import gaussian_kernel
from condense_pipeline.condense.networks import ConvNet
from condense_pipeline.condense.sampling import derive_seed, key_hashes, probe_uniforms

WEIGHTS_SCRIPT = """
import sys, hashlib
from conftest import small_spec
from condense_pipeline.condense.bank import ProbeBank, pilot_bandwidths
from condense_pipeline.condense.networks import ConvNet
from condense_pipeline.condense.sampling import derive_seed
net = ProbeBank(small_spec()).network(3)
h = hashlib.sha256()
for t in net.state_dict().values():
    h.update(t.numpy().tobytes())
print(h.hexdigest())
"""


def test_probe_network_is_bit_identical_across_processes():
    def digest():
        out = subprocess.run(
            [sys.executable, "-c", WEIGHTS_SCRIPT],
            capture_output=True,
            text=True,
            check=True,
            cwd="tests",
        )
        return out.stdout.strip()

    first, second = digest(), digest()
    assert first == second
    # and a different probe is a different network
    assert not torch.equal(
        ProbeBank(small_spec()).network(3).blocks[0][0].weight,
        ProbeBank(small_spec()).network(4).blocks[0][0].weight,
    )


def test_key_hash_is_stable_and_keyed():
    a = key_hashes(["x", "y"], seed=1)
    assert np.array_equal(a, key_hashes(["x", "y"], seed=1))
    assert not np.array_equal(a, key_hashes(["x", "y"], seed=2))
    # Catches: a hash that changes between processes (Python's salted hash()) or between
    # versions: workers on other machines and later reruns must pick the same images.
    assert int(key_hashes(["x"], seed=0)[0]) == 9668773099883886478


def test_membership_rate_is_m_over_n():
    hashes = key_hashes([f"k{i}" for i in range(20000)], seed=0)
    u = probe_uniforms(hashes, 50)
    assert u.min() >= 0 and u.max() < 1
    assert abs((u < 0.1).mean() - 0.1) < 0.005
    # different probes choose nearly independent subsets
    overlap = ((u[:, 0] < 0.1) & (u[:, 1] < 0.1)).mean()
    assert abs(overlap - 0.01) < 0.003


def test_siamese_augmentation_is_the_same_for_real_and_synthetic(bank):
    # Catches: a transform table drawn from anything but (seed, k, c), so the stats worker that
    # augments the real images and the condense task that augments the synthetic ones (two
    # banks, two processes) apply different transforms; and one transform for every class.
    x = torch.randn(1, 1, 8, 8).expand(4, -1, -1, -1)
    labels = torch.tensor([2, 2, 5, 5])
    real = bank.augment(1, x, labels)
    synthetic = ProbeBank(bank.spec).augment(1, x[[0, 2]], labels[[0, 2]])
    assert torch.equal(real[[0, 2]], synthetic)
    assert torch.equal(real[0], real[1])  # one transform per class under a probe
    differ = [not torch.equal(*bank.augment(k, x[[0, 2]], labels[[0, 2]])) for k in range(6)]
    assert sum(differ) >= 4  # classes 2 and 5 draw their own (the same op can come up)


def _kernel_error(R: int, draws: int = 8) -> float:
    spec = small_spec()
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(20, 512, generator=g), torch.randn(20, 512, generator=g)
    h = torch.full((20,), 1024.0)
    exact = gaussian_kernel(u[None], v[None], h[:1])[0].diagonal()
    errors = []
    for seed in range(draws):
        from dataclasses import replace

        bank = ProbeBank(replace(spec, rff_dim=R, seed=seed))
        approx = (bank.rff(0, u, h) * bank.rff(0, v, h)).sum(1)
        errors.append((approx - exact).pow(2).mean().sqrt().item())
    return float(np.mean(errors))


def test_rff_kernel_error_falls_like_one_over_sqrt_r():
    small, large = _kernel_error(500), _kernel_error(8000)
    # 16x the features: the error should shrink about 4x (1/sqrt(R))
    assert 2.5 < small / large < 6.5


def test_rff_cross_term_is_unbiased():
    from dataclasses import replace

    g = torch.Generator().manual_seed(1)
    y = torch.randn(5, 512, generator=g)
    r = torch.randn(40, 512, generator=g) + 0.3
    h = torch.tensor([1024.0])
    exact = gaussian_kernel(y[None], r[None], h).mean().item()
    estimates = []
    for seed in range(200):
        bank = ProbeBank(replace(small_spec(), seed=seed))
        hy, hr = h.expand(5), h.expand(40)
        estimates.append((bank.rff(0, y, hy).mean(0) @ bank.rff(0, r, hr).mean(0)).item())
    est = np.array(estimates)
    assert 0 < exact <= 5
    assert abs(est.mean() - exact) < 4 * est.std() / np.sqrt(len(est))


def test_pilot_in_chunks_equals_one_batch(bank, digits):
    # Catches a chunked pilot that loses or double-counts images at chunk edges, or mixes
    # classes: the reference is the former one-batch pilot with the pairwise distances written
    # out (cdist), not the sums formula the pilot uses.
    images, labels, _ = digits
    x, y = images[:300], torch.from_numpy(labels[:300])
    chunked = pilot_bandwidths(bank, x, y, chunk=7)
    one_batch = torch.zeros_like(chunked)
    for k in range(bank.spec.probes):
        with torch.no_grad():
            emb = bank.network(k).embed(bank.augment(k, bank.normalize(x), y)).double()
        for c in range(10):
            rows = emb[y == c]
            n = len(rows)
            one_batch[k, c] = torch.cdist(rows, rows).pow(2).sum() / (n * (n - 1))
    assert ((chunked - one_batch).abs().max() / one_batch.abs().max()).item() < 1e-5


def test_probe_network_keeps_the_weights_statistics_were_computed_with(bank):
    # Catches a change of seeding or construction order in the registry path (seeded_model),
    # which would silently make a bank's networks differ from those of saved statistics.
    torch.manual_seed(derive_seed(bank.spec.seed, "net", 3))
    before = ConvNet(1, 8, depth=2)
    after = bank.network(3)
    assert all(
        torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values())
    )


def test_networks_built_on_two_threads_are_those_built_on_one():
    """A GPU worker builds probe networks on its flush thread while another thread draws the
    next random-feature basis (which can build network 0); the seeded init must not share
    PyTorch's global generator between them (it once gave a probe another probe's weights)."""
    from concurrent.futures import ThreadPoolExecutor

    from condense_pipeline.condense.networks import seeded_model

    def build(seeds):
        return [list(seeded_model("convnet", s, 1, 28).state_dict().values()) for s in seeds]

    seeds = list(range(200))
    alone = build(seeds)
    with ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(build, [seeds[0::2], seeds[1::2]]))
    together = [net for pair in zip(*halves) for net in pair]
    assert all(
        torch.equal(a, b) for x, y in zip(alone, together, strict=True) for a, b in zip(x, y)
    )


def test_pilot_forwards_at_most_a_quarter_of_the_pass():
    # At M = 32 (the 32 px profiles) a 32-image pilot forwarded as many images as the whole pass
    # (M per class per probe), which made the m3d pass twice as long as dm's.
    assert pilot_size(32) == 8
    assert pilot_size(256) == 32 and pilot_size(None) == 32  # cheap next to a large pass
    assert all(pilot_size(m) <= max(8, m // 4) for m in range(1, 2000))
    assert all(pilot_size(m) >= 8 for m in range(1, 2000))  # enough pairs for a bandwidth
