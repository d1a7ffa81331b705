"""Loss landscapes around trained weights (the paper's Figure 3).

The loss is evaluated on ``theta + a * d1`` (a 1-D curve) and ``theta + a * d1 + b * d2`` (a 2-D grid), where
the directions are either the top-2 Hessian eigenvectors (PyHessian, which the paper follows; unit norm
over all weights) or filter-normalised Gaussian directions (Li et al. 2018: each filter's slice of the
direction is rescaled to the norm of that filter's weights, biases and norm parameters get no direction).
The model is in eval mode throughout and its weights are restored bit-exactly afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from matplotlib import cm
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn
from tqdm.auto import tqdm

from catchup.analysis.hessian import Batch, LossFn, Vector, as_batches, eval_mode, mean_loss, top_eigen, \
    trainable_params
from catchup.errors import CatchupError

DIRECTIONS = ("hessian", "random")


def filter_normalized_direction(model: nn.Module, seed: int = 0) -> Vector:
    """A Gaussian direction whose every filter (slice along dim 0) has the norm of that filter's weights.

    Parameters with one dimension (biases, BatchNorm scales and shifts) get a zero direction, Li et al.'s
    ``ignore='biasbn'`` setting: moving them says little about the filters' landscape.
    """
    gen = torch.Generator().manual_seed(seed)
    direction: Vector = []
    for p in trainable_params(model):
        d = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype)
        if p.dim() <= 1:
            direction.append(torch.zeros_like(p))
            continue
        w_norm = p.detach().flatten(1).norm(dim=1)
        d_norm = d.flatten(1).norm(dim=1)
        scale = w_norm / d_norm.clamp_min(1e-10)
        direction.append(d * scale.view(-1, *([1] * (p.dim() - 1))))
    return direction


@contextmanager
def perturbable(model: nn.Module) -> Iterator[tuple[list[nn.Parameter], Vector]]:
    """Yields the trainable parameters and copies of their values; on exit copies those back (bit-exact)."""
    params = trainable_params(model)
    origin = [p.detach().clone() for p in params]
    try:
        yield params, origin
    finally:
        with torch.no_grad():
            for p, o in zip(params, origin):
                p.copy_(o)


def loss_grid(model: nn.Module, loss_fn: LossFn, batches: Batch | Sequence[Batch], directions: Sequence[Vector],
              alphas: np.ndarray, progress: bool = True, desc: str = "landscape") -> np.ndarray:
    """Mean loss at ``theta + sum_i a_i d_i`` for every combination of ``alphas`` (one axis per direction)."""
    if not 1 <= len(directions) <= 2:
        raise CatchupError(f"a loss grid takes one or two directions, got {len(directions)}")
    batches = as_batches(batches)
    shape = (len(alphas),) * len(directions)
    out = np.zeros(shape, dtype=np.float64)
    with eval_mode(model), perturbable(model) as (params, origin):
        for idx in tqdm(list(np.ndindex(*shape)), desc=desc, disable=not progress, leave=False,
                        dynamic_ncols=True):
            with torch.no_grad():
                for j, p in enumerate(params):
                    value = origin[j].clone()
                    for axis, i in enumerate(idx):
                        value.add_(directions[axis][j], alpha=float(alphas[i]))
                    p.copy_(value)
            out[idx] = mean_loss(model, loss_fn, batches)
    return out


def landscape(model: nn.Module, loss_fn: LossFn, batches: Batch | Sequence[Batch], steps: int = 21,
              span: float = 1.0, directions: str = "hessian", iters: int = 50, tol: float = 1e-3, seed: int = 0,
              grid_2d: bool = True, progress: bool = True) -> dict[str, np.ndarray]:
    """The 1-D curve along d1 and the 2-D grid over (d1, d2), with a in ``linspace(-span, span, steps)``.

    Returns ``alphas`` [S], ``loss_1d`` [S], ``loss_2d`` [S, S] (rows: a along d1, columns: b along d2;
    empty when ``grid_2d`` is False), ``eigenvalues`` [2] (NaN for random directions) and ``loss`` (at theta).
    """
    if directions not in DIRECTIONS:
        raise CatchupError(f"directions must be one of {', '.join(DIRECTIONS)}, got {directions!r}")
    if steps < 2:
        raise CatchupError(f"steps must be >= 2, got {steps}")
    if not span > 0:
        raise CatchupError(f"the range must be > 0, got {span}")
    batches = as_batches(batches)
    if directions == "hessian":
        eigenvalues, vectors = top_eigen(model, loss_fn, batches, k=2, iters=iters, tol=tol, seed=seed)
    else:
        eigenvalues = [float("nan")] * 2
        vectors = [filter_normalized_direction(model, seed), filter_normalized_direction(model, seed + 1)]
    alphas = np.linspace(-span, span, steps)
    with eval_mode(model):
        center = mean_loss(model, loss_fn, batches)
    loss_1d = loss_grid(model, loss_fn, batches, vectors[:1], alphas, progress, desc="landscape 1-D")
    loss_2d = loss_grid(model, loss_fn, batches, vectors, alphas, progress, desc="landscape 2-D") if grid_2d \
        else np.zeros((0, 0))
    return {"alphas": alphas, "loss_1d": loss_1d, "loss_2d": loss_2d, "eigenvalues": np.array(eigenvalues),
            "loss": np.array(center)}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_landscapes(results: Mapping[str, Mapping[str, np.ndarray]], directions: str = "hessian") -> Figure:
    """Left: every run's 1-D curve on one axis; then one filled contour of the 2-D grid per run."""
    has_2d = [label for label, r in results.items() if r["loss_2d"].size]
    fig = _figure(3.6 * (1 + len(has_2d)), 3.4)
    axes = fig.subplots(1, 1 + len(has_2d), squeeze=False)[0]
    axis_name = "top Hessian eigenvector" if directions == "hessian" else "random filter-normalised direction"
    ax = axes[0]
    for label, r in results.items():
        ax.plot(r["alphas"], r["loss_1d"], label=_label(label, r), linewidth=1.6)
    ax.set_xlabel(f"step along the {axis_name}", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.set_title("1-D loss landscape", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    top = max(float(np.max(results[label]["loss_2d"])) for label in has_2d) if has_2d else 0.0
    levels = MaxNLocator(20).tick_values(0.0, top) if top > 0 else None
    for ax, label in zip(axes[1:], has_2d):
        r = results[label]
        grid_a, grid_b = np.meshgrid(r["alphas"], r["alphas"], indexing="ij")
        filled = ax.contourf(grid_b, grid_a, r["loss_2d"], levels=levels, cmap="viridis")
        ax.contour(grid_b, grid_a, r["loss_2d"], levels=levels, colors="white", linewidths=0.4)
        ax.plot([0], [0], marker="+", color="red", markersize=10)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("direction 2", fontsize=8)
        ax.set_ylabel("direction 1", fontsize=8)
        ax.tick_params(labelsize=7)
    if has_2d:
        fig.colorbar(filled, ax=list(axes[1:]), label="loss", shrink=0.9)
    return fig


def plot_surfaces(results: Mapping[str, Mapping[str, np.ndarray]]) -> Figure:
    """One 3-D surface per run, side by side, on a shared vertical scale (the paper's Figure 3 layout)."""
    labels = [label for label, r in results.items() if r["loss_2d"].size]
    if not labels:
        raise CatchupError("no 2-D landscape to draw")
    fig = _figure(3.4 * len(labels), 3.4)
    top = max(float(np.max(results[label]["loss_2d"])) for label in labels)
    for i, label in enumerate(labels):
        r = results[label]
        ax = fig.add_subplot(1, len(labels), i + 1, projection="3d")
        grid_a, grid_b = np.meshgrid(r["alphas"], r["alphas"], indexing="ij")
        ax.plot_surface(grid_b, grid_a, r["loss_2d"], cmap=cm.viridis, vmin=0.0, vmax=top, linewidth=0)
        ax.set_zlim(0.0, top)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=6)
    return fig


def _label(label: str, r: Mapping[str, np.ndarray]) -> str:
    eig = r["eigenvalues"]
    return f"{label} (λ1={eig[0]:.3g})" if np.isfinite(eig).all() else label
