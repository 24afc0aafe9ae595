"""Figures saved with runs and drawn by scripts/notebooks. Matplotlib is imported lazily (Agg backend).

The figures of finished runs take fipa.results runs and an output path (scripts/plot.py is a thin CLI over them):

    from fipa.results import completed_runs, load_runs
    runs, _ = completed_runs(load_runs("multirun/2026-11-24/10-00-00"))
    plot_learning_curves(runs, "test_mse", "curves.png")   # vs round and vs accumulated round time
    plot_prediction_panels(runs, "fit_panels.png")          # fitted function (1-D) or error map (2-D) per arm
"""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fipa.results import (
    Run,
    final_value,
    finite_rows,
    group_arms,
    headline_metric,
    load_predictions,
    seed_of,
    series,
    switch_round,
)

if TYPE_CHECKING:  # torch stays unimported for the scripts that only read results
    from torch import Tensor

Box = tuple[Sequence[float], Sequence[float]]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_predictions(path: Path, x: Tensor, target: Tensor, prediction: Tensor, boxes: Sequence[Box]) -> None:
    """predictions.npz: the final global model on the task's plotting points, with the client regions.

    Keys x (n, d), target (n,), prediction (n,), region_lo / region_hi (clients, d); scripts/plot.py and the
    notebooks draw the paper's fitted-function panels and error maps from it without rebuilding the model.
    """
    import numpy as np

    np.savez_compressed(
        path,
        x=x.detach().cpu().numpy(),
        target=target.detach().reshape(len(x)).cpu().numpy(),
        prediction=prediction.detach().reshape(len(x)).cpu().numpy(),
        region_lo=np.array([lo for lo, _ in boxes], dtype=float),
        region_hi=np.array([hi for _, hi in boxes], dtype=float),
    )


def shade_regions_1d(ax, boxes: Sequence[Box]) -> None:
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    for m, (lo, hi) in enumerate(boxes):
        ax.axvspan(lo[0], hi[0], color=colors[m % len(colors)], alpha=0.12, lw=0)
        ax.text(
            (lo[0] + hi[0]) / 2, 1.0, f"c{m}", transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7
        )


def plot_fit_1d(
    x: Tensor, target: Tensor, prediction: Tensor, boxes: Sequence[Box], path: Path, title: str = ""
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    shade_regions_1d(ax, boxes)
    ax.plot(x[:, 0], target[:, 0], "k--", lw=1.2, label="target")
    ax.plot(x[:, 0], prediction[:, 0], "tab:red", lw=1.5, label="global model")
    ax.set_xlabel("x")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title or f"test MSE {((prediction - target) ** 2).mean().item():.3e}", fontsize=9, pad=14)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_error_map_2d(xy: Tensor, target: Tensor, prediction: Tensor, boxes: Sequence[Box], path: Path) -> None:
    plt = _pyplot()
    side = round(xy.shape[0] ** 0.5)
    grids = [t[:, 0].reshape(side, side).T for t in (target, prediction, (prediction - target).abs())]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, grid, name in zip(axes, grids, ("target", "global model", "|error|")):
        image = ax.imshow(grid, origin="lower", extent=(0, 1, 0, 1), cmap="viridis")
        fig.colorbar(image, ax=ax, fraction=0.046)
        for lo, hi in boxes:
            ax.add_patch(plt.Rectangle(lo, hi[0] - lo[0], hi[1] - lo[1], fill=False, lw=0.6, ec="white"))
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ finished runs
X_LABELS = {"round": "round", "elapsed_s": "accumulated round time (s)", "wall_s": "wall-clock time (s)"}
ARM_COLORS = [
    "tab:blue",
    "tab:red",
    "tab:green",
    "tab:orange",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "tab:gray",
]


def _figure(figsize: tuple[float, float]):
    """A figure on the Agg canvas, outside pyplot: no window, and a notebook's own backend is left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def is_error_metric(name: str) -> bool:
    """Errors and losses span decades (log y-scale); accuracies do not."""
    name = name.lower()
    return "loss" in name or "error" in name or name.endswith(("mse", "_l2", "max_abs"))


def median_curve(runs: Sequence[Run], metric: str, x: str) -> tuple[list[float], list[float]]:
    """Per round reached by every run: the median over seeds of x and of the metric (the arm's typical run)."""
    by_round: dict[float, list[tuple[float, float]]] = {}
    for run in runs:
        for row in finite_rows(run, "round", x, metric):
            by_round.setdefault(row["round"], []).append((row[x], row[metric]))
    common = sorted(r for r, points in by_round.items() if len(points) == len(runs))
    return (
        [statistics.median(p[0] for p in by_round[r]) for r in common],
        [statistics.median(p[1] for p in by_round[r]) for r in common],
    )


def switch_positions(runs: Sequence[Run], x: str) -> list[float]:
    """Where to mark schedule.switch_round on an x axis: the round itself, or the median x at the end of that round."""
    positions = []
    for k in sorted({k for k in map(switch_round, runs) if k is not None}):
        at_k = [
            row[x]
            for run in runs
            if switch_round(run) == k
            for row in run.metrics
            if row.get("round") == k and math.isfinite(row.get(x, math.nan))
        ]
        if x == "round":
            positions.append(float(k))
        elif at_k:
            positions.append(statistics.median(at_k))
    return positions


def plot_learning_curves(
    runs: Sequence[Run], metric: str, path: str | Path, x: str | Sequence[str] = ("round", "elapsed_s"), title: str = ""
) -> None:
    """One panel per x column: a thin line per run, coloured by arm, and the arm's median over seeds in bold.

    Log y-scale for errors and losses; schedule.switch_round (warm-up then another aggregator) as a dashed line.
    """
    xs = [x] if isinstance(x, str) else list(x)
    arms = group_arms(runs)
    switches = switch_positions(runs, "round")
    legend_rows = len(arms) + bool(switches)
    legend_in = 0.2 + 0.16 * legend_rows  # the legend goes below the panels: arm labels are long
    fig = _figure((5.2 * len(xs), 3.6 + legend_in))
    axes = fig.subplots(1, len(xs), squeeze=False)[0]
    for ax, x_name in zip(axes, xs):
        values = []
        for i, arm in enumerate(arms):
            color = ARM_COLORS[i % len(ARM_COLORS)]
            for run in arm.runs:
                xv, yv = series(run, metric, x_name)
                values += yv
                ax.plot(xv, yv, color=color, lw=0.8, alpha=0.45 if len(arm.runs) > 1 else 0.9)
            if len(arm.runs) > 1:
                ax.plot(*median_curve(arm.runs, metric, x_name), color=color, lw=1.8)
            ax.plot([], [], color=color, lw=1.8, label=f"{arm.label} ({len(arm.runs)} seed{'s' * (len(arm.runs) > 1)})")
            for position in switch_positions(arm.runs, x_name):
                ax.axvline(position, color=color if x_name != "round" else "0.4", ls="--", lw=1)
        if is_error_metric(metric) and values and min(values) > 0:
            ax.set_yscale("log")
        if x_name == "round":
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(X_LABELS.get(x_name, x_name))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3, which="both", lw=0.4)
    if switches:
        axes[0].plot([], [], color="0.4", ls="--", lw=1, label="schedule switch")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, legend_in / (3.6 + legend_in), 1, 1))
    fig.savefig(path, dpi=110)


def plot_grouped_bars(
    cells: Mapping[tuple[str, str], Sequence[float]],
    groups: Sequence[str],
    bars: Sequence[str],
    path: str | Path,
    ylabel: str,
    names: dict[str, str] | None = None,
) -> None:
    """Bars grouped along x (one group per `groups` value, one coloured bar per `bars` value): the mean over seeds,
    a whisker from the lowest to the highest seed, and under each group the number of seeds (fewest-most)."""
    names = names or {}
    fig = _figure((min(14.0, max(6.0, 0.28 * len(groups) * max(1, len(bars)) + 3)), 4.6))
    ax = fig.subplots()
    width = 0.8 / max(1, len(bars))
    for j, bar in enumerate(bars):
        label: str | None = names.get(bar, bar)
        for i, group in enumerate(groups):
            values = cells.get((group, bar), [])
            if not values:
                continue
            x = i + (j - (len(bars) - 1) / 2) * width
            ax.bar(x, statistics.fmean(values), width, color=ARM_COLORS[j % len(ARM_COLORS)], label=label)
            label = None  # one legend entry per bar kind
            ax.plot([x, x], [min(values), max(values)], color="k", lw=1)

    def seeds(group: str) -> str:
        counts = sorted(len(cells[(group, bar)]) for bar in bars if cells.get((group, bar)))
        return "0" if not counts else f"{counts[0]}" if counts[0] == counts[-1] else f"{counts[0]}-{counts[-1]}"

    ax.set_xticks(range(len(groups)), [f"{names.get(g, g)}\n(seeds: {seeds(g)})" for g in groups])
    ax.set_ylabel(ylabel)
    lowest = min((min(v) for v in cells.values() if v), default=0.0)
    highest = max((max(v) for v in cells.values() if v), default=1.0)
    ax.set_ylim(lowest - 0.1 * (highest - lowest), highest + 0.05 * (highest - lowest))
    ax.grid(alpha=0.3, axis="y", lw=0.4)
    ax.legend(fontsize=7, ncol=min(5, max(1, len(bars))), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_prediction_panels(runs: Sequence[Run], path: str | Path, metric: str | None = None) -> int:
    """The paper's fitted-function figure, one column per arm (its first seed with predictions.npz).

    1-D inputs: the target (dashed black) and the global model over the shaded client regions, and below it the
    pointwise error |prediction - target| on a log scale (the PINN error panel). 2-D and more: the prediction and
    the |error| map over (x1, x2) with the client boxes drawn; the error colour scale is shared across arms.
    Returns the number of arms drawn; nothing is written when no run has predictions.
    """
    panels: list[tuple[str, str, dict[str, Any]]] = []
    for i, arm in enumerate(group_arms(runs)):
        run, data = next(((r, d) for r in arm.runs if (d := load_predictions(r)) is not None), (None, None))
        if run is not None and data is not None:
            name = metric or headline_metric(run)
            score = f"{name} {final_value(run, name):.2e}" if name else ""
            title = textwrap.fill(arm.label, 38) + f"\nseed {seed_of(run)}  {score}"
            panels.append((title, ARM_COLORS[i % len(ARM_COLORS)], data))
    if not panels:
        return 0
    errors = [abs(d["prediction"] - d["target"]) for _, _, d in panels]
    top = max(float(e.max()) for e in errors) or 1.0
    positive = [float(e[e > 0].min()) for e in errors if (e > 0).any()]
    limits = (max(min(positive, default=top * 1e-6), top * 1e-8), top)  # shared: arms compare at a glance
    fig = _figure((3.8 * len(panels), 6.0))
    axes = fig.subplots(2, len(panels), squeeze=False)
    for column, ((title, color, data), error) in enumerate(zip(panels, errors)):
        upper, lower = axes[0, column], axes[1, column]
        boxes = list(zip(data["region_lo"], data["region_hi"]))
        if data["x"].shape[1] == 1:
            _draw_fit_1d(upper, lower, data, error, boxes, color, limits)
        else:
            _draw_map_2d(fig, upper, data["x"], data["prediction"], boxes, "global model", None)
            _draw_map_2d(fig, lower, data["x"], error, boxes, "|prediction - target|", limits)
        upper.set_title(title, fontsize=8, pad=12)  # above the c0, c1 region labels
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return len(panels)


def _draw_fit_1d(upper, lower, data, error, boxes, color, limits) -> None:
    x = data["x"][:, 0]
    for ax in (upper, lower):
        shade_regions_1d(ax, boxes)
    upper.plot(x, data["target"], "k--", lw=1.2, label="target")
    upper.plot(x, data["prediction"], color=color, lw=1.5, label="global model")
    upper.legend(fontsize=7, loc="best")
    lower.semilogy(x, error, color=color, lw=1.0)
    lower.set_ylim(limits[0], limits[1] * 2)
    lower.set_xlabel("x")
    lower.set_ylabel("|prediction - target|", fontsize=8)


def _draw_map_2d(fig, ax, x, values, boxes, name: str, log_limits) -> None:
    """values over (x1, x2): an image on a square grid with x2 varying fastest, else a triangulated contour plot."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    norm = LogNorm(vmin=log_limits[0], vmax=log_limits[1], clip=True) if log_limits else None
    side = math.isqrt(len(x))
    if side * side == len(x) and side > 1:
        extent = (x[:, 0].min(), x[:, 0].max(), x[:, 1].min(), x[:, 1].max())
        image = ax.imshow(
            values.reshape(side, side).T, origin="lower", extent=extent, cmap="viridis", norm=norm, aspect="auto"
        )
    else:
        image = ax.tricontourf(x[:, 0], x[:, 1], values, levels=20, cmap="viridis", norm=norm)
    fig.colorbar(image, ax=ax, fraction=0.046)
    for lo, hi in boxes:
        ax.add_patch(Rectangle((lo[0], lo[1]), hi[0] - lo[0], hi[1] - lo[1], fill=False, lw=0.8, ec="white"))
    ax.set_xlabel("x1", fontsize=8)
    ax.set_ylabel("x2", fontsize=8)
    ax.text(0.02, 0.98, name, transform=ax.transAxes, va="top", fontsize=7, color="white")
