"""PNG plots of the robustness results.

Figures are built with matplotlib's object API (Figure + Agg canvas) rather than pyplot, so no global
backend is switched and nothing needs a display.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from catchup.robustness.clean import expected_calibration_error
from catchup.robustness.corruptions import CORRUPTIONS_ALL


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


def plot_corruption_heatmap(errors: dict[tuple[str, int], float], path: str | os.PathLike) -> Path:
    """Top-1 error (%) per corruption (rows) and severity (columns), annotated."""
    names = [c for c in CORRUPTIONS_ALL if any(k[0] == c for k in errors)]
    names += sorted({k[0] for k in errors} - set(names))
    severities = sorted({int(k[1]) for k in errors})
    grid = np.full((len(names), len(severities)), np.nan)
    for (name, sev), err in errors.items():
        grid[names.index(name), severities.index(int(sev))] = err
    fig = _new_figure(1.2 * len(severities) + 3.5, 0.38 * len(names) + 1.6)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(severities)), [str(s) for s in severities])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("severity")
    ax.set_title(f"Corruption top-1 error (%), mean {np.nanmean(grid):.2f}")
    threshold = np.nanmean(grid)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="black" if grid[i, j] > threshold else "white")
    fig.colorbar(image, ax=ax, label="error (%)")
    return _save(fig, path)


def plot_reliance_curves(curves: dict[str, Sequence[tuple[int, float]]], path: str | os.PathLike) -> Path:
    """Accuracy against the number of dropped features, one line per run (Figure 1c)."""
    fig = _new_figure(6.0, 4.2)
    ax = fig.add_subplot()
    for label, points in curves.items():
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("features dropped per sample (by value)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy as pooled features are dropped")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_deformations(results: dict[str, dict[str, float]], path: str | os.PathLike) -> Path:
    """Grouped bars: accuracy (%) per deformation (groups), one bar per run."""
    runs = list(results)
    names = list(dict.fromkeys(n for r in runs for n in results[r]))
    width = 0.8 / max(len(runs), 1)
    fig = _new_figure(max(6.0, 0.5 * len(names) * (1 + 0.25 * len(runs)) + 2), 4.2)
    ax = fig.add_subplot()
    centers = np.arange(len(names))
    for i, run in enumerate(runs):
        values = [results[run].get(n, np.nan) for n in names]
        ax.bar(centers + (i - (len(runs) - 1) / 2) * width, values, width, label=run)
    ax.set_xticks(centers, names, rotation=30, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Accuracy under deformations")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_reliability(confidences: Tensor, correct: Tensor, path: str | os.PathLike, n_bins: int = 15) -> Path:
    """Reliability diagram: accuracy per equal-width confidence bin against the diagonal, with the ECE."""
    conf = torch.as_tensor(confidences).double().flatten().cpu()
    hit = torch.as_tensor(correct).double().flatten().cpu()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    bins = torch.bucketize(conf, edges[1:-1], right=False)
    count = torch.bincount(bins, minlength=n_bins).double()
    acc = torch.bincount(bins, weights=hit, minlength=n_bins) / count.clamp(min=1)
    ece = expected_calibration_error(conf, hit, n_bins)
    fig = _new_figure(4.8, 4.8)
    ax = fig.add_subplot()
    centers = ((edges[:-1] + edges[1:]) / 2).numpy()
    shown = (count > 0).numpy()
    ax.bar(centers[shown], acc.numpy()[shown], width=1.0 / n_bins, edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (ECE {ece:.2f}%)")
    ax.legend(loc="upper left")
    return _save(fig, path)
