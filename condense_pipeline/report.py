"""The run report: one self-contained HTML page (images inlined) about a run directory.

It puts on one page what is otherwise spread over manifest.json, bank.json, each condensation's
config.json, its export's manifest.json and eval/report.json: for every exported condensation the
preview grid, the loss plot, the accuracy table (condensed against random real images, mean ± std
and every run), the accuracy per class; and for the run the stage timings, what was reused or
rerun, the settings and the fingerprints. Where several evaluated condensations differ only in
their number of steps, a plot of accuracy against steps.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time

from condense_pipeline import formats, plots, storage

log = logging.getLogger(__name__)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 16px 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 24px 0 8px; }
h3 { font-size: 15px; margin: 16px 0 6px; } .muted { color: #666; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0 8px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.row { display: flex; gap: 16px; align-items: flex-start; flex-wrap: wrap; }
.row img { max-width: 46vw; max-height: 420px; border: 1px solid #ddd; }
img.wide { max-width: 95vw; border: 1px solid #ddd; }
details { margin: 6px 0; } summary { cursor: pointer; font-size: 14px; }
"""


def _img(data: bytes | None, alt: str, css: str = "") -> str:
    if not data:
        return ""
    src = "data:image/png;base64," + base64.b64encode(data).decode()
    cls = f' class="{css}"' if css else ""
    return f'<img{cls} alt="{html.escape(alt)}" title="{html.escape(alt)}" src="{src}">'


def _table(header: list[str], rows: list[list], numeric_from: int = 1, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    out = [f"<table{cls}><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            num = ' class="num"' if i >= numeric_from else ""
            cells.append(f"<td{num}>{html.escape(str(value))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def _settings(d: dict) -> str:
    """A flat key/value table; nested values as compact JSON."""
    rows = [
        [k, v if isinstance(v, str | int | float) or v is None else json.dumps(v)]
        for k, v in sorted(d.items())
    ]
    return _table(["setting", "value"], rows, numeric_from=99)


def _read(path: str, binary: bool = False):
    if not storage.exists(path):
        return None
    return storage.read_bytes(path) if binary else storage.read_json(path)


def _pm(s: dict) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def accuracy_table(report: dict) -> str:
    """Condensed vs random real: mean ± std over runs, and every run, in percent."""
    rows = []
    for name, key in (("condensed", "condensed"), ("random real (same IPC)", "random_real")):
        s = report.get(key)
        if s:
            rows.append([name, _pm(s), ", ".join(f"{a:.2f}" for a in s["runs"])])
    caption = (
        f"test accuracy (%) of a {report['model']} trained {report['epochs']} epochs, "
        f"{report['runs']} runs, on {report['num_test']} real test images"
    )
    return f'<p class="muted">{html.escape(caption)}</p>' + _table(
        ["training set", "mean ± std", "runs"], rows, css="accuracy"
    )


def per_class_section(report: dict, classes: list[str]) -> str:
    cond = (report.get("condensed") or {}).get("per_class")
    if not cond:
        return ""
    base = (report.get("random_real") or {}).get("per_class")
    plot = plots.per_class_png(classes, cond, base)
    rows = [
        [name, f"{c:.1f}", "" if base is None else f"{base[i]:.1f}"]
        for i, (name, c) in enumerate(zip(classes, cond))
    ]
    table = _table(["class", "condensed", "random real"], rows)
    return (
        "<h3>Accuracy per class</h3>"
        + _img(plot, "accuracy per class", "wide")
        + f"<details><summary>per-class table (%)</summary>{table}</details>"
    )


def condensation_section(run_dir: str, folder: str) -> tuple[str, dict | None]:
    """The HTML of one condensation, and its accuracy point for the steps plot (or None)."""
    base = storage.join(run_dir, formats.CONDENSE_DIR, folder)
    export = storage.join(base, formats.EXPORT_DIR)
    cfg = _read(storage.join(base, "config.json")) or {}
    manifest = _read(storage.join(export, formats.MANIFEST)) or {}
    report = _read(storage.join(base, formats.EVAL_DIR, formats.REPORT_JSON))
    parts = [f'<h2 id="{html.escape(folder)}">condense/{html.escape(folder)}</h2>']
    if report:
        parts.append(accuracy_table(report))
    else:
        parts.append('<p class="muted">not evaluated (run `condense-pipeline evaluate`)</p>')
    preview = _read(storage.join(export, formats.PREVIEW_PNG), binary=True)
    loss = _read(storage.join(export, formats.LOSS_PNG), binary=True)
    parts.append(
        '<div class="row">'
        + _img(preview, "preview: condensed images, a row per class")
        + _img(loss, "condensation loss")
        + "</div>"
    )
    if report:
        parts.append(per_class_section(report, manifest.get("classes", [])))
    parts.append("<h3>Settings and provenance</h3>")
    parts.append(f"<details><summary>condensation settings</summary>{_settings(cfg)}</details>")
    if manifest:
        keep = ("num_images", "float_vs_png_max_abs_diff_pixels", "clamped_fraction")
        export_info = {**manifest.get("provenance", {}), **{k: manifest.get(k) for k in keep}}
        parts.append(
            f"<details><summary>export provenance</summary>{_settings(export_info)}</details>"
        )
        parts.append(
            "<details><summary>training recipe of the evaluation</summary>"
            f"{_settings(manifest.get('recipe', {}))}</details>"
        )
    point = None
    if report and report["condensed"] and cfg:
        point = {
            "steps": cfg.get("steps"),
            "mean": report["condensed"]["mean"],
            "std": report["condensed"]["std"],
            "random_mean": (report.get("random_real") or {}).get("mean"),
            "same": json.dumps({k: v for k, v in cfg.items() if k != "steps"}, sort_keys=True),
        }
    return "".join(parts), point


def steps_section(points: list[dict]) -> str:
    """Accuracy against steps, for the largest set of condensations that differ only in steps."""
    by_config: dict[str, list[dict]] = {}
    for p in points:
        by_config.setdefault(p["same"], []).append(p)
    series = max(by_config.values(), key=len, default=[])
    if len({p["steps"] for p in series}) < 2:
        return ""
    return "<h2>Accuracy against steps</h2>" + _img(plots.accuracy_png(series), "accuracy")


def run_section(manifest: dict, bank: dict | None) -> str:
    parts = []
    stages = manifest.get("stages", {})
    if stages:
        order = ["stats", "condense", "export", "evaluate"]  # the manifest's keys come sorted
        names = sorted(stages, key=lambda n: order.index(n) if n in order else len(order))
        rows = [[n, stages[n]["status"], f"{stages[n]['seconds']:.1f}"] for n in names]
        parts.append("<h2>Stages (last run)</h2>" + _table(["stage", "status", "seconds"], rows, 2))
    reuse = []
    stats = manifest.get("stats")
    if stats:
        reuse.append(["statistics", "reused" if stats.get("reused") else "computed"])
        for r in stats.get("retries", []):
            reuse.append([f"stats unit {r['unit'] + 1}", f"rerun: {r['why']}"])
    cond = manifest.get("condense")
    if cond:
        reuse.append(
            ["condensation groups", f"{cond['groups_run']} run, {cond['groups_reused']} reused"]
        )
        for r in cond.get("retries", []):
            reuse.append([f"condense group {r['group'] + 1}", f"rerun: {r['why']}"])
    if reuse:
        parts.append("<h2>Reused or rerun</h2>" + _table(["what", "how"], reuse, 99))
    if stats and not stats.get("reused"):
        keep = ("images", "skipped", "forwards", "seconds", "images_per_s", "workers", "device")
        parts.append(
            "<details><summary>statistics pass</summary>"
            f"{_settings({k: stats[k] for k in keep if k in stats})}</details>"
        )
    if bank:
        fingerprints = {"dataset": bank.get("dataset"), "profile": bank.get("profile")}
        parts.append("<h2>Settings and fingerprints</h2>")
        parts.append(
            f"<details><summary>data and bank</summary>{_settings(fingerprints)}</details>"
        )
        parts.append(
            f"<details><summary>probe bank</summary>{_settings(bank.get('spec', {}))}</details>"
        )
    if manifest.get("config"):
        parts.append(
            f"<details><summary>run settings</summary>{_settings(manifest['config'])}</details>"
        )
    if manifest.get("versions"):
        versions = _settings(manifest["versions"])
        parts.append(f"<details><summary>versions</summary>{versions}</details>")
    return "".join(parts)


def exported_condensations(run_dir: str) -> list[str]:
    """Condensation folders of the run directory that hold a finished export."""
    root = storage.join(run_dir, formats.CONDENSE_DIR)
    if not storage.exists(root):
        return []
    return [
        f
        for f in storage.list_dir(root)
        if storage.is_done(storage.join(root, f, formats.EXPORT_DIR))
    ]


def build_report(run_dir: str) -> str:
    """The report page of `run_dir` as an HTML string."""
    from condense_pipeline.errors import UserError

    folders = exported_condensations(run_dir)
    if not folders:
        raise UserError(f"{run_dir} holds no exported condensation; run `condense-pipeline run`")
    manifest = _read(storage.join(run_dir, formats.MANIFEST)) or {}
    bank = _read(storage.join(run_dir, formats.STATS_DIR, formats.BANK_JSON))
    dataset = manifest.get("dataset") or (bank or {}).get("profile")
    name = f"condense-pipeline report: {dataset}" if dataset else "condense-pipeline report"
    sections, points = [], []
    for folder in folders:
        section, point = condensation_section(run_dir, folder)
        sections.append(section)
        if point:
            points.append(point)
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    head = (
        f"<h1>{html.escape(name)}</h1>"
        f'<p class="muted">{html.escape(run_dir)}, {len(folders)} condensation(s), '
        f"written {when}</p>"
    )
    body = head + "".join(sections) + steps_section(points) + run_section(manifest, bank)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(name)}</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def write_report(run_dir: str) -> str:
    """Write RUN_DIR/report.html; returns its path."""
    path = storage.join(run_dir, formats.REPORT_HTML)
    storage.write_bytes(path, build_report(run_dir).encode())
    log.info("report written to %s", path)
    return path
