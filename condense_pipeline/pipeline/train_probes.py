"""The training stage of trained probes on Ray Train: E experts, trained before the statistics.

Ray Train's TorchTrainer places the workers (one per GPU where there are GPUs, else one CPU
worker using the node's CPUs); each worker reads the whole training split through the shard
reader (pipeline/read.py) as a Ray Data dataset, not split between workers, and trains its share
of the experts, one after the other (condense/experts.py). The workers train different
experts, so there is no gradient exchange. An expert whose final weights exist with the same
fingerprint is not trained again: a rerun after a kill trains only the missing ones.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import asdict

import numpy as np
import torch

from condense_pipeline import storage
from condense_pipeline.condense.experts import (
    EXPERTS_JSON,
    ExpertRecipe,
    expert_done,
    experts_dir,
    save_expert,
    train_expert,
)
from condense_pipeline.config import TrainProbesConfig
from condense_pipeline.datasets import Profile
from condense_pipeline.errors import Stopped, UserError
from condense_pipeline.formats import ERROR, IMAGE, KEY, LABEL, TRAIN
from condense_pipeline.pipeline import read
from condense_pipeline.pipeline.cluster import ensure_ray, plan_workers

log = logging.getLogger(__name__)


def expert_recipe(profile: Profile, cfg: TrainProbesConfig, network: str = "convnet"):
    return ExpertRecipe(
        network=network,
        channels=profile.channels,
        resolution=profile.resolution,
        num_classes=profile.num_classes,
        mean=profile.mean,
        std=profile.std,
        augment=profile.augment,
        epochs=cfg.epochs,
        seed=cfg.seed,
    )


def experts_fingerprint(profile: Profile, cfg: TrainProbesConfig, data: str) -> str:
    """The fingerprint the experts of `cfg` on the shards at `data` have (or will have)."""
    from condense_pipeline.pipeline.stats import dataset_fingerprint

    return expert_recipe(profile, cfg).fingerprint(
        dataset_fingerprint(read.load_dataset_info(data))
    )


def run_train_probes(
    profile: Profile,
    data: str,
    run_dir: str,
    cfg: TrainProbesConfig,
    *,
    address: str | None = None,
    progress=None,
) -> dict:
    """Train the experts of `cfg` that RUN/experts/ lacks; returns a summary."""
    say = progress or (lambda line: None)
    info = read.load_dataset_info(data)
    if info.get("split", TRAIN) != TRAIN:
        raise UserError(
            f"{data} holds the {info['split']} split; experts train on the training shards only"
        )
    from condense_pipeline.pipeline.stats import dataset_fingerprint

    recipe = expert_recipe(profile, cfg)
    dataset = dataset_fingerprint(info)
    fingerprint = recipe.fingerprint(dataset)
    folder = experts_dir(run_dir)
    todo = [e for e in range(cfg.experts) if not expert_done(folder, e, fingerprint)]
    record = {"fingerprint": fingerprint, "dataset": dataset, "experts": cfg.experts}
    storage.write_json(storage.join(folder, EXPERTS_JSON), {**record, "recipe": asdict(recipe)})
    summary = {"experts": cfg.experts, "trained": len(todo), "reused": cfg.experts - len(todo)}
    if not todo:
        say(f"experts: all {cfg.experts} already trained")
        return {**summary, "seconds": 0.0}
    say(f"training {len(todo)} of {cfg.experts} experts ({recipe.epochs} epochs each)")
    started = time.perf_counter()
    ensure_ray(address)
    dataset = read.read_images(storage.list_shards(data), profile, profile.num_classes)
    try:
        _fit(recipe, fingerprint, folder, todo, dataset, cfg.workers)
    except KeyboardInterrupt:
        done = sum(expert_done(folder, e, fingerprint) for e in range(cfg.experts))
        raise Stopped(f"train-probes: {done} of {cfg.experts} experts trained and kept") from None
    missing = [e for e in todo if not expert_done(folder, e, fingerprint)]
    if missing:
        raise UserError(f"experts {missing} were not trained; rerun train-probes to resume")
    seconds = round(time.perf_counter() - started, 2)
    say(f"experts: {len(todo)} trained in {seconds} s")
    return {**summary, "seconds": seconds}


def _fit(recipe, fingerprint, folder, todo, dataset, requested) -> None:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    if gpus:
        workers = min(plan_workers(requested).workers, len(todo))  # one per free GPU
        scaling = ray.train.ScalingConfig(num_workers=workers, use_gpu=True)
        threads = 1
    else:  # one worker; one CPU stays free for Ray Data's read tasks, used once they are done
        scaling = ray.train.ScalingConfig(
            num_workers=1, resources_per_worker={"CPU": max(1, cpus - 1)}
        )
        threads = cpus
    config = {
        "recipe": recipe,
        "fingerprint": fingerprint,
        "folder": folder,
        "todo": todo,
        "threads": threads,
    }
    with tempfile.TemporaryDirectory() as scratch:  # Ray Train's run folder; nothing kept
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config=config,
            scaling_config=scaling,
            datasets={"train": dataset},
            # every worker reads the whole split: each trains whole experts
            dataset_config=ray.train.DataConfig(datasets_to_split=[]),
            run_config=ray.train.RunConfig(name="train-probes", storage_path=scratch),
        )
        _off_the_main_thread(trainer.fit)


def _off_the_main_thread(fit) -> None:
    """Run `fit` in a thread while the main thread waits for it. Called from the main thread,
    Ray Train's fit() puts in its own SIGINT handler, which aborts the run and exits with code 1
    before the stage can say what it kept; from another thread it does not, so Ctrl-C reaches
    the main thread as KeyboardInterrupt, as in every other stage."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fit()
        except BaseException as e:  # handed to the main thread
            failure.append(e)

    thread = threading.Thread(target=target, name="train-probes", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # a timed wait, so the main thread takes signals
    if failure:
        raise failure[0]


def _train_loop(config: dict) -> None:
    """One Ray Train worker: the split in memory, ordered by key (so the order does not depend
    on which read task finished first), then its experts one by one, each saved when done."""
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    images, labels, keys = [], [], []
    for batch in ray.train.get_dataset_shard("train").iter_batches(
        batch_size=None, batch_format="numpy"
    ):
        good = batch[ERROR] == ""
        images.append(batch[IMAGE][good])
        labels.append(batch[LABEL][good])
        keys.append(batch[KEY][good])
    order = np.argsort(np.concatenate(keys).astype(str), kind="stable")
    x = torch.from_numpy(np.concatenate(images)[order])
    y = torch.from_numpy(np.concatenate(labels)[order])
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    recipe, todo = config["recipe"], config["todo"]
    mine = todo[rank::world]
    for i, e in enumerate(mine):

        def progress(line: str, e=e, i=i) -> None:
            log.info("expert %d (%d of %d on worker %d): %s", e, i + 1, len(mine), rank, line)

        initial, final = train_expert(recipe, e, x, y, device, progress)
        save_expert(config["folder"], e, config["fingerprint"], initial, final)
    ray.train.report({"experts": len(mine)})
