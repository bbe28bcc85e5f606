import math
import re

import pytest
import torch
from torch.utils.data import DataLoader

from condense_pipeline import formats, storage
from condense_pipeline.cli.app import PROGRESS_LINES
from condense_pipeline.condense.networks import MODELS, ConvNet, build_model, seeded_model
from condense_pipeline.datasets import get_profile
from condense_pipeline.errors import Stopped, UserError
from condense_pipeline.evaluate import (
    EvalConfig,
    dsa_collate,
    evaluate_condensed,
    load_condensed,
    load_condensed_ray,
    protocol,
    random_real_subsets,
    train_and_test,
)
from condense_pipeline.evaluate.protocol import check_compile, trained_model
from condense_pipeline.pipeline.export import export_condensed

DIGITS = get_profile("digits")


def finished(lines: list[str]) -> list[str]:
    """The lines that report a finished training run ("eval condensed seed 0: 98.00% (3.1 s)")."""
    return [line for line in lines if re.match(r"eval .+ seed \d+: [\d.]+% \(", line)]


def separable(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 8 px grey images: dark (-1) or bright (+1) plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(2).repeat_interleave(n_per_class)
    x = (2.0 * y - 1).view(-1, 1, 1, 1) + 0.3 * torch.randn(len(y), 1, 8, 8, generator=g)
    return x, y


def exported(tmp_path, n_per_class: int = 4, name: str = "export") -> tuple[str, torch.Tensor]:
    x, y = separable(n_per_class, seed=1)
    x = x.clamp(-0.8, 1.8)  # inside the digits profile's pixel range, so the PNGs are exact
    out = str(tmp_path / name)
    export_condensed(x, y, ["dark", "bright"], DIGITS, out, provenance={"method": "test"})
    return out, x


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels,resolution", [(1, 28), (3, 32)])
def test_every_model_runs_forward(name, channels, resolution):
    model = build_model(name, channels, resolution, num_classes=7)
    out = model(torch.randn(2, channels, resolution, resolution))
    assert out.shape == (2, 7)


def test_convnet_runs_at_8px():
    assert build_model("convnet", 1, 8, 10)(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_loader_gives_back_the_exported_images(tmp_path):
    out, x = exported(tmp_path)
    ds = load_condensed(out)
    assert len(ds) == 8
    image, label = ds[5]
    assert image.dtype == torch.float32 and image.shape == (1, 8, 8)
    assert label == 1
    # Half an 8-bit level in normalised units.
    assert (image - x[5]).abs().max() <= 0.5 / 255 / DIGITS.std[0] + 1e-5
    assert ds.classes == ["dark", "bright"]
    assert ds.strategy == list(DIGITS.augment)


@pytest.mark.parametrize("augment", ["none", "item", "batch"])
def test_loader_feeds_a_training_loop(tmp_path, augment):
    out, _ = exported(tmp_path, n_per_class=8)
    ds = load_condensed(out, augment=augment == "item", seed=3)
    collate = dsa_collate(ds.strategy, seed=3) if augment == "batch" else None
    loader = DataLoader(ds, batch_size=4, shuffle=True, collate_fn=collate)
    torch.manual_seed(0)
    model = ConvNet(1, 8, num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(3):
        for xb, yb in loader:
            assert xb.shape == (4, 1, 8, 8) and yb.dtype == torch.int64
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) < sum(losses[:4])


def test_item_augmentation_changes_images(tmp_path):
    out, _ = exported(tmp_path)
    plain, augmented = load_condensed(out), load_condensed(out, augment=True, seed=0)
    differs = [not torch.equal(plain[i][0], augmented[i][0]) for i in range(len(plain))]
    assert any(differs)


def test_loader_reads_only_the_current_export(tmp_path):
    exported(tmp_path, n_per_class=6)
    out, _ = exported(tmp_path, n_per_class=2)  # a rerun into the same folder, fewer images
    assert len(load_condensed(out)) == 4


def test_loader_refuses_an_unfinished_export(tmp_path):
    out, _ = exported(tmp_path)
    storage.delete(storage.join(out, storage.DONE))
    with pytest.raises(UserError, match="not a finished export"):
        load_condensed(out)


def test_load_condensed_ray(tmp_path):
    ray = pytest.importorskip("ray")
    out, x = exported(tmp_path)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = load_condensed_ray(out).take_all()
    finally:
        if started:
            ray.shutdown()
    assert len(rows) == 8
    assert set(rows[0]) == set(formats.PARQUET_COLUMNS)
    by_key = {r["key"]: r for r in rows}
    assert torch.equal(torch.tensor(by_key["00001-00000"]["tensor"]).view(1, 8, 8), x[4])


def test_train_and_test_learns_a_separable_problem():
    train_x, train_y = separable(20, seed=0)
    test_x, test_y = separable(50, seed=1)
    cfg = EvalConfig(epochs=6, batch_size=16)
    accuracy = train_and_test(train_x, train_y, test_x, test_y, DIGITS, 2, cfg, run_seed=0)
    assert accuracy >= 95.0


def test_a_compiled_run_trains_the_same_network():
    """Bug caught: --compile training another network than the recipe's (a compiled copy whose
    parameters the optimiser does not step, or draws taken in another order)."""
    x, y = separable(20, seed=0)
    eager, compiled = (
        dict(trained_model(x, y, x, DIGITS, 2, cfg, 0).named_parameters())
        for cfg in (EvalConfig(epochs=2, batch_size=20, compile=c) for c in (False, True))
    )
    initial = dict(seeded_model("convnet", 0, 1, 8, 2).named_parameters())
    for name, p in eager.items():
        assert not torch.equal(compiled[name], initial[name])  # trained through the compiled one
        torch.testing.assert_close(compiled[name], p, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("killed_after", [2, 3, 4])  # before, at and after the drop (epoch 3)
def test_a_killed_run_goes_on_from_its_checkpoint_to_the_same_weights(
    tmp_path, monkeypatch, killed_after
):
    """Bugs caught: a resumed run that starts over (hours lost on a CPU), or that goes on with
    fresh momentum, another learning rate or other draws, and so trains another network."""
    monkeypatch.setattr(protocol, "PROGRESS_SECONDS", 0.0)  # a checkpoint every epoch
    x, y = separable(20, seed=0)
    cfg = EvalConfig(epochs=6, batch_size=16)
    whole = trained_model(x, y, x, DIGITS, 2, cfg, 0)
    checkpoint = str(tmp_path / "run.checkpoint.safetensors")

    def kill(line):
        if line.startswith(f"epoch {killed_after}/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trained_model(x, y, x, DIGITS, 2, cfg, 0, kill, checkpoint)
    lines = []
    resumed = trained_model(x, y, x, DIGITS, 2, cfg, 0, lines.append, checkpoint)
    assert [line.split(" (")[0] for line in lines] == [
        f"resuming at epoch {killed_after}/6",
        *(f"epoch {e}/6" for e in range(killed_after + 1, 6)),
    ]
    for name, p in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], p), name


def test_compile_without_a_cxx_compiler_fails_in_one_line(monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", (None, "/nonexistent/c++"))
    with pytest.raises(UserError, match=r"^--compile: torch.compile does not work here \("):
        check_compile()


def test_train_and_test_rejects_the_wrong_shape():
    x = torch.zeros(4, 3, 8, 8)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(UserError, match="expects"):
        train_and_test(x, y, x, y, DIGITS, 2, EvalConfig(epochs=1), run_seed=0)


def test_random_real_subsets_are_seeded_and_disjoint():
    # Catches: baseline runs that train on one fixed subset (a spread without subset variance)
    # or on overlapping ones.
    labels = torch.arange(5).repeat(7)  # 7 images of each of 5 classes, interleaved
    subsets = random_real_subsets(labels, ipc=3, seeds=[0, 1], num_classes=5)
    for idx in subsets:
        assert torch.bincount(labels[idx], minlength=5).tolist() == [3] * 5
        assert labels[idx].tolist() == sorted(labels[idx].tolist())  # ordered by class
    assert not set(subsets[0].tolist()) & set(subsets[1].tolist())
    again = random_real_subsets(labels, ipc=3, seeds=[0, 1], num_classes=5)
    assert all(torch.equal(a, b) for a, b in zip(subsets, again))
    other = random_real_subsets(labels, ipc=3, seeds=[2, 1], num_classes=5)
    assert not torch.equal(subsets[0], other[0])
    with pytest.raises(UserError, match="lower --runs or --ipc"):
        random_real_subsets(labels, ipc=3, seeds=[0, 1, 2], num_classes=5)


def test_eval_config_rejects_bad_values():
    with pytest.raises(UserError, match="epochs"):
        EvalConfig(epochs=0)
    with pytest.raises(UserError, match="unknown model"):
        EvalConfig(model="lenet9000")


def test_evaluate_condensed_reports_and_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(protocol, "PROGRESS_SECONDS", 0.0)  # a line each tenth of the epochs
    out, _ = exported(tmp_path)
    test_x, test_y = separable(10, seed=2)
    train_x, train_y = separable(10, seed=3)
    lines = []
    cfg = EvalConfig(epochs=8, runs=2, batch_size=8)
    report_dir = str(tmp_path / "eval")
    report = evaluate_condensed(
        out, test_x, test_y, train_x, 1 - train_y, DIGITS, 2, 4, cfg, lines.append, report_dir
    )
    # Catches: the baseline trained on the condensed set (or the two swapped in the report),
    # and accuracy measured on anything but the test set. The real images come with their
    # labels swapped, so a baseline trained on them scores near 0 and the condensed set near 100.
    assert len(report["condensed"]["runs"]) == 2 and len(report["random_real"]["runs"]) == 2
    assert min(report["condensed"]["runs"]) >= 90 and max(report["random_real"]["runs"]) <= 10
    assert report["condensed"]["seeds"] == report["random_real"]["seeds"] == [0, 1]
    assert (report["ipc"], report["epochs"], report["model"]) == (4, 8, "convnet")
    assert report["num_train_condensed"] == 8
    assert report["float_vs_png_max_abs_diff"] <= 0.5 / 255 / DIGITS.std[0] + 1e-5
    assert len(finished(lines)) == 4
    # every run tells its progress, and in order
    assert [line.split(" (")[0] for line in lines if line.startswith("eval condensed seed 1:")] == [
        *(f"eval condensed seed 1: epoch {e}/8" for e in range(1, 8)),
        f"eval condensed seed 1: {report['condensed']['runs'][1]:.2f}%",
    ]
    # and Ray's log deduplication lets them through (the CLI's allow-list), only them
    progress = [line for line in lines if " epoch " in line]
    assert len(progress) == 4 * 7
    assert all(re.match(PROGRESS_LINES, line) for line in progress)
    assert not any(re.match(PROGRESS_LINES, line) for line in finished(lines))
    assert storage.read_json(storage.join(report_dir, formats.REPORT_JSON)) == report
    assert storage.is_done(report_dir)


def test_a_rerun_trains_only_the_runs_it_does_not_find(tmp_path):
    """Bugs caught: a stopped or extended evaluation retraining its finished runs (hours each on
    ImageNet), and a kept run reused for another recipe or another test split."""
    out, _ = exported(tmp_path)
    test_x, test_y = separable(10, seed=2)
    train_x, train_y = separable(20, seed=3)  # room for three disjoint subsets
    report_dir = str(tmp_path / "eval")

    def evaluate(cfg, test=(test_x, test_y)):
        lines = []
        report = evaluate_condensed(
            out, *test, train_x, train_y, DIGITS, 2, 4, cfg, lines.append, report_dir
        )
        return report, finished(lines)

    first, trained = evaluate(EvalConfig(epochs=2, runs=2, batch_size=8))
    assert len(trained) == 4 and first["runs_reused"] == 0
    more, trained = evaluate(EvalConfig(epochs=2, runs=3, batch_size=8))
    assert len(trained) == 2 and all(" seed 2: " in line for line in trained)  # only seed 2 is new
    assert more["runs_reused"] == 4
    # compiling changes how a run is computed, not what it trains: the kept runs are reused
    assert evaluate(EvalConfig(epochs=2, runs=3, batch_size=8, compile=True))[1] == []
    for part in ("condensed", "random_real"):
        assert more[part]["runs"][:2] == first[part]["runs"]
        assert more[part]["seeds"] == [0, 1, 2]
    # another recipe or another test split trains everything again
    assert len(evaluate(EvalConfig(epochs=3, runs=2, batch_size=8))[1]) == 4
    other = separable(10, seed=4)
    assert len(evaluate(EvalConfig(epochs=2, runs=2, batch_size=8), other)[1]) == 4


def test_a_stopped_evaluation_says_what_it_kept_and_a_rerun_finishes_it(tmp_path):
    out, _ = exported(tmp_path)
    test_x, test_y = separable(10, seed=2)
    cfg = EvalConfig(epochs=2, runs=3, batch_size=8)
    report_dir = str(tmp_path / "eval")

    def stop_after_two(line):  # Ctrl-C after the second run has finished
        if finished([line]) and line.startswith("eval condensed seed 1:"):
            raise KeyboardInterrupt

    args = (out, test_x, test_y, None, None, DIGITS, 2, 4, cfg)
    runs_dir = storage.join(report_dir, formats.EVAL_RUNS_DIR)
    with pytest.raises(Stopped, match=rf"^evaluate: 2 of 3 training runs kept \({runs_dir}\)$"):
        evaluate_condensed(*args, stop_after_two, report_dir)
    assert not storage.is_done(report_dir)
    lines = []
    report = evaluate_condensed(*args, lines.append, report_dir)
    assert finished(lines)[-1].startswith("eval condensed seed 2:")
    assert report["runs_reused"] == 2 and len(report["condensed"]["runs"]) == 3
    assert storage.is_done(report_dir)


def test_a_stopped_run_is_finished_from_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(protocol, "PROGRESS_SECONDS", 0.0)  # a checkpoint every epoch
    out, _ = exported(tmp_path)
    test_x, test_y = separable(10, seed=2)
    cfg = EvalConfig(epochs=4, runs=1, batch_size=8)
    args = (out, test_x, test_y, None, None, DIGITS, 2, 4, cfg)
    report_dir = str(tmp_path / "eval")
    runs_dir = storage.join(report_dir, formats.EVAL_RUNS_DIR)

    def stop(line):  # Ctrl-C in the middle of the run
        if " epoch 2/4 " in line:
            raise KeyboardInterrupt

    with pytest.raises(Stopped, match=r"^evaluate: 0 of 1 training runs kept and 1 checkpointed"):
        evaluate_condensed(*args, stop, report_dir)
    lines = []
    report = evaluate_condensed(*args, lines.append, report_dir)
    assert "eval condensed seed 0: resuming at epoch 2/4" in lines
    # Ray's log deduplication lets every progress line through, the resume line too (bug: four
    # of five resumed runs' lines were folded)
    assert all(re.match(PROGRESS_LINES, line) for line in lines if " epoch " in line)
    # the same accuracy as a run never stopped, and the checkpoint gone once the run is kept
    assert report["condensed"]["runs"] == evaluate_condensed(*args)["condensed"]["runs"]
    assert [name.endswith(".json") for name in storage.list_dir(runs_dir)] == [True]


def test_runs_as_ray_tasks_give_the_same_report(tmp_path, ray_local):
    out, _ = exported(tmp_path)
    test_x, test_y = separable(10, seed=2)
    train_x, train_y = separable(10, seed=3)
    cfg = EvalConfig(epochs=3, runs=2, batch_size=8)
    args = (out, test_x, test_y, train_x, train_y, DIGITS, 2, 4, cfg)
    parallel = evaluate_condensed(*args, use_ray=True)  # one task per run
    serial = evaluate_condensed(*args, use_ray=False)
    for part in ("condensed", "random_real"):
        # Each run's seed fixes it; a task trains with one thread, which may flip at most one of
        # the 20 test images (5 %) through float summation order.
        assert len(parallel[part]["runs"]) == 2
        assert parallel[part]["runs"] == pytest.approx(serial[part]["runs"], abs=5.01)


def test_evaluate_condensed_refuses_another_profile(tmp_path):
    out, _ = exported(tmp_path)
    x = torch.zeros(2, 1, 28, 28)
    y = torch.zeros(2, dtype=torch.int64)
    cfg = EvalConfig(epochs=1, runs=1)
    with pytest.raises(UserError, match="differs from profile"):
        evaluate_condensed(out, x, y, None, None, get_profile("mnist"), 2, 4, cfg)
