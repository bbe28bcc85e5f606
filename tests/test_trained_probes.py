"""Trained probes: the experts' training stage resumes, a trained probe is the blend of its
expert's weights, its statistics do not depend on the workers, and condense_dataset takes them."""

import hashlib
import json
import os
import shutil
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from conftest import small_spec
from safetensors.torch import load_file
from test_api import _digits_ds
from test_pipeline import _assert_close

from condense_pipeline import condense_dataset, storage
from condense_pipeline.condense.bank import BankSpec, ProbeBank
from condense_pipeline.condense.experts import (
    EXPERTS_JSON,
    experts_dir,
    initial_model,
    save_expert,
    train_expert,
    weight_path,
)
from condense_pipeline.condense.stats import ClassStats, accumulate
from condense_pipeline.condense.targets import calibration_loss
from condense_pipeline.config import condense_config, stats_config, train_probes_config
from condense_pipeline.datasets import get_profile
from condense_pipeline.errors import UserError
from condense_pipeline.formats import BANK_JSON, ERROR, IMAGE, KEY, LABEL
from condense_pipeline.pipeline import read
from condense_pipeline.pipeline.stats import load_bandwidths, load_stats, run_stats, stats_dir
from condense_pipeline.pipeline.train_probes import expert_recipe, run_train_probes
from condense_pipeline.prepare import prepare_dataset

PROFILE = get_profile("digits")
TRAIN = train_probes_config(PROFILE, experts=2, epochs=2)


def _recipe(epochs=1):
    return replace(expert_recipe(PROFILE, TRAIN), epochs=epochs)


def _trained_spec(fingerprint, trained=3, probes=5):
    return replace(
        small_spec(probes=probes),
        trained=trained,
        experts=2,
        experts_fingerprint=fingerprint,
    )


@pytest.fixture
def fake_experts(tmp_path):
    """Two experts whose final weights are other seeded networks (no training needed)."""
    folder = str(tmp_path / "experts")
    for e in range(2):
        initial = initial_model(_recipe(), e).state_dict()
        final = initial_model(_recipe(), e + 10).state_dict()
        save_expert(folder, e, "fp", initial, final)
    return folder


def test_a_random_banks_json_has_no_trained_fields():
    spec = small_spec()
    assert not {"trained", "experts", "experts_fingerprint"} & set(spec.to_json())
    assert BankSpec.from_json(spec.to_json()) == spec
    trained = replace(spec, trained=2, experts=3, experts_fingerprint="abc")
    assert BankSpec.from_json(json.loads(json.dumps(trained.to_json()))) == trained


def test_a_trained_probe_is_its_experts_blend_and_the_rest_stay_random(fake_experts):
    spec = _trained_spec("fp")
    bank = ProbeBank(spec, experts=fake_experts)
    random = ProbeBank(small_spec(probes=5))
    draws = [spec.trained_probe(k) for k in range(3)]
    assert draws == [spec.trained_probe(k) for k in range(3)]  # from (seed, k) alone
    assert all(0 <= b < 1 for _, b in draws) and len({b for _, b in draws}) == 3
    for k, (e, beta) in enumerate(draws):
        init = load_file(weight_path(fake_experts, e, "init"))
        final = load_file(weight_path(fake_experts, e, "final"))
        for name, w in bank.network(k).state_dict().items():
            torch.testing.assert_close(w, beta * init[name] + (1 - beta) * final[name])
    for k in (3, 4):
        for a, b in zip(bank.network(k).parameters(), random.network(k).parameters()):
            assert torch.equal(a, b)


def test_experts_of_another_fingerprint_are_refused(fake_experts):
    with pytest.raises(UserError, match="other data or with another recipe"):
        ProbeBank(_trained_spec("other"), experts=fake_experts)
    with pytest.raises(UserError, match="trained probes"):
        ProbeBank(_trained_spec("fp"))


def test_training_an_expert_twice_gives_the_same_weights(digits):
    images, labels, _ = digits
    x, y = images[:300], torch.from_numpy(labels[:300])
    init_a, final_a = train_expert(_recipe(), 1, x, y)
    init_b, final_b = train_expert(_recipe(), 1, x, y)
    assert all(torch.equal(init_a[k], init_b[k]) and torch.equal(final_a[k], final_b[k])
               for k in final_a)  # fmt: skip
    assert not torch.equal(init_a["classifier.weight"], final_a["classifier.weight"])
    _, other = train_expert(_recipe(), 0, x, y)
    assert not torch.equal(other["classifier.weight"], final_a["classifier.weight"])


def test_calibration_loss_sums_the_class_means_of_the_cross_entropy():
    logits = torch.randn(3, 4, 10)
    classes = torch.tensor([7, 2, 5])
    expected = sum(
        torch.nn.functional.cross_entropy(logits[g], classes[g].repeat(4)) for g in range(3)
    )
    torch.testing.assert_close(calibration_loss(logits, classes), expected)
    # any grouping of the classes sums to the same
    split = calibration_loss(logits[:1], classes[:1]) + calibration_loss(logits[1:], classes[1:])
    torch.testing.assert_close(split, expected)


def test_calibration_off_keeps_the_folder_name_and_on_changes_it():
    cfg = condense_config(PROFILE, "dm", 10)
    fields = asdict(cfg)
    for name in ("groups", "chunk", "stall_timeout_s", "calibration"):
        fields.pop(name)
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    assert cfg.folder_name() == f"ipc10-dm-{digest}"
    assert replace(cfg, calibration=1.0).folder_name() != cfg.folder_name()
    with pytest.raises(UserError, match="--targets bank"):
        replace(cfg, calibration=1.0, targets="online")


# -- on a local Ray --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):  # our local Ray first: prepare would start another
    out = str(tmp_path_factory.mktemp("digits"))
    prepare_dataset("digits", None, out, shard_size=150)
    return os.path.join(out, "train")


@pytest.fixture(scope="module")
def trained(ray_local, shards, tmp_path_factory):
    """A run directory with TRAIN's two experts, trained on Ray Train."""
    run_dir = str(tmp_path_factory.mktemp("trained"))
    summary = run_train_probes(PROFILE, shards, run_dir, TRAIN)
    assert summary["trained"] == 2 and summary["reused"] == 0
    return run_dir


def _copy_experts(run_dir: str, to: str) -> None:
    shutil.copytree(experts_dir(run_dir), experts_dir(to))


def test_a_rerun_trains_only_the_missing_expert_and_the_same_weights(trained, shards, tmp_path):
    run_dir = str(tmp_path / "run")
    _copy_experts(trained, run_dir)
    folder = experts_dir(run_dir)
    kept = weight_path(folder, 0, "final")
    stamp = os.path.getmtime(kept)
    os.remove(weight_path(folder, 1, "final"))  # as a run killed while training expert 1
    summary = run_train_probes(PROFILE, shards, run_dir, TRAIN)
    assert summary["trained"] == 1 and summary["reused"] == 1
    assert os.path.getmtime(kept) == stamp
    fresh = load_file(weight_path(experts_dir(trained), 1, "final"))
    again = load_file(weight_path(folder, 1, "final"))
    assert fresh.keys() == again.keys()
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)
    # nothing is missing now: a third run trains nothing
    assert run_train_probes(PROFILE, shards, run_dir, TRAIN)["trained"] == 0


def test_experts_never_train_on_the_validation_split(shards, tmp_path):
    validation = os.path.join(os.path.dirname(shards), "validation")
    with pytest.raises(UserError, match="training shards only"):
        run_train_probes(PROFILE, validation, str(tmp_path), TRAIN)


def _stats_cfg(**kw):
    base = dict(probes=4, real_per_probe=40, init_pool=4, shards_per_unit=3, workers=2)
    base.update(trained_probes=2, experts=2)
    return replace(stats_config(PROFILE, ("dm", "m3d")), **{**base, **kw})


def test_trained_bank_statistics_do_not_depend_on_the_workers(trained, shards, tmp_path):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    for run_dir in (two, one):
        _copy_experts(trained, run_dir)
    run_stats(PROFILE, shards, two, _stats_cfg())
    run_stats(PROFILE, shards, one, _stats_cfg(workers=1, shards_per_unit=10))
    classes = list(range(10))
    _assert_close(load_stats(one, classes), load_stats(two, classes))

    # the same as one plain pass with the blended networks
    bank_json = storage.read_json(os.path.join(stats_dir(two), BANK_JSON))
    spec = BankSpec.from_json(bank_json["spec"])
    assert spec.trained == 2 and [p["probe"] for p in bank_json["trained_probes"]] == [0, 1]
    bank = ProbeBank(spec, experts=experts_dir(two))
    rows = [r for r in read.iter_decoded(storage.list_shards(shards), PROFILE, 10) if not r[ERROR]]
    plain = ClassStats.zeros(bank, 4)
    counts = np.asarray(read.load_dataset_info(shards)["counts"])
    images = torch.from_numpy(np.stack([r[IMAGE] for r in rows]))
    accumulate(
        plain, bank, images, np.array([r[LABEL] for r in rows]), [r[KEY] for r in rows],
        counts, load_bandwidths(two),
    )  # fmt: skip
    _assert_close(plain, load_stats(two, classes))

    # experts retrained with another recipe make other statistics: refused, not reused
    location = os.path.join(experts_dir(two), EXPERTS_JSON)
    record = storage.read_json(location)
    storage.write_json(location, {**record, "fingerprint": "retrained"})
    with pytest.raises(UserError, match="experts_fingerprint"):
        run_stats(PROFILE, shards, two, _stats_cfg())


def test_condense_dataset_with_trained_probes_and_calibration(ray_local, digits, tmp_path):
    work = str(tmp_path / "work")
    out = condense_dataset(
        _digits_ds(digits), ipc=1, method="dm", work_dir=work, profile="digits", probes=4, steps=10,
        trained_probes=2, experts=2, expert_epochs=1, calibration=1.0,
    )  # fmt: skip
    rows = out.take_all()
    assert sorted(r["label"] for r in rows) == list(range(10))
    spec = BankSpec.from_json(storage.read_json(os.path.join(stats_dir(work), BANK_JSON))["spec"])
    assert spec.trained == 2 and spec.experts == 2
    recipe = storage.read_json(os.path.join(experts_dir(work), EXPERTS_JSON))["recipe"]
    assert recipe["epochs"] == 1 and recipe["num_classes"] == 10
    folders = os.listdir(os.path.join(work, "condense"))
    config = storage.read_json(os.path.join(work, "condense", folders[0], "config.json"))
    assert config["calibration"] == 1.0


def test_the_dry_run_adds_the_training_stage_and_stats_without_experts_fail(shards, tmp_path):
    from test_cli import cli

    run_dir = str(tmp_path / "run")
    out = cli(
        "run", "digits", "--data", shards, "--out", run_dir, "--method", "dm", "--dry-run",
        "--trained-probes", "5", "--experts", "3", "--expert-epochs", "2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "3 experts x 2 epochs on 1337 images" in out.stdout
    assert "forwards+backwards: 8,022" in out.stdout  # every expert sees every image per epoch
    assert not os.path.exists(run_dir)
    out = cli("stats", "digits", "--data", shards, "--out", run_dir, "--trained-probes", "5")
    assert out.returncode == 2 and "run `condense-pipeline train-probes`" in out.stderr
