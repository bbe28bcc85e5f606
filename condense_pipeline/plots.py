"""The figures of an export and its report, drawn with matplotlib (Agg: no display needed).

The condensation loss is not comparable from one step to the next: each step matches against
another probe (network and augmentation), and each probe has its own loss scale. So the loss plot
divides every logged loss by the loss the same probe (and group) had at its first logged use: a
value below 1 says the synthetic images match that probe better than they did before. Where no
logged probe recurs (online targets draw a fresh network every step) it shows the raw loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless, no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from condense_pipeline import storage  # noqa: E402

SMOOTH_WINDOW = 9  # logged points in the running median of the loss curve
DPI = 100


def _png(fig) -> bytes:
    fig.tight_layout()
    data = storage.buffer_to_bytes(lambda f: fig.savefig(f, format="png", dpi=DPI))
    plt.close(fig)
    return data


def relative_loss(
    loss_log: list[dict], probe_of_step: Callable[[int], int] | None
) -> tuple[list[tuple[float, float]], bool]:
    """(step, value) points, and whether the values are relative to each probe's first use.

    loss_log rows are {"step", "loss", "group"?}; `probe_of_step` maps a logged (1-based) step to
    the probe it used. A probe first seen at a step has value 1 there. Without recurring probes the
    values are the raw losses.
    """
    rows = [r for r in loss_log if math.isfinite(float(r["loss"]))]
    if probe_of_step is None:
        return [(float(r["step"]), float(r["loss"])) for r in rows], False
    first: dict[tuple[str, int], float] = {}
    points, recurs = [], False
    for r in sorted(rows, key=lambda r: (str(r.get("group", "")), r["step"])):
        key = (str(r.get("group", "")), probe_of_step(int(r["step"])))
        loss = float(r["loss"])
        if key in first:
            recurs = True
        else:
            first[key] = loss
        base = first[key]
        points.append((float(r["step"]), loss / base if base else 1.0))
    if not recurs:
        return [(float(r["step"]), float(r["loss"])) for r in rows], False
    return sorted(points), True


def _running_median(xs: np.ndarray, ys: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Median of ys per distinct x (groups share steps), then a centred running median."""
    steps = np.unique(xs)
    per_step = np.array([np.median(ys[xs == s]) for s in steps])
    half = window // 2
    smooth = np.array(
        [np.median(per_step[max(0, i - half) : i + half + 1]) for i in range(len(per_step))]
    )
    return steps, smooth


def loss_png(
    loss_log: list[dict], probe_of_step: Callable[[int], int] | None = None
) -> bytes | None:
    """The condensation loss against step (see the module docstring); None without finite rows."""
    points, relative = relative_loss(loss_log, probe_of_step)
    if not points:
        return None
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.scatter(xs, ys, s=10, alpha=0.35, color="tab:blue", linewidths=0, label="logged steps")
    steps, smooth = _running_median(xs, ys, SMOOTH_WINDOW)
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label="running median")
    if relative:
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_ylabel("loss / the same probe's loss at its first use")
    else:
        ax.set_ylabel("loss")
        if (ys > 0).all():
            ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("condensation loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def per_class_png(
    class_names: list[str], condensed: list[float], random_real: list[float] | None
) -> bytes:
    """Bars of per-class test accuracy (%), condensed next to random real when there is one."""
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.35 * n + 2), 3.6))
    x = np.arange(n)
    width = 0.4 if random_real else 0.8
    ax.bar(x - (width / 2 if random_real else 0), condensed, width, label="condensed")
    if random_real:
        ax.bar(x + width / 2, random_real, width, label="random real", color="tab:grey")
    ax.set_xticks(x, [name[:12] for name in class_names], rotation=90 if n > 12 else 0)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 118)  # room above 100 % for the legend
    ax.set_yticks(range(0, 101, 20))
    ax.set_title("accuracy per class (mean over runs)")
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def accuracy_png(points: list[dict]) -> bytes:
    """Test accuracy against condensation steps; points are {"steps", "mean", "std",
    "random_mean"?} for condensations that differ only in their number of steps."""
    points = sorted(points, key=lambda p: p["steps"])
    steps = [p["steps"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.errorbar(
        steps,
        [p["mean"] for p in points],
        [p["std"] for p in points],
        marker="o",
        capsize=3,
        label="condensed",
    )
    baseline = [p["random_mean"] for p in points if p.get("random_mean") is not None]
    if baseline:
        ax.axhline(float(np.mean(baseline)), color="tab:grey", linestyle="--", label="random real")
    ax.set_xlabel("condensation steps")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy against steps")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)
