"""Figures saved with runs and drawn by scripts/notebooks. Matplotlib is imported lazily (Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
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
        ax.text((lo[0] + hi[0]) / 2, 1.0, f"c{m}", transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7)


def plot_fit_1d(x: Tensor, target: Tensor, prediction: Tensor, boxes: Sequence[Box], path: Path, title: str = "") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    shade_regions_1d(ax, boxes)
    ax.plot(x[:, 0], target[:, 0], "k--", lw=1.2, label="target")
    ax.plot(x[:, 0], prediction[:, 0], "tab:red", lw=1.5, label="global model")
    ax.set_xlabel("x")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title or f"test MSE {torch.mean((prediction - target) ** 2).item():.3e}", fontsize=9, pad=14)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_error_map_2d(xy: Tensor, target: Tensor, prediction: Tensor, boxes: Sequence[Box], path: Path) -> None:
    plt = _pyplot()
    side = int(round(xy.shape[0] ** 0.5))
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
