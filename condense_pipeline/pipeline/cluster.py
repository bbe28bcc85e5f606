"""Connecting to Ray and sizing work from what the cluster has."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass

from condense_pipeline.errors import UserError

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS), or start a local Ray when neither is given."""
    import ray

    if ray.is_initialized():
        return
    # "local" starts a Ray of our own: without it, ray.init joins whatever cluster `ray start`
    # left on this machine
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        _check_listening(address)
    caller = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(
            address=address,
            include_dashboard=False if address == "local" else None,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    except ConnectionError as e:
        cause = str(e.__cause__ or e.__context__)
        if "Unauthenticated" in cause or "InvalidAuthToken" in cause:
            raise UserError(
                f"the Ray cluster at {address} refused us: it uses token authentication; set "
                "RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN where ~/.ray/auth_token is not the "
                "cluster's)"
            ) from None
        raise UserError(f"cannot join the Ray cluster at {address}: {e}") from None
    # ray.init makes SIGTERM a sys.exit; a handler of the caller's (the CLI stops cleanly on
    # it) comes first
    main = threading.current_thread() is threading.main_thread()
    if main and caller not in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(signal.SIGTERM, caller)


def _check_listening(address: str) -> None:
    """Fail in seconds where nothing listens at a host:port address: ray.init keeps retrying
    there for about a quarter of an hour (seen with Ray 2.60), saying nothing useful."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray finds those itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        raise UserError(
            f"no Ray cluster answers at {address} ({e.strerror or e}); check --address or "
            "RAY_ADDRESS, or start one with `ray start --head`"
        ) from None


@dataclass(frozen=True)
class WorkerPlan:
    """How many stats workers and condense tasks to run, and what each asks Ray for."""

    workers: int
    num_cpus: float
    num_gpus: float
    busy_gpus: int = 0  # GPUs something else held when the plan was made, left to it

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus else "cpu"


def busy_gpus() -> int:
    """GPUs of the cluster that something holds now. At a stage's start that is what is not
    ours: a driver submitted with `ray job submit --entrypoint-num-gpus 1` holds one, and a
    worker planned on it would never start."""
    import ray

    held = ray.cluster_resources().get("GPU", 0) - ray.available_resources().get("GPU", 0)
    return max(0, round(held))


def plan_workers(requested: int | None = None, busy: int | None = None) -> WorkerPlan:
    """One worker per free GPU where there are GPUs; otherwise one per CPU but one, so that Ray
    Data's read and decode tasks always have a CPU (an actor pool holding every CPU deadlocks
    the read, ray#44687). `busy`: the GPUs to leave (None: those held now); a plan made again
    after a lost node passes the first plan's, since the workers it just killed may still
    count as held."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
    if gpus:
        busy = busy_gpus() if busy is None else busy
        if busy >= gpus:
            raise UserError(
                f"all {gpus} GPU(s) of the cluster are held by something else (a driver "
                "submitted with --entrypoint-num-gpus?): no stats worker could start"
            )
        n = min(requested or gpus - busy, gpus - busy)
        return WorkerPlan(n, num_cpus=1, num_gpus=1, busy_gpus=busy)
    n = max(1, min(requested or cpus - 1, cpus - 1))
    return WorkerPlan(n, num_cpus=1, num_gpus=0)


def worker_threads(plan: WorkerPlan) -> int:
    """Torch threads per stats worker: the cluster's CPUs shared among the workers. The reading
    needs CPUs too, but a worker that holds its images forwards most of them after the reading
    of what it holds, so the oversubscription is short."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)) // plan.workers)


def ray_failure(e: Exception) -> str:
    """The name of what Ray lost behind `e` (a worker, an actor, a node, objects) or of its
    timeout; re-raises `e` when it is an error of our own code, which a rerun would repeat."""
    from ray.exceptions import RayError, RayTaskError

    cause = e.cause if isinstance(e, RayTaskError) else e
    if not isinstance(cause, RayError):
        raise e
    return type(cause).__name__
