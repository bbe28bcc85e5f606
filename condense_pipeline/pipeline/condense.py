"""The condensation stage on Ray: one task per class group, checkpointed, resumable.

Each group's task rebuilds the probe bank from bank.json, reads only its classes' statistics,
runs the loop, and writes its images; the group's completion marker is written last. The driver
reruns a group whose task was lost (its worker or node died) from the group's last checkpoint and
reports it; a rerun of the stage skips finished groups. Each task writes a heartbeat (its step)
when it starts, once its targets are built and every few seconds while stepping; the stage fails
when no group has sent one for `stall_timeout_s`.
Instance norm makes every sample independent, so the grouping does not change the images.

Scheduling: at most one group task per GPU at a time (the default is one group per GPU; more
groups queue), each putting its images through the network in chunks sized from its GPU's free
memory, so any group fits on any GPU. Without GPUs, the groups that run at once share a node's
CPUs (one group per node by default, using all of its CPUs) and size their chunks from their
share of the node's available memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from condense_pipeline import storage
from condense_pipeline.condense.bank import NEEDS, BankSpec, ProbeBank
from condense_pipeline.condense.device import chunk_size, image_bytes
from condense_pipeline.condense.experts import experts_dir
from condense_pipeline.condense.loop import LoopState, condense_loop, initial_state
from condense_pipeline.condense.synthetic import decode_factor
from condense_pipeline.condense.targets import BankTargets, OnlineTargets
from condense_pipeline.config import CondenseConfig, check_pool
from condense_pipeline.errors import Stopped, UserError
from condense_pipeline.formats import BANK_JSON, CONDENSE_DIR
from condense_pipeline.pipeline import lineage, read
from condense_pipeline.pipeline.cluster import ensure_ray, ray_failure
from condense_pipeline.pipeline.stats import load_bandwidths, load_stats, stats_dir

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
HEARTBEAT = "heartbeat.json"
RESULT = "images.safetensors"
CHECKPOINT_EVERY = 200  # steps
HEARTBEAT_S = 5.0  # a group's heartbeat interval, and how often the driver looks at them
ATTEMPTS = 3  # runs of a group whose task is lost before the stage fails


def condense_dir(run_dir: str, cfg: CondenseConfig) -> str:
    return storage.join(run_dir, CONDENSE_DIR, cfg.folder_name())


def read_bank(run_dir: str) -> dict:
    folder = stats_dir(run_dir)
    if not storage.is_done(folder):
        raise UserError(
            f"no finished statistics in {folder}; run `condense-pipeline stats` (or `run`) first"
        )
    return storage.read_json(storage.join(folder, BANK_JSON))


def check_stats_serve(bank_json: dict, cfg: CondenseConfig, summary: dict) -> None:
    """Refuse statistics that lack what the method needs, or an init pool too small."""
    spec = BankSpec.from_json(bank_json["spec"])
    missing = [s for s in NEEDS[cfg.method] if s not in spec.statistics]
    if missing and cfg.targets == "bank":
        raise UserError(
            f"the statistics were computed for {', '.join(spec.statistics)} and lack what "
            f"{cfg.method} needs ({', '.join(missing)}); rerun stats with --method {cfg.method} "
            "or --method all"
        )
    check_pool(lineage.pool_sizes(bank_json, summary), cfg)


@dataclass(frozen=True)
class GroupResources:
    """What one group task asks Ray for, and the share of its device's memory it may fill."""

    num_cpus: int
    num_gpus: int
    memory_share: float

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus else "cpu"


def group_resources(groups: int | None) -> tuple[int, GroupResources]:
    """(groups, each task's resources) from the alive nodes: one whole GPU per task (groups
    beyond the GPU count wait for one), or, without GPUs, the CPUs of a node split between the
    groups that run on it at once. `groups` None: one per GPU, or one per node."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    gpus = sum(int(r.get("GPU", 0)) for r in nodes)
    if gpus:
        return groups or gpus, GroupResources(1, 1, 1.0)
    groups = groups or len(nodes)
    node_cpus = max(int(r.get("CPU", 1)) for r in nodes)
    total = sum(int(r.get("CPU", 0)) for r in nodes)
    cpus = max(1, min(node_cpus, total // groups))
    return groups, GroupResources(cpus, 0, cpus / node_cpus)


def split_groups(classes: list[int], groups: int) -> list[list[int]]:
    size = math.ceil(len(classes) / groups)
    return [classes[i : i + size] for i in range(0, len(classes), size)]


@dataclass
class CondenseResult:
    folder: str
    images: torch.Tensor  # stored images [n_classes * ipc, C, H, W], ordered by class
    labels: torch.Tensor  # [n_classes * ipc]
    history: list[dict]  # loss log rows with their group
    groups_run: int
    groups_skipped: int
    retries: list[dict] = field(default_factory=list)  # {"group", "attempt", "why"} per lost task

    def summary(self) -> dict:
        return {
            "groups_run": self.groups_run,
            "groups_reused": self.groups_skipped,
            "retries": self.retries,
        }


def run_condense(
    run_dir: str, cfg: CondenseConfig, *, address: str | None = None, progress=None
) -> CondenseResult:
    """Condense every group not yet finished; return the whole set."""
    import ray

    say = progress or (lambda line: None)
    bank_json = read_bank(run_dir)
    summary = storage.read_json(storage.join(stats_dir(run_dir), storage.DONE))
    check_stats_serve(bank_json, cfg, summary)
    spec = BankSpec.from_json(bank_json["spec"])
    classes = list(cfg.classes or range(spec.num_classes))
    folder = condense_dir(run_dir, cfg)
    lineage.claim_condensation(folder, bank_json, say)
    storage.write_json(storage.join(folder, "config.json"), asdict(cfg))
    ensure_ray(address)
    n_groups, res = group_resources(cfg.groups)
    groups = split_groups(classes, n_groups)
    # no Ray retries: the driver reruns a lost group itself, so that it can say so
    task = ray.remote(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=0)(condense_group)

    todo = [
        g
        for g, group in enumerate(groups)
        if not lineage.group_current(group_dir(folder, group), bank_json)
    ]
    # The online reference's real images are read here, by Ray Data, and put once per group: a
    # group task that read them itself would wait for read tasks its own CPUs keep from running.
    real = {}
    if cfg.targets == "online" and todo:
        per_class = real_images(bank_json, classes)
        real = {g: ray.put([per_class[classes.index(c)] for c in groups[g]]) for g in todo}

    def start(g: int):
        return task.remote(
            run_dir, cfg, groups[g], g, res.device, res.num_cpus, res.memory_share, real.get(g)
        )

    pending = {start(g): g for g in todo}
    skipped = len(groups) - len(todo)
    say(f"condensing {len(classes)} classes in {len(groups)} groups ({skipped} already done)")
    retries: list[dict] = []
    beats, last_change = {}, time.monotonic()
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=HEARTBEAT_S)
            for ref in done:
                g = pending.pop(ref)
                try:
                    ray.get(ref)  # re-raises a failure of our own code
                    say(f"group {g + 1}/{len(groups)} done")
                except ray.exceptions.RayError as e:
                    why = ray_failure(e)
                    attempt = sum(r["group"] == g for r in retries) + 1
                    retries.append({"group": g, "attempt": attempt, "why": why})
                    if attempt == ATTEMPTS:
                        raise UserError(
                            f"condense stage failed: group {g + 1} was lost {ATTEMPTS} times "
                            f"({why})"
                        ) from None
                    say(f"group {g + 1}: task lost ({why}); rerunning it from its checkpoint")
                    pending[start(g)] = g
            now = {g: _heartbeat(folder, groups[g]) for g in pending.values()}
            if done or now != beats:
                beats, last_change = now, time.monotonic()
            elif time.monotonic() - last_change > cfg.stall_timeout_s:
                raise UserError(
                    f"condense stage stalled: no group made a step for {cfg.stall_timeout_s:.0f} "
                    f"s ({len(pending)} of {len(groups)} groups unfinished); check that the "
                    "cluster has room for the group tasks"
                )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM
        raise Stopped(f"condense: {_committed(folder, groups, bank_json)}") from None
    finally:
        for ref, g in pending.items():  # a failed or stopped stage leaves no tasks behind
            # but a group whose folder is done is returning: cancelling it races its reply,
            # which Ray 2.60's driver can die of (ray#54798's race; seen once on Ctrl-C)
            if not lineage.group_current(group_dir(folder, groups[g]), bank_json):
                ray.cancel(ref, force=True)
    images, labels, history = [], [], []
    for g, group in enumerate(groups):
        t = st_load(storage.read_bytes(storage.join(group_dir(folder, group), RESULT)))
        images.append(t["images"])
        labels.append(torch.tensor(group).repeat_interleave(cfg.ipc))
        history += [{**row, "group": g} for row in _json(t["history"])]
    return CondenseResult(
        folder, torch.cat(images), torch.cat(labels), history, len(todo), skipped, retries
    )


def _committed(folder: str, groups: list[list[int]], bank_json: dict) -> str:
    """What a rerun keeps, read from the groups' folders (a group may finish after the driver
    last looked): the finished groups, and the unfinished ones with a checkpoint."""
    done = [lineage.group_current(group_dir(folder, group), bank_json) for group in groups]
    started = sum(
        storage.exists(storage.join(group_dir(folder, group), CHECKPOINT))
        for group, finished in zip(groups, done)
        if not finished
    )
    line = f"{sum(done)} of {len(groups)} class groups done ({folder})"
    return line + (f", {started} more checkpointed" if started else "")


def group_dir(folder: str, classes: list[int]) -> str:
    """A group's folder is named by its classes, so a different grouping never reuses it."""
    digest = hashlib.sha1(",".join(map(str, classes)).encode()).hexdigest()[:8]
    return storage.join(folder, f"group-{classes[0]:05d}-{digest}")


def _heartbeat(folder: str, classes: list[int]) -> dict | None:
    """A group task's last heartbeat (its step and time), None before its first."""
    path = storage.join(group_dir(folder, classes), HEARTBEAT)
    return storage.read_json(path) if storage.exists(path) else None


def _json(t: torch.Tensor):
    return json.loads(bytes(t.numpy()).decode())


def _json_tensor(value) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)


def _save_state(location: str, state: LoopState) -> None:
    tensors = {
        "images": state.images.cpu().contiguous(),
        "velocity": state.velocity.cpu().contiguous(),
        "step": torch.tensor(state.step),
        "history": _json_tensor(state.history),
    }
    storage.write_bytes(location, st_save(tensors))


def _load_state(location: str, device) -> LoopState:
    t = st_load(storage.read_bytes(location))
    return LoopState(
        int(t["step"]), t["images"].to(device), t["velocity"].to(device), _json(t["history"])
    )


def condense_group(
    run_dir: str,
    cfg: CondenseConfig,
    classes: list[int],
    g: int,
    device: str = "cpu",
    threads: int | None = None,
    memory_share: float = 1.0,
    real: list[torch.Tensor] | None = None,
) -> None:
    """Condense one group of classes and write its images (runs as a Ray task, or in process).

    threads: torch's CPU threads (the task's CPUs); memory_share: the share of the device's free
    memory this task's chunks may fill; real: for `--targets online`, every training image of
    each of the group's classes (uint8 [n_c, H, W, ch])."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if threads:
        torch.set_num_threads(threads)
    out = group_dir(condense_dir(run_dir, cfg), classes)
    name = f"group {g + 1}"  # on screen groups count from 1, as the driver's lines do
    beat = storage.join(out, HEARTBEAT)
    # A beat at start and once the targets are built, so that start-up (loading the statistics)
    # does not count as a stall.
    storage.write_json(beat, {"step": -1, "at": time.time()})
    bank_json = read_bank(run_dir)
    spec = BankSpec.from_json(bank_json["spec"])
    bank = ProbeBank(spec, device, experts_dir(run_dir) if spec.trained else None)
    ckpt = storage.join(out, CHECKPOINT)
    stats = load_stats(run_dir, classes, device)
    if storage.exists(ckpt):
        state = _load_state(ckpt, device)
        log.info("%s: resuming at step %d", name, state.step)
    else:
        state = initial_state(stats, classes, g, cfg, bank)
    if cfg.targets == "bank":
        targets = BankTargets(bank, stats, classes, load_bandwidths(run_dir), cfg)
    else:
        summary = storage.read_json(storage.join(stats_dir(run_dir), storage.DONE))
        smallest = min(summary["class_images"])
        targets = OnlineTargets(real, classes, bank, cfg, smallest)
    storage.write_json(beat, {"step": state.step, "at": time.time()})
    last_beat = time.monotonic()

    def on_step(s: LoopState) -> None:
        nonlocal last_beat
        if s.step % CHECKPOINT_EVERY == 0 or s.step == cfg.steps:
            _save_state(ckpt, s)
        if time.monotonic() - last_beat > HEARTBEAT_S:
            storage.write_json(beat, {"step": s.step, "at": time.time()})
            last_beat = time.monotonic()

    # measured once the statistics and the images are on the device
    per_image = cfg.factor**2 * image_bytes(spec.resolution, spec.depth, cfg.method == "datadam")
    chunk = cfg.chunk or chunk_size(torch.device(device), per_image, memory_share)
    log.info("%s: %d images, %d per chunk", name, len(state.images), chunk)
    state = condense_loop(
        state,
        targets,
        cfg,
        bank,
        chunk=chunk,
        checkpoint=on_step,
        checkpoint_every=1,  # on_step decides what to write
        progress=lambda line: log.info("%s: %s", name, line),
        log_every=max(1, cfg.steps // 20),
    )
    result = {"images": state.images.cpu().contiguous(), "history": _json_tensor(state.history)}
    storage.write_bytes(storage.join(out, RESULT), st_save(result))
    storage.mark_done(
        out, lineage.group_marker(bank_json, {"classes": classes, "steps": state.step})
    )
    storage.delete(ckpt)
    storage.delete(beat)


def real_images(bank_json: dict, classes: list[int]) -> list[torch.Tensor]:
    """Every good training image of `classes`, for the online reference mode."""
    from condense_pipeline.datasets import get_profile

    spec = BankSpec.from_json(bank_json["spec"])
    profile = get_profile(bank_json["profile"], spec.resolution)
    images, labels, _ = read.read_split(
        storage.list_shards(bank_json["data"]), profile, spec.num_classes
    )
    return [torch.from_numpy(images[labels == c]) for c in classes]


def decoded_set(result: CondenseResult, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set a downstream job sees: f^2 images per stored image."""
    f2 = factor * factor
    return decode_factor(result.images, factor), result.labels.repeat_interleave(f2)
