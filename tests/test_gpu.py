"""The CUDA path (skipped without a CUDA device; benchmarks/gpu_check.sh runs these). Generated
images only: the GPU machine has no scikit-learn and no Ray."""

import numpy as np
import pytest
import torch
from conftest import small_spec

from condense_pipeline.condense.bank import ProbeBank, pilot_bandwidths
from condense_pipeline.condense.loop import step_gradient
from condense_pipeline.condense.stats import ClassStats, accumulate
from condense_pipeline.condense.targets import BankTargets
from condense_pipeline.config import condense_config
from condense_pipeline.datasets import get_profile

pytestmark = pytest.mark.gpu


@pytest.fixture
def no_tf32():
    # TF32 convolutions (cuDNN's default) round to about 1e-3: these tests compare float32 paths
    # at 1e-5, so they run in full float32
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _data(n=400, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n // classes)
    x = rng.integers(0, 256, (len(y), 8, 8, 1), dtype=np.uint8)
    return torch.from_numpy(x), y, [f"g{i}" for i in range(len(y))]


def _stats(device):
    x, y, keys = _data()
    bank = ProbeBank(small_spec(probes=3), device)
    h = pilot_bandwidths(bank, x, torch.from_numpy(y))
    stats = ClassStats.zeros(bank, 4)
    accumulate(stats, bank, x, y, keys, np.bincount(y), h)
    return bank, stats, h


def _rel(a, b):
    return ((a.cpu() - b.cpu()).abs().max() / b.cpu().abs().max()).item()


def test_float64_accumulation_on_cuda_equals_cpu(no_tf32):
    # Catches device-side float64 index_add_ or the random features differing from the CPU's.
    _, cpu, h_cpu = _stats("cpu")
    _, gpu, h_gpu = _stats("cuda")
    assert torch.equal(cpu.count, gpu.count.cpu())
    assert _rel(h_gpu, h_cpu) < 1e-5
    for name in ("emb_sum", "rff_sum", "sqnorm_sum"):
        assert _rel(getattr(gpu, name), getattr(cpu, name)) < 1e-5, name
    for a, b in zip(gpu.att_sum, cpu.att_sum):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("method", ["dm", "m3d", "datadam"])
def test_chunked_gradient_on_cuda_equals_unchunked(no_tf32, method):
    bank, stats, h = _stats("cuda")
    classes = [1, 4, 6]
    cfg = condense_config(get_profile("digits"), method, 3, steps=1, init="noise")
    images = torch.randn(len(classes) * 3, 1, 8, 8, device="cuda")
    t = BankTargets(bank, stats.select(classes), classes, h, cfg).at(0)
    loss, grad = step_gradient(images, t, cfg)
    loss_c, grad_c = step_gradient(images, t, cfg, chunk=2)
    assert _rel(loss_c, loss) < 1e-5 and _rel(grad_c, grad) < 1e-5


def test_tf32_settings_are_read_in_the_process_that_computes():
    # Catches bank.json recording the driver's flags: a fresh process (what a stats worker is)
    # reads its own, where cuDNN's TF32 is on by default and matmul's follows the precision.
    import json
    import subprocess
    import sys

    torch.backends.cudnn.allow_tf32 = False  # the driver's setting must not leak into the worker
    try:
        code = (
            "import json, torch; from condense_pipeline.condense.numerics import numerics; "
            "print(json.dumps(numerics('cuda')))"
        )
        out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                        text=True, check=True).stdout)  # fmt: skip
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert out["device"] == "cuda" and out["cudnn_tf32"] is True
    assert out["matmul_tf32"] is (torch.get_float32_matmul_precision() != "highest")
