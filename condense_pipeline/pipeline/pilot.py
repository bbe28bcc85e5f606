"""The M3D bandwidth pilot: a few images per class, read by Ray Data in parallel, then the
bandwidths computed from them in one Ray task (on a GPU where there are GPUs)."""

from __future__ import annotations

import functools
import heapq
import math
import queue

import numpy as np
import torch

from condense_pipeline.condense.bank import BankSpec, ProbeBank, pilot_bandwidths
from condense_pipeline.condense.sampling import pool_hashes, pool_limit
from condense_pipeline.datasets import Profile
from condense_pipeline.errors import UserError
from condense_pipeline.formats import ERROR, IMAGE, KEY, LABEL
from condense_pipeline.pipeline import read
from condense_pipeline.pipeline.cluster import worker_threads

# The pilot reads the leading shards expected to hold this many times its images of every class.
OVERREAD = 4


def pilot_prefix(n_shards: int, counts, want) -> int:
    """How many leading shards the pilot reads: enough that every class is expected to show
    OVERREAD x its `want` images (shards are shuffled, by prepare and by condense_dataset)."""
    fraction = float(np.max(OVERREAD * np.asarray(want) / np.maximum(np.asarray(counts), 1)))
    return min(n_shards, max(1, math.ceil(fraction * n_shards)))


def pilot_images(
    shards: list[str], profile: Profile, counts, per_class: int, seed: int, timeout: float
):
    """Per class the `per_class` images with the smallest pool hash among the leading shards
    (pilot_prefix), read and decoded by Ray Data in parallel. Read tasks decode only candidates,
    images whose hash is below their class's pool_limit for the prefix's expected size, and the
    driver keeps only each class's running selection. A class with fewer candidates than it
    needs (shards that are not shuffled) is completed from every shard. Returns images uint8
    [n, H, W, ch] and labels [n], by class, smallest hash first within a class. A read that
    yields nothing for `timeout` seconds fails the stage."""
    counts = np.asarray(counts)
    want = np.minimum(counts, per_class)
    n = pilot_prefix(len(shards), counts, want)
    chosen: list[list] = [[] for _ in counts]  # per class a max-heap of (-hash, key, image)
    _offer(
        chosen,
        want,
        _candidates(shards[:n], profile, pool_limit(counts * n / len(shards), want), seed, timeout),
    )
    short = np.array([len(heap) < w for heap, w in zip(chosen, want)])
    if short.any() and n < len(shards):
        limits = np.where(short, pool_limit(counts, want), 0).astype(np.uint64)
        _offer(chosen, want, _candidates(shards[n:], profile, limits, seed, timeout))
    images, labels = [], []
    for c, heap in enumerate(chosen):
        images += [image for _, _, image in sorted(heap, reverse=True)]  # smallest hash first
        labels += [c] * len(heap)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def _offer(chosen: list[list], want, candidates) -> None:
    for h, key, label, image in candidates:
        heap, item = chosen[label], (-h, key, image)
        if len(heap) < want[label]:
            heapq.heappush(heap, item)
        elif h < -heap[0][0]:
            heapq.heapreplace(heap, item)


def _candidates(shards: list[str], profile: Profile, limits: np.ndarray, seed: int, timeout):
    """(hash, key, label, image) of every good image of `shards` whose pool hash is below its
    class's limit, decoded in Ray Data's read tasks; the others never leave them."""
    wanted = functools.partial(_below, limits=limits, seed=seed)
    ds = read.read_images(shards, profile, profile.num_classes, wanted=wanted)
    decoded = ds.map_batches(_decoded_only, batch_format="numpy")
    batches = functools.partial(decoded.iter_batches, batch_format="numpy", batch_size=None)
    for batch in _watched(batches, timeout):
        keys = [str(k) for k in batch[KEY]]
        for h, key, label, image in zip(pool_hashes(keys, seed), keys, batch[LABEL], batch[IMAGE]):
            yield int(h), key, int(label), image


def _watched(open_batches, timeout: float):
    """The batches of `open_batches()`, pulled on a thread; a UserError when none comes for
    `timeout` seconds. Ray Data waits for ever for a CPU to run its read tasks on, and a cluster
    whose CPUs are all held would leave the stage silent."""
    puller = read.Puller(open_batches, depth=2)
    try:
        while True:
            try:
                item = puller.items.get(timeout=timeout)
            except queue.Empty:
                raise UserError(
                    f"stats stage stalled: the M3D bandwidth pilot read nothing for {timeout:.0f}"
                    " s; check that the cluster has CPUs free for Ray Data's read tasks"
                ) from None
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        puller.stop()


def _below(keys: list[str], labels: np.ndarray, *, limits: np.ndarray, seed: int) -> np.ndarray:
    return pool_hashes(keys, seed) < limits[labels]


def _decoded_only(batch: dict) -> dict:
    """The rows that carry a decoded image (no reject and no undecoded row)."""
    good = batch[ERROR] == ""
    return {KEY: batch[KEY][good], LABEL: batch[LABEL][good], IMAGE: batch[IMAGE][good]}


def bandwidths(
    spec: BankSpec, images, labels, plan, timeout: float, experts: str | None = None
) -> torch.Tensor:
    """The bandwidth pilot as one Ray task (on a GPU where there are GPUs). Ray reruns it when
    its node is lost; one that has not finished after `timeout` fails the stage. `experts`: the
    experts' folder of a bank with trained probes."""
    import ray

    task = ray.remote(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)(_pilot_task)
    ref = task.remote(spec, images, labels, plan.device, worker_threads(plan), experts)
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise UserError(
            f"stats stage stalled: the M3D bandwidth pilot did not finish in {timeout:.0f} s; "
            "check that the cluster has room for it"
        ) from None


def _pilot_task(spec: BankSpec, images, labels, device: str, threads: int, experts: str | None):
    torch.set_num_threads(threads)  # it runs before the workers: their CPUs are free
    return pilot_bandwidths(ProbeBank(spec, device, experts), images, labels)
