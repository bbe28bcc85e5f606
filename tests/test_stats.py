"""ClassStats: sums that merge exactly, a bottom-k init pool, safetensors round trip."""

import numpy as np
import pytest
import torch
from conftest import small_spec

from condense_pipeline.condense.bank import ProbeBank, pilot_bandwidths
from condense_pipeline.condense.sampling import EMPTY_HASH, pool_hashes, pool_limit
from condense_pipeline.condense.stats import ClassStats, PendingForwards, accumulate
from condense_pipeline.formats import ERROR, IMAGE, KEY, LABEL, SHARD
from condense_pipeline.pipeline.class_files import (
    class_file,
    concat_classes,
    load_classes,
    merge,
    save_groups,
)
from condense_pipeline.pipeline.stats import StatsWorker


def _accumulate(bank, images, labels, keys, h, pool=12):
    stats = ClassStats.zeros(bank, pool)
    counts = np.bincount(labels, minlength=10)
    accumulate(stats, bank, images, labels, keys, counts, h)
    return stats


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_partials_sum_to_one_pass(digits, bank):
    images, labels, keys = digits
    images, labels, keys = images[:300], labels[:300], keys[:300]
    h = pilot_bandwidths(bank, images, torch.from_numpy(labels))
    whole = _accumulate(bank, images, labels, keys, h)
    # the same embeddings, split three ways: merging must be exact (float64 sums)
    parts = [_accumulate(bank, images[i::3], labels[i::3], keys[i::3], h) for i in range(3)]
    merged = parts[0] + parts[1] + parts[2]
    assert torch.equal(merged.count, whole.count)
    for name in ("sqnorm_sum", "emb_sum", "rff_sum"):
        assert _rel(getattr(merged, name), getattr(whole, name)) < 1e-5
    for a, b in zip(merged.att_sum, whole.att_sum):
        assert _rel(a, b) < 1e-5
    # the init pool is bottom-k by hash: the same images whatever the split
    for c in range(10):
        assert merged.pool(c)[1] == whole.pool(c)[1]
        assert torch.equal(merged.pool(c)[0], whole.pool(c)[0])


def test_merge_is_exact_on_the_same_embeddings(bank):
    """Addition of float64 sums: partial merges equal one accumulation to 1e-12."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1000, 64, generator=g, dtype=torch.float64) * 10
    labels = torch.randint(0, 10, (1000,), generator=g)
    total = torch.zeros(10, 64, dtype=torch.float64).index_add_(0, labels, emb)
    parts = [
        torch.zeros(10, 64, dtype=torch.float64).index_add_(0, labels[i::4], emb[i::4])
        for i in range(4)
    ]
    assert _rel(sum(parts), total) < 1e-12


def test_pool_limit_lets_the_bottom_p_through_and_little_else():
    hashes = np.sort(pool_hashes([f"k{i}" for i in range(100_000)], seed=3))
    for P in (1, 10, 40):
        limit = pool_limit([100_000], P)[0]
        passed = int((hashes < limit).sum())
        assert passed >= P and 0.7 * (4 * P + 64) < passed < 1.3 * (4 * P + 64)
    # a class no bigger than 4P + 64 passes whole
    assert pool_limit([50, 104, 105], 10).tolist()[:2] == [EMPTY_HASH, EMPTY_HASH]
    assert pool_limit([50, 104, 105], 10)[2] < EMPTY_HASH


def test_membership_subsamples_per_probe(digits):
    images, labels, keys = digits
    bank = ProbeBank(small_spec(statistics=("emb",), real_per_probe=20, probes=8))
    stats = _accumulate(bank, images, labels, keys, None)
    # about M = 20 images per class per probe, different images for different probes
    assert 10 < stats.count.mean().item() < 30
    assert not torch.equal(stats.emb_sum[0], stats.emb_sum[1])


def test_save_load_and_select_round_trip(tmp_path, digits, bank):
    images, labels, keys = digits
    h = pilot_bandwidths(bank, images[:200], torch.from_numpy(labels[:200]))
    stats = _accumulate(bank, images[:200], labels[:200], keys[:200], h)
    stats.rejected = {"s0.tar": {"undecodable image": 2}}
    stats.save(str(tmp_path / "s.safetensors"))
    back = ClassStats.load(str(tmp_path / "s.safetensors"))
    assert torch.equal(back.emb_sum, stats.emb_sum)
    assert back.rejected == stats.rejected and back.pool_keys == stats.pool_keys
    joined = concat_classes([stats.select([0, 1, 2]), stats.select([3, 4])])
    assert torch.equal(joined.rff_sum, stats.select([0, 1, 2, 3, 4]).rff_sum)


def test_saved_files_equal_safetensors_own_and_merge_group_by_group(tmp_path, digits, bank):
    """A statistics file is written a tensor at a time: it must be exactly the file safetensors'
    save_file writes, and the merge of class-group checkpoints must equal the sum's files."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    images, labels, keys = digits
    h = pilot_bandwidths(bank, images[:200], torch.from_numpy(labels[:200]))
    parts = [_accumulate(bank, images[i:200:2], labels[i:200:2], keys[i:200:2], h) for i in (0, 1)]
    parts[0].rejected = {"s0.tar": {"undecodable image": 2}}
    parts[0].save(str(tmp_path / "ours.safetensors"))
    save_file(parts[0].tensors(), str(tmp_path / "theirs.safetensors"))
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "theirs.safetensors").read_bytes()
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        for name, t in parts[0].tensors().items():
            assert torch.equal(f.get_tensor(name), t)

    for i, part in enumerate(parts):
        assert save_groups(part, str(tmp_path / f"w{i}")) == sum(
            p.stat().st_size for p in (tmp_path / f"w{i}").iterdir()
        )
    merged = merge([str(tmp_path / "w0"), str(tmp_path / "w1")], 10, str(tmp_path / "out"))
    (parts[0] + parts[1]).save(str(tmp_path / "sum.safetensors"))
    assert (tmp_path / "out" / class_file(0)).read_bytes() == (
        tmp_path / "sum.safetensors"
    ).read_bytes()
    assert merged.seen.tolist() == np.bincount(labels[:200], minlength=10).tolist()


def test_exact_bandwidth_matches_pairwise_distances(bank, digits):
    images, labels, keys = digits
    sel = labels == 3
    h_pilot = pilot_bandwidths(bank, images[sel], torch.from_numpy(labels[sel]))
    class_keys = [k for k, s in zip(keys, sel) if s]
    stats = _accumulate(bank, images[sel], labels[sel], class_keys, h_pilot)
    # every image of the class in both: the sums give the exact mean pairwise distance
    assert _rel(stats.exact_bandwidth()[:, 3], h_pilot[:, 3]) < 1e-4


def _assert_same_stats(a, b, tol):
    assert torch.equal(a.count, b.count) and torch.equal(a.seen, b.seen)
    for name in ("sqnorm_sum", "emb_sum"):
        assert _rel(getattr(a, name), getattr(b, name)) < tol, name
    # the features add a float32 projection and a cosine to the embeddings' differences
    assert _rel(a.rff_sum, b.rff_sum) < 10 * tol
    for x, y in zip(a.att_sum, b.att_sum):
        assert _rel(x, y) < tol
    assert a.pool_keys == b.pool_keys and torch.equal(a.pool_images, b.pool_images)


@pytest.mark.parametrize("limit", ["capacity_bytes", "capacity_forwards"])
def test_held_images_forwarded_probe_by_probe_equal_batch_by_batch(digits, limit):
    """A worker holds images and forwards them probe-major at each flush (its buffer full in
    bytes, or in forwards); the statistics are those of adding every batch at once (only the
    forwards' batch composition differs)."""
    images, labels, keys = digits
    bank = ProbeBank(small_spec(real_per_probe=20, probes=8))
    h = pilot_bandwidths(bank, images[:400], torch.from_numpy(labels[:400]))
    counts = np.bincount(labels, minlength=10)
    batch_by_batch, held = ClassStats.zeros(bank, 12), ClassStats.zeros(bank, 12)
    capacity = {"capacity_bytes": 20_000, "capacity_forwards": 300}[limit]  # several flushes
    pending = PendingForwards(bank, counts, h, **{limit: capacity})
    forwards, due, flushes = 0, 0, 0
    for i in range(0, len(labels), 64):
        b = slice(i, i + 64)
        forwards += accumulate(batch_by_batch, bank, images[b], labels[b], keys[b], counts, h)
        due += pending.add(held, images[b], labels[b], keys[b])
        if pending.full:  # what a worker does with a full buffer
            pending.flush(held)
            flushes += 1
        assert (pending.nbytes if limit == "capacity_bytes" else pending.forwards) < capacity
    assert flushes >= 3 and pending.held > 0
    assert due == forwards and held.count.sum() < forwards  # the held ones are not counted yet
    pending.flush(held)
    assert held.count.sum() == forwards
    _assert_same_stats(held, batch_by_batch, 1e-6)


def test_a_worker_checkpoint_holds_every_image_it_consumed(tmp_path, digits):
    from ray.data.block import BlockAccessor

    images, labels, keys = digits
    spec = small_spec(real_per_probe=20, probes=8)
    counts = np.bincount(labels, minlength=10)
    h = pilot_bandwidths(ProbeBank(spec), images[:400], torch.from_numpy(labels[:400]))
    worker = StatsWorker(spec, 12, counts, h, "cpu", threads=1, buffer_mib=64)
    n = len(labels)
    block = BlockAccessor.batch_to_block(
        {
            KEY: np.array(keys),
            IMAGE: images.numpy(),
            LABEL: labels,
            SHARD: np.array(["s0.tar"] * n),
            ERROR: np.array([""] * n),
        }
    )
    forwards, stalled = worker.consume(block, batch_size=100)
    assert not stalled
    worker.save(str(tmp_path / "w"))  # no drain: save waits for the flush thread, then the rest
    saved = load_classes(str(tmp_path / "w"), list(range(10)))
    assert saved.count.sum() == forwards > 0
    plain = ClassStats.zeros(ProbeBank(spec), 12)
    accumulate(plain, ProbeBank(spec), images, labels, keys, counts, h)
    _assert_same_stats(saved, plain, 1e-6)


def test_a_worker_takes_blocks_while_it_flushes_and_loses_none(tmp_path, digits):
    """A worker forwards a full buffer on its flush thread while it takes the next blocks (so
    the reading does not wait for the forwards); driven as the driver drives it (waits while
    stalled, drains before the checkpoint), it neither loses nor repeats an image."""
    from ray.data.block import BlockAccessor

    images, labels, keys = digits
    spec = small_spec(statistics=("emb", "rff"), real_per_probe=20, probes=8)
    counts = np.bincount(labels, minlength=10)
    h = pilot_bandwidths(ProbeBank(spec), images[:300], torch.from_numpy(labels[:300]))
    worker = StatsWorker(spec, 12, counts, h, "cpu", threads=1)
    worker.pending.capacity_forwards = 150  # several flushes over the digits
    forwards = 0
    for i in range(0, len(labels), 100):
        n = len(labels[i : i + 100])
        block = BlockAccessor.batch_to_block(
            {
                KEY: np.array(keys[i : i + 100]),
                IMAGE: images[i : i + 100].numpy(),
                LABEL: labels[i : i + 100],
                SHARD: np.array(["s0.tar"] * n),
                ERROR: np.array([""] * n),
            }
        )
        added, stalled = worker.consume(block, batch_size=50)
        forwards += added
        while stalled:
            _, stalled = worker.flush(0.01)
    worker.pending.wait()
    assert worker.stats.count.sum() > 0  # forwarded while the blocks came, not at the drain
    while worker.drain(0.01):
        pass
    worker.save(str(tmp_path / "w"))
    plain = ClassStats.zeros(ProbeBank(spec), 12)
    assert accumulate(plain, ProbeBank(spec), images, labels, keys, counts, h) == forwards
    _assert_same_stats(load_classes(str(tmp_path / "w"), list(range(10))), plain, 1e-6)


def test_a_flush_that_fails_raises_in_whoever_waits_for_it(digits):
    images, labels, keys = digits
    bank = ProbeBank(small_spec(real_per_probe=20, probes=8))
    pending = PendingForwards(bank, np.bincount(labels, minlength=10))
    stats = ClassStats.zeros(bank, 0)
    pending.add(stats, images, labels, keys)
    pending._add_probe = lambda *a: 1 / 0
    pending.start(stats)
    with pytest.raises(ZeroDivisionError):
        pending.wait()


def test_bases_drawn_ahead_on_a_thread_give_the_same_statistics(digits):
    """What a GPU worker does (the next probe's basis drawn on a CPU thread), run on the CPU."""
    images, labels, keys = digits
    images, labels, keys = images[:600], labels[:600], keys[:600]
    bank = ProbeBank(small_spec(statistics=("emb", "rff"), probes=8))
    h = pilot_bandwidths(bank, images[:300], torch.from_numpy(labels[:300]))
    counts = np.bincount(labels, minlength=10)
    out = []
    for draw_ahead in (False, True):
        stats = ClassStats.zeros(ProbeBank(bank.spec), 0)
        pending = PendingForwards(ProbeBank(bank.spec), counts, h, draw_ahead=draw_ahead)
        pending.add(stats, images, labels, keys)
        pending.flush(stats)
        out.append(stats)
    assert torch.equal(out[0].rff_sum, out[1].rff_sum) and out[0].count.sum() > 0
