"""The statistics stage on Ray: shards -> decoded images -> StatsWorker actors -> ClassStats.

Shards are processed in work units. Per unit, Ray Data reads the unit's shards on CPU tasks, which
decode only the images that some probe samples or that may enter an init pool, and the driver
hands each decoded block (a reference, not the rows) to the least loaded worker, which adds it to
its one running accumulator. (Not `streaming_split`: its coordinator actor costs seconds per unit,
and it stalls when a consumer dies.) Then every worker writes its accumulator as a new
checkpoint, and only after that the driver records the unit as done together with those
checkpoint names (progress.json). A crash therefore never counts a unit twice or loses one, and a
rerun skips committed units. A watchdog reruns a unit whose workers stop making progress or die
(DESIGN.md section 7).
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from condense_pipeline import storage
from condense_pipeline.condense.bank import NEEDS, BankSpec, ProbeBank, pilot_bandwidths
from condense_pipeline.condense.sampling import needed, pool_hashes
from condense_pipeline.condense.stats import ClassStats, PendingForwards
from condense_pipeline.config import StatsConfig
from condense_pipeline.datasets import Profile
from condense_pipeline.errors import UserError
from condense_pipeline.formats import BANK_JSON, ERROR, IMAGE, KEY, LABEL, SHARD, STATS_DIR
from condense_pipeline.pipeline import lineage, read
from condense_pipeline.pipeline.cluster import ensure_ray, plan_workers, ray_failure

log = logging.getLogger(__name__)

PROGRESS_JSON = "progress.json"
BANDWIDTHS = "bandwidths.safetensors"
PARTIAL_DIR = "partial"  # workers' checkpoints until the stage is done
CLASSES_PER_FILE = 100
# Blocks queued on each worker: one running, one fetched and waiting, so a worker never idles
# while the driver hands out the next block.
BLOCKS_PER_WORKER = 2


def stats_dir(run_dir: str) -> str:
    return storage.join(run_dir, STATS_DIR)


def dataset_fingerprint(info: dict) -> str:
    """Identifies the training data: its classes and every shard's checksum."""
    parts = [info["name"], *info["classes"], *(s["sha256"] for s in info["shards"])]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def bank_spec(profile: Profile, cfg: StatsConfig) -> BankSpec:
    needs = sorted({need for m in cfg.methods for need in NEEDS[m]})
    return BankSpec(
        seed=cfg.seed,
        probes=cfg.probes,
        num_classes=profile.num_classes,
        channels=profile.channels,
        resolution=profile.resolution,
        depth=profile.depth,
        mean=profile.mean,
        std=profile.std,
        augment=profile.augment,
        real_per_probe=cfg.real_per_probe,
        statistics=tuple(needs),
        rff_dim=cfg.rff_dim if "rff" in needs else 0,
        attention_power=cfg.attention_power,
    )


# -- the worker --------------------------------------------------------------------------------
class StatsWorker:
    """Holds one running accumulator; the driver hands it blocks of decoded rows."""

    def __init__(
        self,
        spec: BankSpec,
        init_pool: int,
        counts,
        bandwidths,
        device: str,
        threads: int = 1,
        buffer_mib: int = 512,
    ):
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus (1); the plan may leave it more
        torch.set_num_threads(threads)
        self.bank = ProbeBank(spec, device)
        self.init_pool = init_pool
        self.stats = ClassStats.zeros(self.bank, init_pool)
        self.pending = PendingForwards(
            self.bank, counts, bandwidths, spec.attention_power, buffer_mib * 2**20
        )

    def load(self, checkpoints: list[str]) -> None:
        """Start from the sum of committed checkpoints (none: from zero)."""
        self.pending.clear()
        self.stats = ClassStats.zeros(self.bank, self.init_pool)
        for path in checkpoints:
            self.stats = self.stats + ClassStats.load(path, self.bank.device)

    def consume(self, block, batch_size: int) -> int:
        """Add one block of decoded rows; returns the probe forwards it takes."""
        from ray.data.block import BlockAccessor

        rows = BlockAccessor.for_block(block).to_numpy()
        forwards = 0
        for start in range(0, len(rows[ERROR]), batch_size):
            batch = {k: v[start : start + batch_size] for k, v in rows.items()}
            errors = batch[ERROR]
            unused = errors == read.UNUSED  # good samples no probe or pool needs: counted only
            self.stats.seen += torch.bincount(
                torch.from_numpy(batch[LABEL][unused]), minlength=len(self.stats.seen)
            )
            bad = (errors != "") & ~unused
            for shard, err in zip(batch[SHARD][bad], errors[bad]):
                kinds = self.stats.rejected.setdefault(str(shard), {})
                kind = read.reason_kind(str(err))
                kinds[kind] = kinds.get(kind, 0) + 1
            good = errors == ""
            if good.any():  # forwarded now or at a later flush, probe by probe
                forwards += self.pending.add(
                    self.stats,
                    torch.from_numpy(np.ascontiguousarray(batch[IMAGE][good])),
                    batch[LABEL][good],
                    [str(k) for k in batch[KEY][good]],
                )
        return forwards

    def save(self, location: str) -> None:
        self.pending.flush(self.stats)  # a checkpoint holds every image consumed before it
        self.stats.save(location)


def worker_threads(plan) -> int:
    """Torch threads per stats worker: the cluster's CPUs shared among the workers. The reading
    needs CPUs too, but a worker that holds its images forwards most of them after the reading
    of what it holds, so the oversubscription is short."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)) // plan.workers)


# -- the driver --------------------------------------------------------------------------------
@dataclass
class StatsResult:
    run_dir: str
    reused: bool
    summary: dict


def _satisfies(old: BankSpec, new: BankSpec) -> list[str]:
    """What keeps existing statistics from serving a new request ([] when they serve it)."""
    a, b = old.to_json(), new.to_json()
    loose = {"statistics", "rff_dim", "attention_power", "extra"}
    diff = [f"{k}: {a[k]} -> {b[k]}" for k in b if k not in loose and a[k] != b[k]]
    missing = set(new.statistics) - set(old.statistics)
    if missing:
        diff.append(f"lacks {', '.join(sorted(missing))}")
    if "rff" in new.statistics and "rff" in old.statistics and old.rff_dim != new.rff_dim:
        diff.append(f"rff_dim: {old.rff_dim} -> {new.rff_dim}")
    if "att" in new.statistics and "att" in old.statistics:
        if old.attention_power != new.attention_power:
            diff.append(f"attention_power: {old.attention_power} -> {new.attention_power}")
    return diff


def _check_existing(folder: str, bank_json: dict) -> bool:
    """True when finished statistics there serve this request; False to resume an unfinished
    pass with the same settings; refuses statistics computed with conflicting settings."""
    existing = storage.read_json(storage.join(folder, BANK_JSON))
    old, new = BankSpec.from_json(existing["spec"]), BankSpec.from_json(bank_json["spec"])
    diff = (
        _satisfies(old, new)
        if storage.is_done(folder)
        else _satisfies(new, old) + _satisfies(old, new)
    )
    if existing["dataset"] != bank_json["dataset"]:
        diff.append("the training data changed")
    diff += lineage.pool_conflict(existing, bank_json, storage.is_done(folder))
    if diff:
        raise UserError(
            f"{folder} holds statistics computed with other settings ({'; '.join(diff)}); "
            "use another run directory or pass --overwrite"
        )
    return storage.is_done(folder)


def pilot_images(shards, profile, counts, per_class: int, seed: int):
    """Per class the `per_class` images with the smallest pool hash among the first shards that
    hold enough of every class (shards are shuffled at prepare, so these are a random sample).
    Only an image that enters its class's running selection is decoded, and only the selections
    are kept: decodes per class grow like per_class * (1 + ln(read / per_class)), not like read."""
    want = np.minimum(np.asarray(counts), per_class)
    seen = np.zeros(len(counts), dtype=np.int64)
    chosen: list[list] = [[] for _ in counts]  # per class a max-heap of (-hash, key, image)
    for shard in shards:
        for raw in read.iter_shard(shard):
            c = read.check_raw(raw, len(counts))
            if isinstance(c, str):
                continue
            seen[c] += 1
            h, heap = int(pool_hashes([raw[KEY]], seed)[0]), chosen[c]
            if len(heap) == want[c] and h >= -heap[0][0]:
                continue
            try:
                item = (-h, raw[KEY], read.decode_image(raw[read.DATA], profile))
            except ValueError:  # a bad image: skipped here, counted by the pass itself
                continue
            if len(heap) < want[c]:
                heapq.heappush(heap, item)
            else:
                heapq.heapreplace(heap, item)
        if np.all((seen >= 4 * want) | (seen >= counts)):
            break
    images, labels = [], []
    for c, heap in enumerate(chosen):
        images += [image for _, _, image in sorted(heap, reverse=True)]  # smallest hash first
        labels += [c] * len(heap)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def run_stats(
    profile: Profile,
    data: str,
    run_dir: str,
    cfg: StatsConfig,
    *,
    address: str | None = None,
    overwrite: bool = False,
    progress=None,
) -> StatsResult:
    """Compute (or reuse) the statistics for `cfg.methods` on the shards at `data`."""
    import ray

    say = progress or (lambda line: None)
    shards = storage.list_shards(data)
    info = read.load_dataset_info(data)
    if len(info["classes"]) != profile.num_classes:
        raise UserError(
            f"{data} holds {len(info['classes'])} classes but the {profile.name} profile has "
            f"{profile.num_classes}; prepare it with the right dataset name"
        )
    counts = np.asarray(info["counts"])
    empty = np.nonzero(counts == 0)[0]
    if len(empty):
        raise UserError(f"class {info['classes'][empty[0]]} has no training images in {data}")
    spec = bank_spec(profile, cfg)
    folder = stats_dir(run_dir)
    bank_json = {
        "spec": spec.to_json(),
        "dataset": dataset_fingerprint(info),
        "init_pool": cfg.init_pool,
    }
    extra = {"data": data, "profile": profile.name, "class_names": info["classes"]}
    if storage.exists(storage.join(folder, BANK_JSON)):
        if overwrite:
            storage.delete(folder)
        elif _check_existing(folder, bank_json):
            return StatsResult(run_dir, True, storage.read_json(storage.join(folder, "_DONE")))

    ensure_ray(address)
    plan = plan_workers(cfg.workers)
    started = time.perf_counter()
    torch_device = plan.device
    bank_json["device"] = torch_device
    bank_json["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32) if plan.num_gpus else False
    bank_json.update(extra)
    storage.write_json(storage.join(folder, BANK_JSON), bank_json)

    bandwidths = None
    if "rff" in spec.statistics:
        bw_path = storage.join(folder, BANDWIDTHS)
        if storage.exists(bw_path):
            bandwidths = _load_tensor(bw_path)
        else:
            say(f"bandwidth pilot: {cfg.pilot_per_class} images per class")
            images, labels = pilot_images(shards, profile, counts, cfg.pilot_per_class, cfg.seed)
            bandwidths = _pilot(spec, images, labels, plan, torch_device, cfg.stall_timeout_s)
            _save_tensor(bw_path, bandwidths)

    # readers decode only what some probe samples or what may enter an init pool
    wanted = functools.partial(
        needed,
        seed=spec.seed,
        probes=spec.probes,
        real_per_probe=spec.real_per_probe,
        counts=counts,
        init_pool=cfg.init_pool,
    )
    units = [
        shards[i : i + cfg.shards_per_unit] for i in range(0, len(shards), cfg.shards_per_unit)
    ]
    progress_path = storage.join(folder, PROGRESS_JSON)
    state = (
        storage.read_json(progress_path)
        if storage.exists(progress_path)
        else {"done_units": [], "checkpoints": [], "forwards": 0, "retries": []}
    )
    # one call at a time: the calls of a worker add to the same accumulator
    Worker = ray.remote(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)(StatsWorker)

    def start_workers():
        threads = worker_threads(plan)
        ws = [
            Worker.remote(
                spec, cfg.init_pool, counts, bandwidths, torch_device, threads, cfg.buffer_mib
            )
            for _ in range(plan.workers)
        ]
        loads = [w.load.remote(state["checkpoints"][i :: len(ws)]) for i, w in enumerate(ws)]
        try:
            ray.get(loads, timeout=cfg.stall_timeout_s)
        except ray.exceptions.RayError as e:  # its node was lost, or no room for it (timeout)
            for w in ws:
                ray.kill(w)
            raise _UnitFailed(f"workers did not start: {ray_failure(e)}") from e
        say(f"{len(ws)} stats worker(s) ready on {torch_device}")
        return ws

    workers, readers = [], {}  # readers: unit -> its _UnitReader, started ahead of use

    def reader(u: int) -> _UnitReader:
        if u not in readers:
            depth = max(1, plan.workers) * BLOCKS_PER_WORKER
            readers[u] = _UnitReader(units[u], profile, wanted, depth)
        return readers[u]

    todo = [u for u in range(len(units)) if u not in state["done_units"]]
    try:
        for n, u in enumerate(todo):
            for attempt in range(3):
                try:
                    blocks = reader(u).blocks  # reading starts while the workers start
                    workers = workers or start_workers()
                    if n + 1 < len(todo):  # the next unit's first blocks wait while this one ends
                        reader(todo[n + 1])
                    forwards = _dispatch(workers, blocks, cfg, say, u, len(units), len(units[u]))
                    # commit: checkpoints first (a worker lost before its checkpoint takes its part
                    # of the unit along: the unit is rerun), then the record that names them
                    names = [
                        storage.join(folder, PARTIAL_DIR, f"u{u:05d}-w{i}.safetensors")
                        for i in range(len(workers))
                    ]
                    _save_checkpoints(workers, names, cfg.stall_timeout_s)
                    break
                except _UnitFailed as failure:
                    state["retries"].append(
                        {"unit": u, "attempt": attempt + 1, "why": str(failure)}
                    )
                    say(f"unit {u + 1}: {failure}; rebuilding workers and rerunning the unit")
                    for r in readers.values():
                        r.stop()
                    readers.clear()
                    _wait_for_verdicts(workers, cfg.stall_timeout_s)
                    for w in workers:
                        ray.kill(w)
                    workers = []
                    if attempt == 2:
                        raise UserError(
                            f"stats stage stalled: unit {u + 1} failed 3 times ({failure})"
                        ) from None
                    plan = plan_workers(cfg.workers)  # from what is left after a lost node
            readers.pop(u).stop()
            old = state["checkpoints"]
            state = {
                **state,
                "done_units": state["done_units"] + [u],
                "checkpoints": names,
                "forwards": state["forwards"] + forwards,
            }
            storage.write_json(progress_path, state)
            for path in old:
                storage.delete(path)
    finally:  # a failed stage leaves no reading behind
        for r in readers.values():
            r.stop()

    total = None
    for path in state["checkpoints"]:
        part = ClassStats.load(path)
        total = part if total is None else total + part
    for w in workers:
        ray.kill(w)
    images = int(total.seen.sum())
    summary_reads = read.ReadSummary(good=images, rejected=total.rejected)
    read.check_rejects(summary_reads, cfg.max_bad_fraction)
    for start in range(0, profile.num_classes, CLASSES_PER_FILE):
        classes = list(range(start, min(start + CLASSES_PER_FILE, profile.num_classes)))
        total.select(classes).save(storage.join(folder, class_file(start)))
    seconds = time.perf_counter() - started
    summary = {
        "images": images,
        "skipped": summary_reads.num_rejected,
        "rejected": total.rejected,
        "forwards": state["forwards"],
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "workers": plan.workers,
        "device": torch_device,
        "retries": state["retries"],
        "class_images": total.seen.tolist(),
    }
    if bandwidths is not None:
        ratio = total.exact_bandwidth() / bandwidths
        summary["pilot_bandwidth_ratio"] = {
            "median": float(ratio.median()),
            "min": float(ratio.min()),
            "max": float(ratio.max()),
        }
    storage.mark_done(folder, summary)
    # every checkpoint, including any a failed attempt wrote and progress.json never named
    storage.delete(storage.join(folder, PARTIAL_DIR))
    return StatsResult(run_dir, False, summary)


def class_file(start: int) -> str:
    return f"classes-{start:05d}.safetensors"


class _UnitFailed(Exception):
    pass


def _wait_for_verdicts(workers, timeout: float) -> None:
    """Wait while Ray holds a worker 'unavailable'. A worker on a lost node is that until the
    node is declared dead, and until then the cluster's resources still count the node: workers
    sized from them would take the CPUs the reads need, and the rerun would stall."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayError

    deadline = time.monotonic() + timeout
    for w in workers:
        while time.monotonic() < deadline:
            try:
                ray.get(w.__ray_ready__.remote(), timeout=5)
            except ActorUnavailableError:
                time.sleep(1)
                continue
            except RayError:
                pass  # dead (its node no longer counted), or alive but busy
            break


def _save_checkpoints(workers, names: list[str], timeout: float) -> None:
    import ray

    try:
        ray.get([w.save.remote(n) for w, n in zip(workers, names)], timeout=timeout)
    except ray.exceptions.RayError as e:
        raise _UnitFailed(f"a worker was lost before its checkpoint: {ray_failure(e)}") from e


def _dispatch(workers, blocks, cfg, say, u, n_units, n_shards) -> int:
    """Hand a unit's blocks to the workers, each to the least loaded one, at most
    BLOCKS_PER_WORKER at a time; returns the probe forwards. A worker that dies fails its call
    at once (a streaming_split would stall on it)."""
    import ray
    from ray.exceptions import RayError

    load = [0] * len(workers)
    calls: dict = {}  # call ref -> worker index
    forwards, last_change, feeding = 0, time.monotonic(), True
    while feeding or calls:
        progressed = False
        while feeding and min(load) < BLOCKS_PER_WORKER:
            try:
                block = blocks.get(timeout=0.05 if calls else 2.0)
            except queue.Empty:
                break
            if isinstance(block, BaseException):
                raise _UnitFailed(f"reading the unit failed: {block}")
            if block is None:
                feeding = False
                break
            i = load.index(min(load))
            calls[workers[i].consume.remote(block, cfg.batch_size)] = i
            load[i] += 1
            progressed = True
        if calls:
            done, _ = ray.wait(list(calls), num_returns=1, timeout=0.0 if progressed else 2.0)
            for ref in done:
                load[calls.pop(ref)] -= 1
                try:
                    forwards += ray.get(ref)
                except RayError as e:
                    raise _UnitFailed(f"a worker died or failed: {ray_failure(e)}") from e
                progressed = True
        if progressed:
            last_change = time.monotonic()
        elif time.monotonic() - last_change > cfg.stall_timeout_s:
            raise _UnitFailed(f"no progress for {cfg.stall_timeout_s:.0f} s")
    say(f"unit {u + 1}/{n_units} done ({n_shards} shards)")
    return forwards


class _UnitReader:
    """Reads one unit's shards with Ray Data in a thread: the block references go on `blocks`,
    then None (or the exception raised). Ray Data reads and decodes on CPU tasks; the driver
    only passes references on, so rows go from the object store to a worker once. The thread
    keeps the driver free to notice a unit that makes no progress at all."""

    def __init__(self, shards: list[str], profile: Profile, wanted, depth: int):
        self.blocks: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        ds = read.read_images(shards, profile, profile.num_classes, wanted=wanted)
        threading.Thread(target=self._feed, args=(ds,), daemon=True).start()

    def stop(self) -> None:
        """Stop reading; Ray Data shuts the unit's execution down."""
        self._stop.set()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self.blocks.put(item, timeout=1.0)
                return True
            except queue.Full:
                pass
        return False

    def _feed(self, ds) -> None:
        try:
            for bundle in ds.iter_internal_ref_bundles():
                for block in bundle.block_refs:
                    if not self._put(block):
                        return
            self._put(None)
        except Exception as e:  # handed to the driver's loop, which fails the unit
            self._put(e)


def _pilot(spec: BankSpec, images, labels, plan, device: str, timeout: float) -> torch.Tensor:
    """The bandwidth pilot as one Ray task (on a GPU where there are GPUs). Ray reruns it when
    its node is lost; one that has not finished after `timeout` fails the stage."""
    import ray

    task = ray.remote(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)(_pilot_task)
    ref = task.remote(spec, images, labels, device, worker_threads(plan))
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise UserError(
            f"stats stage stalled: the M3D bandwidth pilot did not finish in {timeout:.0f} s; "
            "check that the cluster has room for it"
        ) from None


def _pilot_task(spec: BankSpec, images, labels, device: str, threads: int):
    torch.set_num_threads(threads)  # it runs before the workers: their CPUs are free
    return pilot_bandwidths(ProbeBank(spec, device), images, labels)


def _save_tensor(location: str, t: torch.Tensor) -> None:
    from safetensors.torch import save

    storage.write_bytes(location, save({"t": t.contiguous()}))


def _load_tensor(location: str) -> torch.Tensor:
    from safetensors.torch import load

    return load(storage.read_bytes(location))["t"]


def load_stats(run_dir: str, classes: list[int], device="cpu") -> ClassStats:
    """The finished statistics of `classes` (in order), reading only the files holding them."""
    folder = stats_dir(run_dir)
    parts = {}
    for start in sorted({c // CLASSES_PER_FILE * CLASSES_PER_FILE for c in classes}):
        parts[start] = ClassStats.load(storage.join(folder, class_file(start)), device)
    pieces = [
        parts[c // CLASSES_PER_FILE * CLASSES_PER_FILE].select([c % CLASSES_PER_FILE])
        for c in classes
    ]
    return concat_classes(pieces)


def load_bandwidths(run_dir: str) -> torch.Tensor | None:
    path = storage.join(stats_dir(run_dir), BANDWIDTHS)
    return _load_tensor(path) if storage.exists(path) else None


def concat_classes(parts: list[ClassStats]) -> ClassStats:
    """Join statistics of disjoint class lists along the class axis."""

    def cat(ts, dim=1):
        return None if ts[0] is None else torch.cat(ts, dim)

    return ClassStats(
        count=cat([p.count for p in parts]),
        sqnorm_sum=cat([p.sqnorm_sum for p in parts]),
        emb_sum=cat([p.emb_sum for p in parts]),
        rff_sum=cat([p.rff_sum for p in parts]),
        att_sum=[cat([p.att_sum[i] for p in parts]) for i in range(len(parts[0].att_sum))],
        seen=torch.cat([p.seen for p in parts]),
        rejected=parts[0].rejected,
        pool_hash=np.concatenate([p.pool_hash for p in parts]),
        pool_images=torch.cat([p.pool_images for p in parts]),
        pool_keys=[k for p in parts for k in p.pool_keys],
    )
