"""Analysis tools: filter-norm dynamics (Figure 1a/b), Hessian eigenpairs and loss landscapes (Figure 3)."""
from catchup.analysis.activations import activation_figure, saliency
from catchup.analysis.filters import FilterNormTracker, load_filter_norms, plot_norm_vs_grad
from catchup.analysis.hessian import HessianOperator, top_eigen
from catchup.analysis.landscape import filter_normalized_direction, landscape, loss_grid

__all__ = [
    "FilterNormTracker", "HessianOperator", "activation_figure", "filter_normalized_direction", "landscape",
    "load_filter_norms", "loss_grid", "plot_norm_vs_grad", "saliency", "top_eigen",
]
