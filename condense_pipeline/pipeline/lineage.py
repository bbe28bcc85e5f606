"""Fingerprints of what each derived output was computed from, and the checks that use them.

statistics   = bank spec + training-data fingerprint + init pool (all in bank.json)
condensation = statistics + the condense settings (its folder name)
export       = the condensation it holds (in its manifest's provenance)
report       = the export + the data it was tested on

A condensation folder records its statistics in inputs.json and every finished group in its
marker; one made from other statistics than the run directory holds now is stale: `condense`
recomputes it, `evaluate` refuses its export, `show` marks its report.
"""

from __future__ import annotations

import hashlib
import json
import logging

from condense_pipeline import storage
from condense_pipeline.config import CondenseConfig
from condense_pipeline.errors import UserError
from condense_pipeline.formats import CONDENSE_DIR

log = logging.getLogger(__name__)

INPUTS_JSON = "inputs.json"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def stats_fingerprint(bank_json: dict) -> str:
    """What the statistics were computed from: the bank, the training data and the init pool."""
    return _digest([bank_json["spec"], bank_json["dataset"], bank_json["init_pool"]])


def condensation_fingerprint(bank_json: dict, cfg: CondenseConfig) -> str:
    return _digest([stats_fingerprint(bank_json), cfg.folder_name()])


def data_fingerprint(info: dict, shards: list[str]) -> str:
    """A split (its dataset.json) as far as `shards` take it."""
    names = sorted(s.rsplit("/", 1)[-1] for s in shards)
    return _digest([info["name"], info["split"], info["classes"], info["shards"], names])


def pool_sizes(bank_json: dict, summary: dict) -> list[int]:
    """Initial images each class's pool holds: the pool size, or fewer in a smaller class."""
    return [min(bank_json["init_pool"], n) for n in summary["class_images"]]


def pool_conflict(existing: dict, wanted: dict, done: bool) -> list[str]:
    """Why statistics with bank.json `existing` cannot serve a request for `wanted`'s init pool
    ([] when they can): finished ones serve any smaller pool (the pool is a bottom-k, so a
    smaller one is a prefix of it); an unfinished pass resumes only with the same."""
    have, need = existing["init_pool"], wanted["init_pool"]
    if have == need or (done and have > need):
        return []
    return [f"init_pool: {have} -> {need}"]


def _recorded(folder: str) -> str | None:
    path = storage.join(folder, INPUTS_JSON)
    return storage.read_json(path)["statistics"] if storage.exists(path) else None


def claim_condensation(folder: str, bank_json: dict, say) -> None:
    """Make `folder` a condensation of the current statistics: one made from others (groups,
    checkpoints, export, report) is removed first, so nothing of it is ever reused."""
    current = stats_fingerprint(bank_json)
    recorded = _recorded(folder)
    if recorded == current:
        return
    if storage.list_dir(folder):
        say(f"{folder}: the statistics changed since it was condensed; recomputing it")
        storage.delete(folder)
    storage.write_json(storage.join(folder, INPUTS_JSON), {"statistics": current})


def group_marker(bank_json: dict, info: dict) -> dict:
    """A finished group's marker: what it was computed from, with `info`."""
    return {**info, "statistics": stats_fingerprint(bank_json)}


def group_current(group_dir: str, bank_json: dict) -> bool:
    """A group finished against the current statistics (a rerun skips it)."""
    if not storage.is_done(group_dir):
        return False
    marker = storage.read_json(storage.join(group_dir, storage.DONE))
    return marker.get("statistics") == stats_fingerprint(bank_json)


def stale_condensations(run_dir: str, bank_json: dict) -> list[str]:
    """The condensation folders of `run_dir` made from other statistics than `bank_json`'s."""
    current = stats_fingerprint(bank_json)
    root = storage.join(run_dir, CONDENSE_DIR)
    return [
        name for name in storage.list_dir(root) if _recorded(storage.join(root, name)) != current
    ]


def check_export(manifest: dict, bank_json: dict, cfg: CondenseConfig, export_dir: str) -> str:
    """The export's condensation fingerprint; refuses an export of other statistics."""
    recorded = manifest.get("provenance", {}).get("condensation")
    if recorded != condensation_fingerprint(bank_json, cfg):
        folder = export_dir.rstrip("/").rsplit("/", 1)[0]
        raise UserError(
            f"the export at {export_dir} was made from other statistics than the run directory "
            f"holds now; run `condense-pipeline export {folder}` (it recomputes the condensation)"
        )
    return recorded
