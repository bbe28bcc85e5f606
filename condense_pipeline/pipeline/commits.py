"""The pass's commits: when the workers write their accumulators and what progress.json says.

A commit is due at most every `interval_s` seconds (and after the last unit), whatever the number
of units, so the bytes written grow with the pass's duration, not with the data. A commit writes
every worker's accumulator as a new checkpoint (a folder of class files), then progress.json,
which names those checkpoints together with the units they hold; only then are the older
checkpoints deleted. A crash therefore never counts a unit twice and loses at most the units
since the last commit; a resume, and a retry after a lost worker, start every worker from the
committed checkpoints and rerun every unit since.
"""

from __future__ import annotations

import time

from condense_pipeline import rejects, storage
from condense_pipeline.pipeline import read
from condense_pipeline.pipeline.cluster import ray_failure

PROGRESS_JSON = "progress.json"
PARTIAL_DIR = "partial"  # the workers' checkpoints until the stage is done


class UnitFailed(Exception):
    """A unit could not finish (a worker lost, stalled or not started): rerun since the commit."""


class Commits:
    """Owns progress.json and the checkpoints it names."""

    def __init__(self, folder: str, interval_s: float, whole: int, max_bad_fraction: float):
        self.folder, self.interval_s = folder, interval_s
        self.whole, self.max_bad_fraction = whole, max_bad_fraction  # for the early bad check
        self.path = storage.join(folder, PROGRESS_JSON)
        fresh = {"done_units": [], "checkpoints": [], "forwards": 0, "retries": [], "commits": 0}
        self.state = {**fresh, "checkpoint_bytes": 0}
        if storage.exists(self.path):
            self.state.update(storage.read_json(self.path))
        self.pending: list[int] = []  # units done since the last commit
        self.pending_forwards = 0
        self.since = time.monotonic()

    @property
    def done_units(self) -> list[int]:
        return self.state["done_units"]

    @property
    def checkpoints(self) -> list[str]:
        return self.state["checkpoints"]

    def add(self, unit: int, forwards: int) -> None:
        self.pending.append(unit)
        self.pending_forwards += forwards

    def due(self) -> bool:
        return time.monotonic() - self.since >= self.interval_s

    def commit(self, workers, timeout: float) -> None:
        """Checkpoints first, then the record that names them: a worker lost before its
        checkpoint takes the units since the last commit with it, and they are rerun. Then the
        bad-sample threshold is checked on everything committed so far."""
        n = self.state["commits"]
        names = [
            storage.join(self.folder, PARTIAL_DIR, f"c{n:05d}-w{i}") for i in range(len(workers))
        ]
        counts = _save(workers, names, timeout)
        old = self.checkpoints
        self.state = {
            **self.state,
            "done_units": self.done_units + self.pending,
            "checkpoints": names,
            "forwards": self.state["forwards"] + self.pending_forwards,
            "commits": n + 1,
            "checkpoint_bytes": self.state["checkpoint_bytes"] + sum(c["bytes"] for c in counts),
        }
        storage.write_json(self.path, self.state)
        for path in old:
            storage.delete(path)
        self.pending, self.pending_forwards, self.since = [], 0, time.monotonic()
        summary = read.ReadSummary(
            good=sum(c["good"] for c in counts),
            rejected=rejects.merged(*(c["rejected"] for c in counts)),
        )
        read.check_rejects(summary, self.max_bad_fraction, whole=self.whole)

    def discard(self, unit: int, attempt: int, why: str) -> None:
        """Forget the units since the last commit (they are rerun) and record why."""
        self.state["retries"].append({"unit": unit, "attempt": attempt, "why": why})
        self.pending, self.pending_forwards, self.since = [], 0, time.monotonic()

    def describe(self, units: int) -> str:
        return (
            f"{len(self.done_units)} of {units} units committed "
            f"({storage.join(self.folder, PROGRESS_JSON)})"
        )


def _save(workers, names: list[str], timeout: float) -> list[dict]:
    import ray

    try:
        return ray.get([w.save.remote(n) for w, n in zip(workers, names)], timeout=timeout)
    except ray.exceptions.RayError as e:
        raise UnitFailed(f"a worker was lost before its checkpoint: {ray_failure(e)}") from e
