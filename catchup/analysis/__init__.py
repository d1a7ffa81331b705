"""Analysis tools: filter-norm dynamics (Figure 1a/b), Hessian eigenpairs and loss landscapes (Figure 3)."""
import importlib

_HOMES = {"activation_figure": "activations", "saliency": "activations", "FilterNormTracker": "filters",
          "load_filter_norms": "filters", "plot_norm_vs_grad": "filters", "HessianOperator": "hessian",
          "top_eigen": "hessian", "filter_normalized_direction": "landscape", "landscape": "landscape",
          "loss_grid": "landscape"}

__all__ = [
    "FilterNormTracker", "HessianOperator", "activation_figure", "filter_normalized_direction", "landscape",
    "load_filter_norms", "loss_grid", "plot_norm_vs_grad", "saliency", "top_eigen",
]


def __getattr__(name: str):
    # loaded on first use, so `python -m catchup.analysis` checks its arguments before torch loads
    if name in _HOMES:
        return getattr(importlib.import_module(f"catchup.analysis.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'catchup.analysis' has no attribute {name!r}")
