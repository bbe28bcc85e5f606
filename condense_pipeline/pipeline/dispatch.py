"""The dispatch: Ray Data reads a unit's shards, and the driver hands each decoded block (a
reference, not the rows) to the least loaded stats worker. (Not `streaming_split`: its
coordinator actor costs seconds per unit, and it stalls when a consumer dies.) A watchdog fails
the unit when nothing progresses for the stall timeout, and a worker that dies fails its call at
once; either way the caller reruns the units since the last commit on rebuilt workers.
"""

from __future__ import annotations

import functools
import logging
import queue
import time

from condense_pipeline.datasets import Profile
from condense_pipeline.pipeline import read
from condense_pipeline.pipeline.cluster import plan_workers, ray_failure, worker_threads
from condense_pipeline.pipeline.commits import UnitFailed

log = logging.getLogger(__name__)

# Blocks queued on each worker: one running, one fetched and waiting, so a worker never idles
# while the driver hands out the next block.
BLOCKS_PER_WORKER = 2
# A worker's flush (its held images forwarded probe by probe: minutes on a CPU) runs on a thread
# of its own; a driver that waits for one does so in calls of about this many seconds, so a slow
# or busy machine is told from a stalled one.
FLUSH_CALL_S = 10.0


class Workers:
    """The stats worker actors: started from the committed checkpoints, rebuilt after a loss
    from the resources that remain."""

    def __init__(
        self, worker_class, args: tuple, kwargs: dict, requested: int | None, timeout: float, say
    ):
        self.worker_class, self.args, self.kwargs = worker_class, args, kwargs
        self.requested, self.timeout, self.say = requested, timeout, say
        self.plan = plan_workers(requested)
        self.actors: list = []
        self.numerics: dict | None = None  # what the first workers computed with

    def start(self, checkpoints: list[str]) -> list:
        """The workers, started (when none run) with the checkpoints dealt out among them."""
        import ray

        if self.actors:
            return self.actors
        plan = self.plan
        Worker = ray.remote(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)(self.worker_class)
        threads = worker_threads(plan)
        actors = [
            Worker.remote(*self.args, plan.device, threads=threads, **self.kwargs)
            for _ in range(plan.workers)
        ]
        loads = [w.load.remote(checkpoints[i :: len(actors)]) for i, w in enumerate(actors)]
        try:
            ray.get(loads, timeout=self.timeout)
            self.numerics = self.numerics or ray.get(actors[0].numerics.remote())
        except ray.exceptions.RayError as e:  # its node was lost, or no room for it (timeout)
            for w in actors:
                ray.kill(w)
            raise UnitFailed(f"workers did not start: {ray_failure(e)}") from e
        self.say(f"{len(actors)} stats worker(s) ready on {plan.device}")
        self.actors = actors
        return actors

    def discard(self) -> None:
        """Drop the workers and their uncommitted work; the next start sizes them anew."""
        _wait_for_verdicts(self.actors, self.timeout)
        self.stop()
        # from what is left after a lost node
        self.plan = plan_workers(self.requested, self.plan.busy_gpus)

    def stop(self) -> None:
        import ray

        for w in self.actors:
            ray.kill(w)
        self.actors = []


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


def feed(workers, blocks: queue.Queue, batch_size: int, stall_timeout_s: float) -> int:
    """Hand a unit's blocks to the workers, each to the least loaded one, at most
    BLOCKS_PER_WORKER at a time; returns the probe forwards. A worker forwards what it holds
    while it takes the next blocks; one that fills up again before that flush ends is stalled,
    and the driver waits on it in calls of FLUSH_CALL_S, each one progress, before it sends it
    more. A worker that dies fails its call at once (a streaming_split would stall on it)."""
    import ray
    from ray.exceptions import RayError

    load = [0] * len(workers)  # a block's slot is held while its worker is stalled
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
                raise UnitFailed(f"reading the unit failed: {block}")
            if block is None:
                feeding = False
                break
            i = load.index(min(load))
            calls[workers[i].consume.remote(block, batch_size)] = i
            load[i] += 1
            progressed = True
        if calls:
            done, _ = ray.wait(list(calls), num_returns=1, timeout=0.0 if progressed else 2.0)
            for ref in done:
                i = calls.pop(ref)
                try:
                    result = ray.get(ref)
                except RayError as e:
                    raise UnitFailed(f"a worker died or failed: {ray_failure(e)}") from e
                added, stalled = result  # consume and flush answer alike
                forwards += added
                if stalled:
                    calls[workers[i].flush.remote(FLUSH_CALL_S)] = i
                else:
                    load[i] -= 1
                progressed = True
        if progressed:
            last_change = time.monotonic()
        elif time.monotonic() - last_change > stall_timeout_s:
            raise UnitFailed(f"no progress for {stall_timeout_s:.0f} s")
    return forwards


def drain(workers, stall_timeout_s: float) -> None:
    """Have every worker forward all it holds, in calls of FLUSH_CALL_S (before a commit)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayError

    busy = list(workers)
    while busy:
        try:
            due = ray.get([w.drain.remote(FLUSH_CALL_S) for w in busy], timeout=stall_timeout_s)
        except GetTimeoutError:
            raise UnitFailed(f"no progress for {stall_timeout_s:.0f} s") from None
        except RayError as e:
            raise UnitFailed(f"a worker was lost before its checkpoint: {ray_failure(e)}") from e
        busy = [w for w, n in zip(busy, due) if n]


class Readers:
    """One reader per unit, started ahead of use so the next unit's first blocks are ready when
    the current one ends. Each unit is read on a thread (read.Puller), so the driver stays free
    to notice a unit that makes no progress at all."""

    def __init__(self, units: list[list[str]], profile: Profile, wanted, depth: int):
        self.units, self.profile, self.wanted, self.depth = units, profile, wanted, depth
        self.readers: dict[int, read.Puller] = {}

    def blocks(self, u: int) -> queue.Queue:
        """Unit u's block references, then None (or the exception raised)."""
        if u not in self.readers:
            blocks = functools.partial(_unit_blocks, self.units[u], self.profile, self.wanted)
            self.readers[u] = read.Puller(blocks, self.depth)
        return self.readers[u].items

    def done(self, u: int) -> None:
        self.readers.pop(u).stop()

    def stop(self) -> None:
        for r in self.readers.values():
            r.stop()
        self.readers.clear()


def _unit_blocks(shards: list[str], profile: Profile, wanted):
    """Ray Data reads and decodes on CPU tasks; the driver only passes block references on, so
    rows go from the object store to a worker once."""
    ds = read.read_images(shards, profile, profile.num_classes, wanted=wanted)
    for bundle in ds.iter_internal_ref_bundles():
        yield from bundle.block_refs
