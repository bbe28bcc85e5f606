"""Sizing stats workers on a cluster with GPUs (logical ones: Ray schedules them without CUDA)."""

import pytest
import ray

from condense_pipeline.errors import UserError
from condense_pipeline.pipeline.cluster import plan_workers


@pytest.fixture(scope="module")
def two_gpus():
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0, num_gpus=1)
class _Driver:
    """Holds a GPU as a job's driver submitted with --entrypoint-num-gpus 1 does."""

    def ready(self) -> bool:
        return True


def test_workers_leave_the_gpus_something_else_holds(two_gpus):
    # Catches a plan from the cluster's GPU count: its second worker would wait for the driver's
    # GPU until the stall timeout, three times.
    assert plan_workers().workers == 2
    drivers = [_Driver.remote()]
    ray.get(drivers[0].ready.remote())
    plan = plan_workers()
    assert (plan.workers, plan.num_gpus, plan.busy_gpus) == (1, 1, 1)
    assert plan_workers(4).workers == 1
    drivers.append(_Driver.remote())
    ray.get(drivers[1].ready.remote())
    assert plan_workers(busy=plan.busy_gpus).workers == 1  # a re-plan leaves what the first did
    with pytest.raises(UserError, match=r"^all 2 GPU\(s\) of the cluster are held"):
        plan_workers()
    for d in drivers:
        ray.kill(d)
