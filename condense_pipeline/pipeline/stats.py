"""The statistics stage on Ray: shards -> decoded images -> StatsWorker actors -> ClassStats.

The stage in four parts, each in its own place:

- the plan (`_plan`, here): the work units (`shards_per_unit` shards each), which of them a
  resume still has to do, and which images the readers decode;
- the dispatch (dispatch.py): Ray Data reads a unit, the driver hands its blocks to the workers,
  a watchdog fails a unit that stops progressing;
- the commit (commits.py): at most every `commit_interval_s`, every worker writes its accumulator
  as a checkpoint and progress.json names them with the units they hold, so a crash never counts
  a unit twice and loses at most one interval; after a failure every unit since the last commit
  is rerun on rebuilt workers;
- the merge (class_files.py): the committed checkpoints summed one class group at a time into
  stats/ (DESIGN.md section 7).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from condense_pipeline import rejects, storage
from condense_pipeline.condense.bank import NEEDS, BankSpec, ProbeBank, pilot_size
from condense_pipeline.condense.experts import EXPERTS_JSON, experts_dir
from condense_pipeline.condense.numerics import numerics
from condense_pipeline.condense.sampling import needed
from condense_pipeline.condense.stats import (
    HELD_PER_PROBE,
    START_FILL,
    ClassStats,
    PendingForwards,
)
from condense_pipeline.config import StatsConfig
from condense_pipeline.datasets import Profile
from condense_pipeline.errors import Stopped, UserError
from condense_pipeline.formats import BANK_JSON, ERROR, IMAGE, KEY, LABEL, SHARD, STATS_DIR
from condense_pipeline.pipeline import class_files, lineage, pilot, read
from condense_pipeline.pipeline.class_files import group_starts
from condense_pipeline.pipeline.cluster import ensure_ray, plan_workers
from condense_pipeline.pipeline.commits import PARTIAL_DIR, Commits, UnitFailed
from condense_pipeline.pipeline.dispatch import (
    BLOCKS_PER_WORKER,
    Readers,
    Workers,
    drain,
    feed,
)

log = logging.getLogger(__name__)

BANDWIDTHS = "bandwidths.safetensors"
ATTEMPTS = 3  # failures in a row (without a commit between) before the stage gives up


def stats_dir(run_dir: str) -> str:
    return storage.join(run_dir, STATS_DIR)


def dataset_fingerprint(info: dict) -> str:
    """Identifies the training data: its classes and every shard's checksum."""
    parts = [info["name"], *info["classes"], *(s["sha256"] for s in info["shards"])]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def bank_spec(profile: Profile, cfg: StatsConfig, experts: dict | None = None) -> BankSpec:
    """The bank of `cfg`; `experts`: the experts.json its trained probes draw from."""
    needs = sorted({need for m in cfg.methods for need in NEEDS[m]})
    trained = {}
    if cfg.trained_probes:
        trained = dict(
            trained=cfg.trained_probes,
            experts=cfg.experts or experts["experts"],
            experts_fingerprint=experts["fingerprint"],
        )
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
        pilot_per_class=(cfg.pilot_per_class or pilot_size(cfg.real_per_probe))
        if "rff" in needs
        else 0,
        **trained,
    )


def read_experts(run_dir: str, cfg: StatsConfig, dataset: str) -> dict | None:
    """The experts.json that `cfg`'s trained probes draw from (None without trained probes),
    refused when it holds too few experts or experts trained on other data."""
    if not cfg.trained_probes:
        return None
    location = storage.join(experts_dir(run_dir), EXPERTS_JSON)
    if not storage.exists(location):
        raise UserError(
            f"--trained-probes needs experts and {location} does not exist; run "
            "`condense-pipeline train-probes` with this run directory first"
        )
    experts = storage.read_json(location)
    if experts["dataset"] != dataset:
        raise UserError(
            f"the experts in {experts_dir(run_dir)} were trained on other data than these "
            "shards; rerun train-probes on them"
        )
    if cfg.experts > experts["experts"]:
        raise UserError(
            f"--experts {cfg.experts} asks for more experts than the {experts['experts']} "
            "trained; rerun train-probes with --experts"
        )
    return experts


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
        experts: str | None = None,
    ):
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus (1); the plan may leave it more
        torch.set_num_threads(threads)
        self.bank = ProbeBank(spec, device, experts)
        self.init_pool = init_pool
        self.stats = ClassStats.zeros(self.bank, init_pool)
        self.pending = PendingForwards(
            self.bank,
            counts,
            bandwidths,
            spec.attention_power,
            capacity_bytes=buffer_mib * 2**20,
            capacity_forwards=HELD_PER_PROBE[self.bank.device.type] * spec.probes,
        )

    def load(self, checkpoints: list[str]) -> None:
        """Start from the sum of committed checkpoints (none: from zero), a group at a time."""
        self.pending.clear()
        if not checkpoints:
            self.stats = ClassStats.zeros(self.bank, self.init_pool)
            return
        groups = group_starts(self.bank.spec.num_classes)
        device = self.bank.device
        parts = [class_files.load_group(checkpoints, start, device) for start in groups]
        self.stats = class_files.concat_classes(parts)

    def consume(self, block, batch_size: int) -> tuple[int, bool]:
        """Add one block of decoded rows; returns the probe forwards it takes and whether the
        worker is full while its last flush still runs (the driver then calls `flush` until it
        is not, before it sends the next block)."""
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
                rejects.count(self.stats.rejected, shard, err)
            good = errors == ""
            if good.any():  # forwarded at a flush, probe by probe, while the next blocks come
                forwards += self.pending.add(
                    self.stats,
                    torch.from_numpy(np.ascontiguousarray(batch[IMAGE][good])),
                    batch[LABEL][good],
                    [str(k) for k in batch[KEY][good]],
                )
                if self.pending.fill >= START_FILL and not self.pending.busy:
                    self.pending.start(self.stats)
        return forwards, self._stalled()

    def flush(self, seconds: float) -> tuple[int, bool]:
        """While stalled, wait up to `seconds` for the running flush, and start the next once it
        ends; returns, as `consume` does, the forwards added (none) and whether the worker is
        still stalled. (Both blocks a worker has queued may ask: the second must not wait for
        the flush the first started.)"""
        if self._stalled() and self.pending.wait(seconds):
            self.pending.start(self.stats)
        return 0, self._stalled()

    def _stalled(self) -> bool:
        return self.pending.full and self.pending.busy

    def drain(self, seconds: float) -> int:
        """Forward what is held, waiting up to `seconds`; returns the forwards still due."""
        if self.pending.wait(seconds):
            self.pending.start(self.stats)
        return self.pending.due

    def save(self, location: str) -> dict:
        """Write the accumulator as a checkpoint folder of class files; returns its read counts
        and the bytes written (the driver checks the bad fraction at every commit)."""
        self.pending.flush(self.stats)  # the driver drained it: a checkpoint holds every image
        written = class_files.save_groups(self.stats, location)
        good = int(self.stats.seen.sum())
        return {"good": good, "rejected": self.stats.rejected, "bytes": written}

    def numerics(self) -> dict:
        """The device and TF32 settings this worker computes with (for bank.json)."""
        return numerics(self.bank.device)


# -- the driver --------------------------------------------------------------------------------
@dataclass
class StatsResult:
    run_dir: str
    reused: bool
    summary: dict


def _satisfies(old: BankSpec, new: BankSpec) -> list[str]:
    """What keeps existing statistics from serving a new request ([] when they serve it)."""
    # every field, also those to_json leaves out at their defaults (trained probes, the pilot)
    a, b = asdict(old), asdict(new)
    loose = {"statistics", "rff_dim", "attention_power", "pilot_per_class", "extra"}
    diff = [f"{k}: {a[k]} -> {b[k]}" for k in b if k not in loose and a[k] != b[k]]
    missing = set(new.statistics) - set(old.statistics)
    if missing:
        diff.append(f"lacks {', '.join(sorted(missing))}")
    if "rff" in new.statistics and "rff" in old.statistics:
        for name in ("rff_dim", "pilot_per_class"):
            if a[name] != b[name]:
                diff.append(f"{name}: {a[name]} -> {b[name]}")
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
    """Compute (or reuse) the statistics for `cfg.methods` on the shards at `data`. Ctrl-C or
    SIGTERM (a KeyboardInterrupt) ends it with Stopped, which says what was committed."""
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
    dataset = dataset_fingerprint(info)
    spec = bank_spec(profile, cfg, read_experts(run_dir, cfg, dataset))
    folder = stats_dir(run_dir)
    bank_json = {
        "spec": spec.to_json(),
        "dataset": dataset,
        "init_pool": cfg.init_pool,
    }
    if storage.exists(storage.join(folder, BANK_JSON)):
        if overwrite:
            ensure_ray(address)  # a cluster that cannot be joined fails before the old ones go
            storage.delete(folder)
        elif _check_existing(folder, bank_json):
            return StatsResult(run_dir, True, storage.read_json(storage.join(folder, "_DONE")))
        else:  # resuming: keep what the first workers recorded
            old = storage.read_json(storage.join(folder, BANK_JSON))
            bank_json["numerics"] = old.get("numerics")

    ensure_ray(address)
    started = time.perf_counter()
    bank_json.update(data=data, profile=profile.name, class_names=info["classes"])
    if spec.trained:  # what the spec implies, written out for whoever reads bank.json
        bank_json["trained_probes"] = [
            dict(zip(("probe", "expert", "beta"), (k, *spec.trained_probe(k))))
            for k in range(spec.trained)
        ]
    experts = experts_dir(run_dir) if spec.trained else None
    storage.write_json(storage.join(folder, BANK_JSON), bank_json)
    units, wanted = _plan(shards, spec, cfg, counts)
    whole = sum(s["samples"] for s in info["shards"])
    commits = Commits(folder, cfg.commit_interval_s, whole, cfg.max_bad_fraction)
    workers = readers = None
    try:
        bandwidths = _bandwidths(folder, shards, profile, spec, cfg, counts, say, experts)
        args = (spec, cfg.init_pool, counts, bandwidths)
        kwargs = {"buffer_mib": cfg.buffer_mib, "experts": experts}
        workers = Workers(StatsWorker, args, kwargs, cfg.workers, cfg.stall_timeout_s, say)
        depth = max(1, workers.plan.workers) * BLOCKS_PER_WORKER
        readers = Readers(units, profile, wanted, depth)
        _run_units(units, readers, workers, commits, cfg, say)
    except KeyboardInterrupt:
        raise Stopped(f"stats: {commits.describe(len(units))}") from None
    finally:  # a failed or stopped stage leaves no reading and no worker behind
        for part in (readers, workers):
            if part is not None:
                part.stop()
    if workers.numerics is not None:  # recorded inside a worker (bank.json says what applied)
        bank_json["numerics"] = workers.numerics
        storage.write_json(storage.join(folder, BANK_JSON), bank_json)

    merged = class_files.merge(commits.checkpoints, profile.num_classes, folder)
    images = int(merged.seen.sum())
    reads = read.ReadSummary(good=images, rejected=merged.rejected)
    read.check_rejects(reads, cfg.max_bad_fraction)
    seconds = time.perf_counter() - started
    summary = {
        "images": images,
        "skipped": reads.num_rejected,
        "rejected": merged.rejected,
        "forwards": commits.state["forwards"],
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "workers": workers.plan.workers,
        "device": workers.plan.device,
        "retries": commits.state["retries"],
        "commits": commits.state["commits"],
        "checkpoint_bytes": commits.state["checkpoint_bytes"],
        "class_images": merged.seen.tolist(),
    }
    if bandwidths is not None:
        ratio = merged.exact_bandwidth / bandwidths
        summary["pilot_bandwidth_ratio"] = {
            "median": float(ratio.median()),
            "min": float(ratio.min()),
            "max": float(ratio.max()),
        }
    storage.mark_done(folder, summary)
    # every checkpoint, including any a failed attempt wrote and progress.json never named
    storage.delete(storage.join(folder, PARTIAL_DIR))
    return StatsResult(run_dir, False, summary)


def _plan(shards: list[str], spec: BankSpec, cfg: StatsConfig, counts):
    """The work units (lists of shards) and the readers' filter: they decode only what some
    probe samples or what may enter an init pool."""
    wanted = functools.partial(
        needed,
        seed=spec.seed,
        probes=spec.probes,
        real_per_probe=spec.real_per_probe,
        counts=counts,
        init_pool=cfg.init_pool,
    )
    per = cfg.shards_per_unit
    return [shards[i : i + per] for i in range(0, len(shards), per)], wanted


def _run_units(units, readers: Readers, workers: Workers, commits: Commits, cfg, say) -> None:
    """Every unit not committed yet, each read and fed to the workers, with a commit when one is
    due and after the last. A unit that fails discards the work since the last commit: the
    workers are rebuilt from the committed checkpoints and those units run again."""
    failures = 0
    while todo := [u for u in range(len(units)) if u not in commits.done_units]:
        u = todo[0]
        try:
            for n, u in enumerate(todo):
                blocks = readers.blocks(u)  # reading starts while the workers start
                actors = workers.start(commits.checkpoints)
                if n + 1 < len(todo):  # the next unit's first blocks wait while this one ends
                    readers.blocks(todo[n + 1])
                forwards = feed(actors, blocks, cfg.batch_size, cfg.stall_timeout_s)
                readers.done(u)
                say(f"unit {u + 1}/{len(units)} done ({len(units[u])} shards)")
                commits.add(u, forwards)
                if commits.due() or n + 1 == len(todo):
                    # the workers forward what they hold first: on a CPU that can take minutes
                    say(
                        f"committing {len(commits.pending)} unit(s): "
                        f"{commits.pending_forwards:,} probe forwards, then the checkpoints"
                    )
                    drain(actors, cfg.stall_timeout_s)
                    commits.commit(actors, cfg.stall_timeout_s)
                    failures = 0
        except UnitFailed as failure:
            failures += 1
            lost = len(commits.pending) + 1
            commits.discard(u, failures, str(failure))
            say(f"unit {u + 1}: {failure}; rebuilding workers and rerunning {lost} unit(s)")
            readers.stop()
            workers.discard()
            if failures == ATTEMPTS:
                raise UserError(
                    f"stats stage stalled: unit {u + 1} failed {ATTEMPTS} times ({failure})"
                ) from None


def _bandwidths(folder, shards, profile, spec, cfg, counts, say, experts) -> torch.Tensor | None:
    """M3D's per (probe, class) bandwidths: from the pilot, computed once and stored."""
    if "rff" not in spec.statistics:
        return None
    path = storage.join(folder, BANDWIDTHS)
    if storage.exists(path):
        return _load_tensor(path)
    say(f"bandwidth pilot: {spec.pilot_per_class} images per class")
    images, labels = pilot.pilot_images(
        shards, profile, counts, spec.pilot_per_class, cfg.seed, cfg.stall_timeout_s
    )
    plan = plan_workers(cfg.workers)
    bandwidths = pilot.bandwidths(spec, images, labels, plan, cfg.stall_timeout_s, experts)
    _save_tensor(path, bandwidths)
    return bandwidths


def _save_tensor(location: str, t: torch.Tensor) -> None:
    from safetensors.torch import save

    storage.write_bytes(location, save({"t": t.contiguous()}))


def _load_tensor(location: str) -> torch.Tensor:
    from safetensors.torch import load

    return load(storage.read_bytes(location))["t"]


def load_stats(run_dir: str, classes: list[int], device="cpu") -> ClassStats:
    """The finished statistics of `classes` (in order), reading only the files holding them."""
    return class_files.load_classes(stats_dir(run_dir), classes, device)


def load_bandwidths(run_dir: str) -> torch.Tensor | None:
    path = storage.join(stats_dir(run_dir), BANDWIDTHS)
    return _load_tensor(path) if storage.exists(path) else None
