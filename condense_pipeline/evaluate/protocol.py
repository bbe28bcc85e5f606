"""The common evaluation protocol (DESIGN.md 6): train a fresh network on a small set, test on real.

It is DM's `evaluate_synset`: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256,
cross-entropy, DSA on every mini-batch with per-sample parameters, lr x0.1 at half. The final
network is tested; no checkpoint is ever chosen on the test set. Two small departures from the DM
code: it trains `epochs` epochs where DM runs epochs + 1, and drops the lr at epoch `epochs // 2`
where DM drops after epoch `epochs // 2 + 1`.

The same protocol on a random subset of real images with the same IPC is the baseline a condensed
set has to beat.

Tensors are images in the profile's normalised space [n, C, H, W] float32 and labels [n] int64.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from condense_pipeline import formats, storage
from condense_pipeline.condense.augment import augment_batch
from condense_pipeline.condense.networks import MODELS, seeded_model
from condense_pipeline.datasets import Profile
from condense_pipeline.errors import Stopped, UserError
from condense_pipeline.evaluate.loader import load_condensed

log = logging.getLogger(__name__)
# A training run's progress lines and checkpoints come at most this often (at tenths of its
# epochs): a run of seconds says nothing and writes nothing.
PROGRESS_SECONDS = 60.0

LR_DROP = 0.1
TEST_BATCH = 1024


@dataclass(frozen=True)
class EvalConfig:
    """Settings of the evaluation protocol; the defaults are DM's (DESIGN.md 6)."""

    model: str = "convnet"
    epochs: int = 1000
    runs: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when there is one, else the CPU
    # torch.compile the training network: once per run 20-30 s of compiling (a C++ compiler
    # needed), then each step ~1.5x faster on a CPU (RESULTS.md, "Evaluation with --compile").
    # Not part of the recipe: a compiled run trains the same network on the same draws.
    compile: bool = False

    def __post_init__(self):
        for name in ("epochs", "runs", "batch_size"):
            value = getattr(self, name)
            if value < 1:
                raise UserError(f"evaluation {name} must be at least 1, not {value}")
        if self.model not in MODELS:
            raise UserError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")


def recipe(cfg: EvalConfig, strategy: tuple[str, ...] | list[str]) -> dict:
    """The training recipe in words and numbers, for an export's manifest and the report."""
    return {
        "model": cfg.model,
        "optimizer": "sgd",
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "batch_size": cfg.batch_size,
        "epochs": cfg.epochs,
        "lr_schedule": f"x{LR_DROP} at epoch {cfg.epochs // 2}",
        "loss": "cross_entropy",
        "augment": "dsa, one op per mini-batch, parameters per sample",
        "augment_strategy": list(strategy),
        "checkpoint": "final (never selected on the test set)",
    }


def _device(cfg: EvalConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _sgd(model: nn.Module, lr: float, cfg: EvalConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def _check_images(x: torch.Tensor, profile: Profile, what: str) -> None:
    expected = (profile.channels, profile.resolution, profile.resolution)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise UserError(
            f"{what} images have shape {tuple(x.shape)}, but profile {profile.name!r} expects "
            f"[n, {expected[0]}, {expected[1]}, {expected[2]}]; evaluate with the profile the set "
            "was made for"
        )


def check_compile() -> None:
    """Fail in one line where torch.compile cannot work (no C++ compiler), before any run."""
    try:
        torch.compile(lambda t: t + 1)(torch.zeros(1))
    except Exception as e:  # inductor's errors have no common public type
        reason = str(e).strip().splitlines()[0]
        raise UserError(
            f"--compile: torch.compile does not work here ({reason}); install a C++ compiler "
            "or leave out --compile"
        ) from None


def _compiled(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """model's forward, compiled; it shares the model's parameters."""
    compiled = torch.compile(model)
    # Dynamo specialises on strides, and DSA's ops return batches strided differently (a
    # one-channel dimension takes any stride): one layout, so no recompile per DSA op.
    return lambda x: compiled(x.clone(memory_format=torch.contiguous_format))


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    strategy: tuple[str, ...] | list[str],
    cfg: EvalConfig,
    generator: torch.Generator,
    progress: Callable[[str], None] | None = None,
    checkpoint: str | None = None,
) -> None:
    """Train `model` in place on (x, y), already on the model's device, for cfg.epochs.

    At each tenth of the epochs that ends PROGRESS_SECONDS or more after the last, `progress`
    hears how far the run is, and the run's state is written to `checkpoint` (a run on a CPU can
    take hours); a run that finds its checkpoint goes on from there, to the same weights."""
    saved = None
    if checkpoint is not None and storage.exists(checkpoint):
        saved = st_load(storage.read_bytes(checkpoint))
    start = 0 if saved is None else int(saved["epoch"])
    # DM re-creates the optimiser at the drop, which also clears the momentum buffers.
    dropped = 0 < cfg.epochs // 2 < start
    optimizer = _sgd(model, cfg.lr * (LR_DROP if dropped else 1.0), cfg)
    if saved is not None:
        _restore_run(saved, model, optimizer, generator)
        if progress:
            progress(f"resuming at epoch {start}/{cfg.epochs}")
    model.train()
    forward = _compiled(model) if cfg.compile else model
    started = said = time.perf_counter()
    every = max(1, cfg.epochs // 10)
    for epoch in range(start, cfg.epochs):
        if epoch == cfg.epochs // 2 and epoch > 0:
            optimizer = _sgd(model, cfg.lr * LR_DROP, cfg)
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for first in range(0, len(x), cfg.batch_size):
            batch = order[first : first + cfg.batch_size]
            with torch.no_grad():  # the images are data here, not parameters
                xb = augment_batch(x[batch], strategy, generator)
            loss = F.cross_entropy(forward(xb), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        done = epoch + 1
        now = time.perf_counter()
        if done % every == 0 and done < cfg.epochs and now - said >= PROGRESS_SECONDS:
            if checkpoint is not None:
                _save_run(checkpoint, done, model, optimizer, generator)
            if progress:
                progress(f"epoch {done}/{cfg.epochs} ({now - started:.0f} s)")
            said = now


def _save_run(location: str, epoch: int, model: nn.Module, optimizer, generator) -> None:
    """A training run's state after `epoch` epochs: weights, momentum, and the draws' generator."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        momentum = optimizer.state.get(p, {}).get("momentum_buffer")
        if momentum is not None:
            tensors[f"momentum.{name}"] = momentum.cpu().contiguous()
    tensors["epoch"] = torch.tensor(epoch)
    tensors["generator"] = generator.get_state()
    storage.write_bytes(location, st_save(tensors))


def _restore_run(saved: dict, model: nn.Module, optimizer, generator: torch.Generator) -> None:
    """Put back what _save_run saved."""
    weights = {k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    for name, p in model.named_parameters():
        if f"momentum.{name}" in saved:
            optimizer.state[p]["momentum_buffer"] = saved[f"momentum.{name}"].to(p.device)
    generator.set_state(saved["generator"])


@torch.no_grad()
def test_predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Predicted classes [n] (on the CPU) of `model` on x, in batches on the model's device."""
    device = next(model.parameters()).device
    model.eval()
    return torch.cat(
        [
            model(x[s : s + TEST_BATCH].to(device)).argmax(1).cpu()
            for s in range(0, len(x), TEST_BATCH)
        ]
    )


def test_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy in percent of `model` on all of (x, y)."""
    return 100.0 * int((test_predictions(model, x) == y.cpu()).sum()) / len(x)


def class_accuracy(predicted: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    """Accuracy in percent per class (nan for a class without test images)."""
    y = y.cpu()
    hits = torch.bincount(y[predicted == y], minlength=num_classes).double()
    counts = torch.bincount(y, minlength=num_classes).double()
    return (100.0 * hits / counts).tolist()


def trained_model(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    profile: Profile,
    num_classes: int,
    cfg: EvalConfig,
    run_seed: int,
    progress: Callable[[str], None] | None = None,
    checkpoint: str | None = None,
) -> nn.Module:
    """A fresh cfg.model trained on (train_x, train_y); `run_seed` fixes the initial weights, the
    shuffling and the DSA draws. test_x is only checked for its shape, before the training.
    `progress` and `checkpoint`: see train."""
    _check_images(train_x, profile, "training")
    _check_images(test_x, profile, "test")
    device = _device(cfg)
    model = seeded_model(cfg.model, run_seed, profile.channels, profile.resolution, num_classes)
    model.to(device)
    # DSA and shuffling draw on the CPU from their own generator, so a seed means the same run
    # on any device.
    generator = torch.Generator().manual_seed(run_seed)
    x = train_x.to(device=device, dtype=torch.float32)
    y = train_y.to(device=device, dtype=torch.int64)
    train(model, x, y, profile.augment, cfg, generator, progress, checkpoint)
    return model


def train_and_test(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    profile: Profile,
    num_classes: int,
    cfg: EvalConfig,
    run_seed: int,
) -> float:
    """Train a fresh cfg.model on (train_x, train_y) and return its test accuracy in percent."""
    model = trained_model(train_x, train_y, test_x, profile, num_classes, cfg, run_seed)
    return test_accuracy(model, test_x.float(), test_y.long())


def random_real_subsets(
    labels: torch.Tensor, ipc: int, seeds: list[int], num_classes: int
) -> list[torch.Tensor]:
    """Disjoint random-real subsets, one per seed: indices into `labels`, ordered by class.

    Subset r takes `ipc` indices of every class, drawn without replacement, with a generator
    seeded by seeds[r], from what the subsets before it left: so each is a uniform random
    subset of the images given, and no two runs train on the same image.
    """
    labels_cpu = labels.cpu()
    left = [(labels_cpu == c).nonzero().flatten() for c in range(num_classes)]
    short = [c for c in range(num_classes) if len(left[c]) < ipc * len(seeds)]
    if short:
        c = short[0]
        raise UserError(
            f"class {c} has {len(left[c])} images for the random-real baseline, fewer than "
            f"{len(seeds)} runs x IPC {ipc}; lower --runs or --ipc"
        )
    subsets = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        picks = []
        for c in range(num_classes):
            order = torch.randperm(len(left[c]), generator=generator)
            picks.append(left[c][order[:ipc]])
            left[c] = left[c][order[ipc:]]
        subsets.append(torch.cat(picks))
    return subsets


def _summary(accuracies: list[float]) -> dict:
    # np.std without ddof, as DM reports it.
    return {
        "mean": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "runs": accuracies,
    }


def _check_manifest(manifest: dict, profile: Profile, export_dir: str) -> None:
    expected = {
        "channels": profile.channels,
        "resolution": profile.resolution,
        "mean": list(profile.mean),
        "std": list(profile.std),
    }
    differ = [k for k, v in expected.items() if manifest.get(k) != v]
    if differ:
        raise UserError(
            f"the export at {export_dir} differs from profile {profile.name!r} in "
            f"{', '.join(differ)}; evaluate it with the profile it was condensed for"
        )


def _run_name(job: tuple[str, int]) -> str:
    """How a run's lines start (the CLI's PROGRESS_LINES matches them)."""
    return f"eval {job[0]} seed {job[1]}"


def _timed_run(x, y, test_x, test_y, profile, num_classes, cfg, job, say=None, checkpoint=None):
    """(accuracy %, accuracy % per class, seconds in this process) of the training run job (set
    name, seed); `say` hears of its progress; it goes on from `checkpoint` if one is there."""
    started = time.perf_counter()
    progress = None if say is None else lambda line: say(f"{_run_name(job)}: {line}")
    model = trained_model(x, y, test_x, profile, num_classes, cfg, job[1], progress, checkpoint)
    predicted = test_predictions(model, test_x.float())
    accuracy = 100.0 * int((predicted == test_y.cpu()).sum()) / len(test_y)
    per_class = class_accuracy(predicted, test_y, num_classes)
    return accuracy, per_class, time.perf_counter() - started


def _train_runs(
    jobs, sets, test_x, test_y, profile, num_classes, cfg, progress, use_ray, keep, checkpoints
) -> dict:
    """(accuracy, per-class accuracy) per job (set name, seed); sets[job] is its (x, y).
    `keep(job, result)` is called as each run finishes, before the next is awaited;
    checkpoints[job], where there is one, is where the run keeps its state meanwhile. With
    `use_ray` every run is a Ray task (one GPU each where there are GPUs), so runs go in parallel
    as far as the cluster allows, and each tensor is put in the object store once and passed by
    reference; otherwise they run one after another here."""
    accuracy = {}

    def record(job, result):
        accuracy[job] = result[:2]
        keep(job, result)
        line = f"{_run_name(job)}: {result[0]:.2f}% ({result[2]:.1f} s)"
        log.info(line)
        if progress is not None:
            progress(line)

    if not use_ray or len(jobs) < 2:
        for job in jobs:
            x, y = sets[job]
            args = (x, y, test_x, test_y, profile, num_classes, cfg, job, progress)
            record(job, _timed_run(*args, checkpoints.get(job)))
        return accuracy
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=2)(_timed_run)
    refs: dict[int, ray.ObjectRef] = {}  # by tensor identity: the condensed set is put once

    def ref(t: torch.Tensor):
        if id(t) not in refs:
            refs[id(t)] = ray.put(t)
        return refs[id(t)]

    # A task's printed lines reach the driver's terminal (Ray forwards workers' output).
    say = None if progress is None else print
    pending = {
        task.remote(
            *map(ref, (*sets[job], test_x, test_y)),
            profile,
            num_classes,
            cfg,
            job,
            say,
            checkpoints.get(job),
        ): job
        for job in jobs
    }
    while pending:
        (done,), _ = ray.wait(list(pending), num_returns=1)
        record(pending.pop(done), ray.get(done))
    return accuracy


def _digest(*tensors: torch.Tensor) -> str:
    """A hash of the tensors' shapes, types and values (hashed in place: a test split of several
    GB is not copied)."""
    h = hashlib.sha256()
    for t in tensors:
        a = t.detach().cpu().contiguous().numpy()
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _run_file(job: tuple[str, int], train: str, test: str, cfg, profile, num_classes) -> str:
    """The name a finished run is kept under: its set and seed, and a hash of all it depends on
    (the recipe, the classes, the training images, the test images), so that a rerun reuses a
    run only when it would train and test the same."""
    what = {"recipe": recipe(cfg, profile.augment), "classes": num_classes, "seed": job[1]}
    key = hashlib.sha256((json.dumps(what, sort_keys=True) + train + test).encode()).hexdigest()
    return f"{job[0].replace(' ', '-')}-seed{job[1]}-{key[:16]}.json"


def _checkpoint_file(run_file: str) -> str:
    """Where an unfinished run keeps its state: beside the file it will be kept in."""
    return run_file.removesuffix(".json") + ".checkpoint.safetensors"


def evaluate_condensed(
    export_dir: str | None,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    train_x: torch.Tensor | None,
    train_y: torch.Tensor | None,
    profile: Profile,
    num_classes: int,
    ipc: int,
    cfg: EvalConfig,
    progress: Callable[[str], None] | None = None,
    report_dir: str | None = None,
    *,
    use_ray: bool = False,
    train_keys: list[str] | None = None,
    inputs: dict | None = None,
) -> dict:
    """The protocol on the exported set and on random real subsets; returns the report.

    The condensed set is read back from the exported PNGs with `load_condensed`, as a downstream
    job would read it. Run r (seed cfg.seed + r) of the baseline trains on its own random subset
    of (train_x, train_y), drawn with that seed and disjoint from the other runs' (see
    random_real_subsets), so the baseline's spread includes the subsets'; pass train_x=None to
    skip the baseline, or export_dir=None to train the baseline alone. `train_keys` (the keys
    of train_x) name each run's images in baseline.json beside the report; `inputs` (what the
    report was computed from) goes into the report. With `report_dir` the report is written
    there as report.json, followed by the completion marker, and each finished training run is
    kept in its runs/ folder as it finishes: a rerun (after a stop, or with more runs, or with
    the other set) trains only the runs it does not find there for the same recipe, images and
    test split. `use_ray`: train the runs as Ray tasks.
    """
    started = time.perf_counter()
    seeds = [cfg.seed + r for r in range(cfg.runs)]
    sets, manifest, syn_y = {}, {}, None
    if export_dir is not None:
        condensed = load_condensed(export_dir)
        manifest = condensed.manifest
        _check_manifest(manifest, profile, export_dir)
        syn_x, syn_y = condensed.tensors()
        sets = {("condensed", seed): (syn_x, syn_y) for seed in seeds}
    subsets = []
    if train_x is not None and train_y is not None:
        subsets = random_real_subsets(train_y, ipc, seeds, num_classes)
        for seed, idx in zip(seeds, subsets):
            sets[("random real", seed)] = (train_x[idx], train_y[idx])
    if not sets:
        raise ValueError("nothing to evaluate: neither an exported set nor baseline images")
    accuracy, files = {}, {}
    if report_dir is not None:
        runs_dir = storage.join(report_dir, formats.EVAL_RUNS_DIR)
        test = _digest(test_x, test_y)
        digests = {}  # by tensor identity: the condensed set, shared by every seed, hashed once
        for job, (x, y) in sets.items():
            if id(x) not in digests:
                digests[id(x)] = _digest(x, y)
            name = _run_file(job, digests[id(x)], test, cfg, profile, num_classes)
            files[job] = storage.join(runs_dir, name)
            if storage.exists(files[job]):
                kept = storage.read_json(files[job])
                accuracy[job] = (kept["accuracy"], kept["per_class"])
        if accuracy:
            line = f"eval: {len(accuracy)} of {len(sets)} training runs reused ({runs_dir})"
            log.info(line)
            if progress is not None:
                progress(line)

    checkpoints = {job: _checkpoint_file(f) for job, f in files.items()}

    def keep(job, result):
        if job in files:
            kept = {"accuracy": result[0], "per_class": result[1], "seconds": result[2]}
            storage.write_json(files[job], kept)
            storage.delete(checkpoints[job])

    todo = [job for job in sets if job not in accuracy]
    try:
        accuracy |= _train_runs(
            todo,
            sets,
            test_x,
            test_y,
            profile,
            num_classes,
            cfg,
            progress,
            use_ray,
            keep,
            checkpoints,
        )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the finished runs are on disk
        if not files:
            raise
        kept = sum(storage.exists(f) for f in files.values())
        unfinished = sum(storage.exists(c) for c in checkpoints.values())
        also = f" and {unfinished} checkpointed" if unfinished else ""
        raise Stopped(
            f"evaluate: {kept} of {len(files)} training runs kept{also} ({runs_dir})"
        ) from None

    def summary(name: str) -> dict | None:
        runs = [accuracy[job] for job in sets if job[0] == name]
        if not runs:
            return None
        # per class: the mean over runs
        return {
            **_summary([r[0] for r in runs]),
            "per_class": np.mean([r[1] for r in runs], 0).tolist(),
            "seeds": seeds,
        }

    report = {
        "condensed": summary("condensed"),
        "random_real": summary("random real"),
        "ipc": ipc,
        "epochs": cfg.epochs,
        "model": cfg.model,
        "runs": cfg.runs,
        "runs_reused": len(sets) - len(todo),
        "num_train_condensed": None if syn_y is None else len(syn_y),
        "num_test": len(test_y),
        "float_vs_png_max_abs_diff": manifest.get("float_vs_png_max_abs_diff"),
        "float_vs_png_max_abs_diff_pixels": manifest.get("float_vs_png_max_abs_diff_pixels"),
        "recipe": recipe(cfg, profile.augment),
        "config": dataclasses.asdict(cfg),
        "inputs": inputs or {},
    }
    if report["random_real"] is not None:
        report["random_real"]["drawn_from"] = len(train_y)  # real images, all classes
    report["seconds"] = time.perf_counter() - started
    for name in ("condensed", "random_real"):
        if report[name] is not None:
            s = report[name]
            log.info("%s %.2f ± %.2f%% over %d runs", name, s["mean"], s["std"], cfg.runs)
    if report_dir is not None:
        storage.delete(storage.join(report_dir, storage.DONE))
        if subsets and train_keys is not None:
            chosen = {str(seed): [train_keys[i] for i in idx] for seed, idx in zip(seeds, subsets)}
            storage.write_json(storage.join(report_dir, formats.BASELINE_JSON), chosen)
        storage.write_json(storage.join(report_dir, formats.REPORT_JSON), report)
        storage.mark_done(report_dir)
    return report
