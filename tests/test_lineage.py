"""Results you can trust: no derived output outlives what it was computed from, the init pool
is part of what reused statistics must serve, the random-real baseline draws its own subsets,
and a validation split the statistics never see."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from safetensors.torch import load_file

from condense_pipeline import api, storage
from condense_pipeline.config import condense_config, init_images, stats_config
from condense_pipeline.datasets import DATA_HOME_ENV, get_profile
from condense_pipeline.errors import UserError
from condense_pipeline.evaluate.protocol import EvalConfig
from condense_pipeline.formats import BASELINE_JSON, EVAL_DIR, VALIDATION
from condense_pipeline.pipeline import lineage
from condense_pipeline.pipeline.condense import read_bank, run_condense
from condense_pipeline.pipeline.read import load_dataset_info
from condense_pipeline.pipeline.stats import load_stats, run_stats
from condense_pipeline.prepare import prepare_dataset

PROFILE = get_profile("digits")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A data home holding digits as `prepare` leaves it: train, validation and test."""
    root = tmp_path_factory.mktemp("home")
    prepare_dataset("digits", None, str(root / "digits"))
    return root


def small_stats(**overrides):
    return replace(
        stats_config(PROFILE, ("dm",)), **{"probes": 4, "workers": 1, "init_pool": 4, **overrides}
    )


def images_of(result):
    return {p: load_file(p)["images"] for p in sorted_group_files(result.folder)}


def sorted_group_files(folder):
    return sorted(
        storage.join(folder, g, "images.safetensors")
        for g in storage.list_dir(folder)
        if g.startswith("group-")
    )


def test_condense_after_stats_overwrite_never_returns_the_old_images(ray_local, home, tmp_path):
    # Catches: condensation folders named from the condense settings alone, so that `condense`
    # after `stats --overwrite` handed back images made against the replaced statistics.
    run_dir, data = str(tmp_path / "run"), str(home / "digits" / "train")
    cond = condense_config(PROFILE, "dm", 2, steps=5)
    run_stats(PROFILE, data, run_dir, small_stats())
    first = run_condense(run_dir, cond)
    old = first.images.clone()
    assert lineage.stale_condensations(run_dir, read_bank(run_dir)) == []

    run_stats(PROFILE, data, run_dir, small_stats(probes=6), overwrite=True)
    assert lineage.stale_condensations(run_dir, read_bank(run_dir)) == [cond.folder_name()]
    lines = []
    again = run_condense(run_dir, cond, progress=lines.append)
    assert again.groups_run >= 1 and again.groups_skipped == 0
    assert any("statistics changed" in line for line in lines)
    assert not again.images.equal(old)  # condensed against the 6-probe bank
    assert lineage.stale_condensations(run_dir, read_bank(run_dir)) == []
    # the same settings once more: everything reused
    assert run_condense(run_dir, cond).groups_run == 0


def test_a_pool_too_small_is_refused_before_any_work_with_advice_that_works(
    ray_local, home, tmp_path
):
    # Catches: the init pool left out of the reuse check, so the advice "rerun stats with
    # --init-pool N" reused the same statistics and the condense failed again.
    run_dir, data = str(tmp_path / "run"), str(home / "digits" / "train")
    run_stats(PROFILE, data, run_dir, small_stats(init_pool=2))
    cond = condense_config(PROFILE, "dm", 3, steps=5)
    with pytest.raises(UserError, match="needs 3") as refused:
        run_condense(run_dir, cond)
    assert not storage.exists(storage.join(run_dir, "condense"))  # nothing done
    advice = str(refused.value)
    pool = int(re.search(r"--init-pool (\d+)", advice).group(1))
    run_stats(
        PROFILE, data, run_dir, small_stats(init_pool=pool), overwrite="--overwrite" in advice
    )
    assert run_condense(run_dir, cond).groups_run >= 1

    # finished statistics serve any smaller pool, and refuse a larger one, saying so
    assert run_stats(PROFILE, data, run_dir, small_stats(init_pool=1)).reused
    with pytest.raises(UserError, match="init_pool: 3 -> 9"):
        run_stats(PROFILE, data, run_dir, small_stats(init_pool=9))


@pytest.fixture(scope="module")
def evaluated(ray_local, home, tmp_path_factory):
    """A whole tiny run (IPC 2, dm) evaluated with 3 runs: its run directory and report."""
    run_dir = str(tmp_path_factory.mktemp("run") / "run")
    cond = condense_config(PROFILE, "dm", 2, steps=5)
    evaluation = EvalConfig(epochs=1, runs=3)
    cfg = api.RunConfig(
        profile=PROFILE,
        run_dir=run_dir,
        data=str(home / "digits" / "train"),
        test=str(home / "digits" / "test"),
        stats=stats_config(PROFILE, ("dm",), probes=4, workers=1),
        condense=cond,
        evaluate=evaluation,
    )
    summary = api.run(cfg)
    return run_dir, cond, evaluation, summary.report


def test_each_baseline_run_draws_its_own_subset_outside_the_init(evaluated):
    # Catches: a baseline drawn from an init pool of exactly IPC images, so every run trained on
    # the same images, which were also the condensed set's starting point (a ± of no subsets).
    run_dir, cond, evaluation, report = evaluated
    assert report["random_real"]["seeds"] == [0, 1, 2]
    chosen = storage.read_json(
        storage.join(api.condense_dir(run_dir, cond), EVAL_DIR, BASELINE_JSON)
    )
    subsets = [set(chosen[str(seed)]) for seed in report["random_real"]["seeds"]]
    assert all(len(s) == 2 * 10 for s in subsets)
    assert not subsets[0] & subsets[1] and not subsets[1] & subsets[2]
    need = init_images(cond.ipc, cond.factor, cond.init)
    stats = load_stats(run_dir, list(range(10)))
    init = {k for c in range(10) for k in stats.pool(c)[1][:need]}
    assert not init & set().union(*subsets)


def test_the_report_names_its_inputs_and_a_stale_export_is_refused(evaluated, home, tmp_path):
    # Catches: evaluating (and reporting on) an export made from statistics since replaced.
    run_dir, cond, evaluation, report = evaluated
    bank = read_bank(run_dir)
    assert report["inputs"]["condensation"] == lineage.condensation_fingerprint(bank, cond)
    assert report["inputs"]["test_split"] == "test"
    other = replace(cond, seed=1)  # another condensation's fingerprint in the manifest
    export_dir = storage.join(api.condense_dir(run_dir, cond), "export")
    manifest = storage.read_json(storage.join(export_dir, "manifest.json"))
    with pytest.raises(UserError, match="made from other statistics"):
        lineage.check_export(manifest, bank, other, export_dir)


def test_validation_split_is_held_out_and_evaluated_on(evaluated, home, monkeypatch):
    # Catches: settings chosen on the test split, or validation images the statistics saw.
    run_dir, cond, evaluation, _ = evaluated
    train = load_dataset_info(str(home / "digits" / "train"))
    validation = load_dataset_info(str(home / "digits" / VALIDATION))
    assert train["held_out"] == {"split": VALIDATION, "per_class": 10, "seed": 0}
    assert validation["counts"] == [10] * 10
    done = storage.read_json(storage.join(run_dir, "stats", storage.DONE))
    assert done["images"] == train["num_samples"] == 1797 - 360 - 100
    monkeypatch.setenv(DATA_HOME_ENV, str(home))
    report = api.evaluate(run_dir, cond, PROFILE, replace(evaluation, runs=1), split=VALIDATION)
    assert report["inputs"]["test_split"] == VALIDATION and report["num_test"] == 100
