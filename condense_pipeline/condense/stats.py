"""ClassStats: per (probe, class) sums of everything DM, M3D and DataDAM need from the real data.

Sums are float64 and add: stats(A) + stats(B) == stats(A u B). That is what makes the pass
shardable across workers and resumable per work unit. Alongside, an init pool keeps per class the
`init_pool` images with the smallest stable key hash (bottom-k) among the class's images whose
hash is below `pool_limit`, which also merges exactly.
"""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from condense_pipeline import rejects, storage
from condense_pipeline.condense.bank import ProbeBank, mean_sqdist_from_sums
from condense_pipeline.condense.networks import attention_dims, attention_map
from condense_pipeline.condense.sampling import (
    EMPTY_HASH,
    key_hashes,
    membership,
    pool_hashes,
    pool_limit,
)


@dataclass
class ClassStats:
    """Sums over the real images of each (probe k, class c). Shapes: K probes, C classes."""

    count: torch.Tensor  # [K, C] images that probe k used from class c
    sqnorm_sum: torch.Tensor  # [K, C] sum of ||psi||^2 (exact bandwidth diagnostics)
    emb_sum: torch.Tensor | None  # [K, C, D]
    rff_sum: torch.Tensor | None  # [K, C, R]
    att_sum: list[torch.Tensor]  # per block l < L: [K, C, A_l]
    seen: torch.Tensor  # [C] good images per class
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)  # shard -> reason -> n
    pool_hash: np.ndarray = None  # uint64 [C, P], EMPTY_HASH where empty
    pool_images: torch.Tensor = None  # uint8 [C, P, H, W, ch]
    pool_keys: list[list[str]] = None  # [C][P]

    @staticmethod
    def zeros(bank: ProbeBank, init_pool: int) -> ClassStats:
        s = bank.spec
        K, C = s.probes, s.num_classes
        f64 = dict(dtype=torch.float64, device=bank.device)
        return ClassStats(
            count=torch.zeros(K, C, **f64),
            sqnorm_sum=torch.zeros(K, C, **f64),
            emb_sum=torch.zeros(K, C, bank.embed_dim, **f64) if "emb" in s.statistics else None,
            rff_sum=torch.zeros(K, C, s.rff_dim, **f64) if "rff" in s.statistics else None,
            att_sum=[torch.zeros(K, C, a, **f64) for a in attention_dims(s.resolution, s.depth)]
            if "att" in s.statistics
            else [],
            seen=torch.zeros(C, dtype=torch.int64),
            pool_hash=np.full((C, init_pool), EMPTY_HASH, dtype=np.uint64),
            pool_images=torch.zeros(
                C, init_pool, s.resolution, s.resolution, s.channels, dtype=torch.uint8
            ),
            pool_keys=[[""] * init_pool for _ in range(C)],
        )

    # -- merging ----------------------------------------------------------------------------
    def __add__(self, other: ClassStats) -> ClassStats:
        out = copy.deepcopy(self)
        out += other
        return out

    def __iadd__(self, other: ClassStats) -> ClassStats:
        """Add `other` in place: a merge then holds its sum and one part, not a third copy."""
        for mine, theirs in zip(self._sums(), other._sums()):
            mine += theirs.to(mine.device)
        self.seen += other.seen
        self.rejected = rejects.merged(self.rejected, other.rejected)
        for c in range(len(self.pool_keys)):
            self._offer(c, other.pool_hash[c], other.pool_images[c], other.pool_keys[c])
        return self

    def _sums(self) -> list[torch.Tensor]:
        held = [self.emb_sum, self.rff_sum]
        return [self.count, self.sqnorm_sum, *(t for t in held if t is not None), *self.att_sum]

    def _offer(self, c: int, hashes: np.ndarray, images: torch.Tensor, keys: list[str]) -> None:
        """Keep the P smallest hashes of class c among what it holds and the candidates."""
        all_hash = np.concatenate([self.pool_hash[c], hashes])
        order = np.argsort(all_hash, kind="stable")[: self.pool_hash.shape[1]]
        all_images = torch.cat([self.pool_images[c], images])
        all_keys = self.pool_keys[c] + list(keys)
        self.pool_hash[c] = all_hash[order]
        self.pool_images[c] = all_images[torch.from_numpy(order)]
        self.pool_keys[c] = [all_keys[i] for i in order]

    # -- reading ----------------------------------------------------------------------------
    def pool(self, c: int) -> tuple[torch.Tensor, list[str]]:
        """Class c's pool images, smallest hash first: (uint8 [n, H, W, ch], keys)."""
        n = int((self.pool_hash[c] != EMPTY_HASH).sum())
        return self.pool_images[c, :n], self.pool_keys[c][:n]

    def select(self, classes: list[int]) -> ClassStats:
        """The statistics of a subset of classes, in the given order."""
        idx = torch.tensor(classes)

        def pick(t):
            return None if t is None else t[:, idx.to(t.device)]

        return ClassStats(
            count=pick(self.count),
            sqnorm_sum=pick(self.sqnorm_sum),
            emb_sum=pick(self.emb_sum),
            rff_sum=pick(self.rff_sum),
            att_sum=[pick(a) for a in self.att_sum],
            seen=self.seen[idx],
            rejected=self.rejected,
            pool_hash=self.pool_hash[classes],
            pool_images=self.pool_images[idx],
            pool_keys=[self.pool_keys[c] for c in classes],
        )

    def exact_bandwidth(self) -> torch.Tensor:
        """Mean pairwise squared distance per (probe, class) from the sums: [K, C]."""
        return mean_sqdist_from_sums(self.count, self.emb_sum, self.sqnorm_sum)

    # -- storage ----------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """What a statistics file holds, by name (the sums as they are, on their device)."""
        tensors = {"count": self.count, "sqnorm_sum": self.sqnorm_sum, "seen": self.seen}
        if self.emb_sum is not None:
            tensors["emb_sum"] = self.emb_sum
        if self.rff_sum is not None:
            tensors["rff_sum"] = self.rff_sum
        for i, a in enumerate(self.att_sum):
            tensors[f"att_sum_{i}"] = a
        tensors["pool_hash"] = torch.from_numpy(self.pool_hash.view(np.int64))
        tensors["pool_images"] = self.pool_images
        meta = {"rejected": self.rejected, "pool_keys": self.pool_keys}
        tensors["meta_json"] = torch.frombuffer(
            bytearray(json.dumps(meta).encode()), dtype=torch.uint8
        )
        return tensors

    @staticmethod
    def from_bytes(data: bytearray, device: str | torch.device = "cpu") -> ClassStats:
        """The statistics in `data`; on the CPU their tensors are views of it, not copies."""
        t = _tensor_views(data)
        meta = json.loads(bytes(t["meta_json"].numpy()).decode())
        atts = sorted((k for k in t if k.startswith("att_sum_")), key=lambda k: int(k[8:]))
        dev = torch.device(device)
        return ClassStats(
            count=t["count"].to(dev),
            sqnorm_sum=t["sqnorm_sum"].to(dev),
            emb_sum=t["emb_sum"].to(dev) if "emb_sum" in t else None,
            rff_sum=t["rff_sum"].to(dev) if "rff_sum" in t else None,
            att_sum=[t[k].to(dev) for k in atts],
            seen=t["seen"],
            rejected=meta["rejected"],
            pool_hash=t["pool_hash"].numpy().view(np.uint64).copy(),
            pool_images=t["pool_images"],
            pool_keys=meta["pool_keys"],
        )

    def save(self, location: str) -> int:
        """Write the statistics as one safetensors file, a tensor at a time (no copy of the
        whole file is ever built); returns the bytes written."""
        return storage.write_chunks(location, _safetensors_chunks(self.tensors()))

    @staticmethod
    def load(location: str, device: str | torch.device = "cpu") -> ClassStats:
        return ClassStats.from_bytes(storage.read_buffer(location), device)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "I64": torch.int64, "U8": torch.uint8}


# safetensors' own order of dtypes in a file (its save sorts by dtype, then name), kept so that
# these files equal its save()'s byte for byte.
_DTYPE_ORDER = ("I64", "F64", "F32", "U8")


def _safetensors_chunks(tensors: dict[str, torch.Tensor]):
    """Yields a safetensors file of `tensors`: its header, then each tensor's bytes in turn (a
    view of a CPU tensor's memory; a device tensor is copied to the CPU one at a time)."""
    names = {dtype: name for name, dtype in _DTYPES.items()}
    order = sorted(tensors, key=lambda k: (_DTYPE_ORDER.index(names[tensors[k].dtype]), k))
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        end = offset + t.numel() * t.element_size()
        header[name] = {
            "dtype": names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    yield len(text).to_bytes(8, "little") + text
    for name in order:
        t = tensors[name].detach().cpu().contiguous()
        if t.numel():
            yield memoryview(t.numpy()).cast("B")


def _tensor_views(data: bytearray) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as views of its bytes (safetensors.torch.load copies them,
    which held a file twice while it was parsed)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8 : 8 + size]))
    header.pop("__metadata__", None)
    out = {}
    for name, h in header.items():
        dtype, (begin, end) = _DTYPES[h["dtype"]], h["data_offsets"]
        if end == begin:
            out[name] = torch.empty(h["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(
            data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=8 + size + begin
        )
        out[name] = flat.reshape(h["shape"])
    return out


# One probe's images go through its network at most this many at a time: it bounds what a
# forward holds (DataDAM keeps every block's activations), as the batch size did before.
FORWARD_CHUNK = 512

# A stats worker is full once the images it holds are due this many forwards per probe (on
# average), so that the forwards overlap the reading of the rest of the data instead of all
# waiting for the commit (MNIST, K = 200: the whole stats command went from 1.20x a plain loop
# to 1.07x), while each probe's network still runs on hundreds of images at a time
# and M3D draws a basis once per few hundred forwards of a probe (a few % of them on a CPU). On
# a GPU the forwards are quick next to the reading and a basis costs as much as thousands of
# forwards, so a GPU worker holds more.
HELD_PER_PROBE = {"cpu": 256, "cuda": 4096}
# A worker whose flush thread is idle starts the next flush once it holds this share of that:
# the forwards then keep pace with a fast reading (100,000 images for 6,400 forwards left 8.7 s
# of forwards after the reading when a flush waited for a full buffer), and the flushes grow to
# the whole capacity where the forwards are the slower part.
START_FILL = 0.25


def accumulate(
    stats: ClassStats,
    bank: ProbeBank,
    images: torch.Tensor,
    labels: np.ndarray,
    keys: list[str],
    class_counts: np.ndarray,
    bandwidths: torch.Tensor | None = None,
    attention_power: float = 1.0,
) -> int:
    """Add a batch of good real images to `stats` now; returns the number of probe forwards.

    images uint8 [n, H, W, ch]; labels int [n]; class_counts [C] (n_c, for the subsampling rule);
    bandwidths [K, C] (M3D only). Each image is normalised once per probe it belongs to and the
    batch is forwarded probe by probe (PendingForwards, flushed at once).
    """
    pending = PendingForwards(bank, class_counts, bandwidths, attention_power)
    forwards = pending.add(stats, images, labels, keys)
    pending.flush(stats)
    return forwards


class PendingForwards:
    """Real images waiting for their probe forwards, added to the statistics probe by probe.

    `add` counts a batch and offers it to the init pools at once, and holds the images (uint8)
    that some probe samples, with their (image, probe) pairs; a flush forwards them probe-major:
    each probe's network runs on a few large chunks and M3D draws its random-feature basis once
    per probe, whatever K. (Batch by batch, K = 100 at M = 32 on MNIST gave each probe about 3
    images of a 512-image batch and redrew about 100 bases per batch.) The holder is `full` once
    the held images and pairs reach `capacity_bytes`, or their forwards `capacity_forwards`
    (None: no limit). `start` hands what is held to a flush thread and holds anew, so the caller
    goes on adding (a stats worker: reading) while the forwards run; it waits (`wait`) only when
    it is full again before that flush ends, which bounds the memory at twice the capacity
    whatever K and C. Whoever saves the statistics must `flush` first, or the checkpoint misses
    the held images. The probe order alternates between flushes, so that the bases the last
    flush ended with are still in the bank's cache when the next one starts.
    """

    def __init__(
        self,
        bank: ProbeBank,
        class_counts: np.ndarray,
        bandwidths: torch.Tensor | None = None,
        attention_power: float = 1.0,
        capacity_bytes: int | None = None,
        capacity_forwards: int | None = None,
        chunk: int = FORWARD_CHUNK,
        draw_ahead: bool | None = None,
    ):
        self.bank, self.counts, self.bandwidths = bank, np.asarray(class_counts), bandwidths
        self.attention_power = attention_power
        self.capacity_bytes, self.capacity_forwards = capacity_bytes, capacity_forwards
        self.chunk = chunk
        # torch's thread count is a per-thread setting under OpenMP: the flush thread takes the
        # one its creator set (a Ray actor's is 1 unless the plan says more)
        self._flusher = ThreadPoolExecutor(
            1, initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)
        )
        self._flush = None  # the flush running on that thread (a Future)
        self._flush_due = 0  # its forwards not done yet
        # On a GPU the next probe's basis is drawn on a CPU thread while this probe's forwards
        # run; on a CPU that thread would only take cores from the forwards.
        self.draw_ahead = bank.device.type == "cuda" if draw_ahead is None else draw_ahead
        self._drawer = ThreadPoolExecutor(1) if self.draw_ahead else None
        self._ahead = None  # (probe, future) of the basis being drawn on that thread
        self._reverse = False
        self.clear()

    def clear(self) -> None:
        """Drop what is held (when the statistics it was meant for are replaced), once the
        flush under way, if any, has ended."""
        self.wait()
        self._images: list[torch.Tensor] = []
        self._labels: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []  # per batch: the held image of each (image, probe) pair
        self._probes: list[np.ndarray] = []
        self.held = 0  # images held
        self.forwards = 0  # probe forwards they are due
        self.nbytes = 0  # bytes of the held images and pairs

    @property
    def fill(self) -> float:
        """The held images' share of the capacity (the larger of bytes and forwards)."""
        shares = [0.0]
        if self.capacity_bytes is not None:
            shares.append(self.nbytes / self.capacity_bytes)
        if self.capacity_forwards is not None:
            shares.append(self.forwards / self.capacity_forwards)
        return max(shares)

    @property
    def full(self) -> bool:
        return self.fill >= 1.0

    @property
    def busy(self) -> bool:
        """A flush is running on the flush thread (one that failed raises its error here)."""
        return not self.wait(0.0)

    @property
    def due(self) -> int:
        """Probe forwards not done yet: the running flush's and the held images'."""
        return self._flush_due + self.forwards  # a flush counts its own down to 0

    def add(
        self, stats: ClassStats, images: torch.Tensor, labels: np.ndarray, keys: list[str]
    ) -> int:
        """Count a batch of good images (uint8 [n, H, W, ch], labels [n]) into `stats` and hold
        what the probes need; returns the probe forwards it takes (at a flush)."""
        spec = self.bank.spec
        _count_and_pool(stats, images, labels, keys, self.counts, spec.seed)
        member = membership(
            key_hashes(keys, spec.seed), labels, self.counts, spec.probes, spec.real_per_probe
        )
        used = np.nonzero(member.any(1))[0]
        rows, probes = np.nonzero(member[used])  # row-major: each probe's images in arrival order
        if len(used):
            self._images.append(images[torch.from_numpy(used)].cpu())
            self._labels.append(labels[used].astype(np.int64))
            self._rows.append(rows + self.held)
            self._probes.append(probes.astype(np.int32))
            self.held += len(used)
            self.forwards += len(rows)
            self.nbytes += self._images[-1].nbytes + 12 * len(rows)
        return len(rows)

    def start(self, stats: ClassStats) -> None:
        """Forward what is held into `stats` on the flush thread, and hold anew. The flush before
        must have ended (`busy` False). Until this one ends, `add` writes only the counts and the
        init pools of `stats`, and the flush only its sums."""
        assert not self.busy, "a flush is still running"
        if not self.held:
            return
        images, labels, chunks = self._take()
        self._flush_due = sum(len(idx) for _, idx in chunks)
        self._flush = self._flusher.submit(self._forward, stats, images, labels, chunks)

    def wait(self, seconds: float | None = None) -> bool:
        """Wait up to `seconds` (None: as long as it takes) for the running flush; True once
        none runs. A flush that failed raises its error."""
        if self._flush is None:
            return True
        try:
            self._flush.result(timeout=seconds)
        except TimeoutError:
            return False
        self._flush = None
        return True

    def flush(self, stats: ClassStats) -> None:
        """Forward everything held into `stats` and return when it is done."""
        self.wait()
        self.start(stats)
        self.wait()

    def _forward(self, stats: ClassStats, images, labels, chunks: list) -> None:
        """The flush thread's work: each probe's chunks through its network."""
        for n, (k, idx) in enumerate(chunks):
            if self.draw_ahead and stats.rff_sum is not None:
                self._draw_ahead(k, chunks[n + 1 :])
            self._add_probe(stats, k, images[idx], labels[idx])
            self._flush_due -= len(idx)

    def _draw_ahead(self, k: int, chunks: list) -> None:
        """Wait for probe k's basis if a thread is drawing it, and start drawing the next
        probe's on that thread while k's forwards run."""
        if self._ahead is not None and self._ahead[0] == k:
            self._ahead[1].result()
        nxt = next((j for j, _ in chunks if j != k), None)
        if nxt is not None and (self._ahead is None or self._ahead[0] != nxt):
            self._ahead = (nxt, self._drawer.submit(self.bank.rff_basis, nxt))

    def _take(self) -> tuple:
        """What is held, as a flush: the images, their labels and per probe (in this flush's
        order) its chunks; the holder is empty after."""
        images = torch.cat(self._images)
        labels = torch.from_numpy(np.concatenate(self._labels))
        rows, probes = np.concatenate(self._rows), np.concatenate(self._probes)
        self._images, self._labels, self._rows, self._probes = [], [], [], []
        self.held = self.forwards = self.nbytes = 0
        order = np.argsort(probes, kind="stable")
        rows, probes = rows[order], probes[order]
        K = self.bank.spec.probes
        bounds = np.searchsorted(probes, np.arange(K + 1))
        due = [
            k
            for k in (reversed(range(K)) if self._reverse else range(K))
            if bounds[k + 1] > bounds[k]
        ]
        self._reverse = not self._reverse
        chunks = [
            (k, torch.from_numpy(rows[start : min(start + self.chunk, bounds[k + 1])]))
            for k in due
            for start in range(bounds[k], bounds[k + 1], self.chunk)
        ]
        return images, labels, chunks

    def _add_probe(self, stats: ClassStats, k: int, images: torch.Tensor, labels: torch.Tensor):
        """Forward images (uint8 [n, H, W, ch]) of classes `labels` [n] through probe k."""
        bank = self.bank
        lab = labels.to(bank.device)
        with torch.no_grad():
            x = bank.augment(k, bank.normalize(images), labels)
            if stats.att_sum:  # DataDAM: every block's activations; the others only the output
                emb, acts = bank.network(k).activations(x)
            else:
                emb, acts = bank.network(k).embed(x), []
        emb64 = emb.double()
        stats.count[k].index_add_(0, lab, torch.ones_like(emb64[:, 0]))
        stats.sqnorm_sum[k].index_add_(0, lab, (emb64 * emb64).sum(1))
        if stats.emb_sum is not None:
            stats.emb_sum[k].index_add_(0, lab, emb64)
        if stats.rff_sum is not None:
            phi = bank.rff(k, emb, self.bandwidths[k].to(bank.device)[lab].float())
            stats.rff_sum[k].index_add_(0, lab, phi.double())
        for a_sum, act in zip(stats.att_sum, acts):
            a_sum[k].index_add_(0, lab, attention_map(act, self.attention_power).double())


def _count_and_pool(stats: ClassStats, images, labels, keys, class_counts, seed: int) -> None:
    """Count a batch per class and offer it to the class's init pool."""
    stats.seen += torch.bincount(
        torch.from_numpy(labels.astype(np.int64)), minlength=len(stats.seen)
    )
    P = stats.pool_hash.shape[1]
    if P == 0:
        return
    # Only images below their class's limit that beat its current largest pool hash can enter the
    # pool; most batches hold none once the pool is full, and skipping them keeps this cheap.
    hashes = pool_hashes(keys, seed)
    limit = np.minimum(stats.pool_hash[labels, -1], pool_limit(class_counts, P)[labels])
    candidate = hashes < limit
    for c in np.unique(labels[candidate]).tolist():
        rows = np.nonzero(candidate & (labels == c))[0]
        stats._offer(c, hashes[rows], images[torch.from_numpy(rows)].cpu(), [keys[i] for i in rows])
