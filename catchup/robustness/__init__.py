"""Robustness and evaluation metrics: clean/calibration, FGSM, deformations, corruptions, OOD, filter reliance."""
from catchup.robustness.clean import (
    ClassificationMetrics,
    classification_metrics,
    evaluate_logits,
    expected_calibration_error,
)
from catchup.robustness.corruptions import (
    CIFAR_CORRUPTIONS_15,
    CIFAR_CORRUPTIONS_EXTRA,
    CORRUPTIONS_ALL,
    CifarCorrupted,
    TinyImageNetCorrupted,
    available_corruptions,
    corruption_summary,
)
from catchup.robustness.deformations import DEFORMATIONS, DeformationSpec, deform_batch, warp_batch
from catchup.robustness.fgsm import fgsm_error, fgsm_perturb
from catchup.robustness.ood import max_softmax_score, ood_metrics, read_class_indices, restrict_logits
from catchup.robustness.reliance import feature_drop_curve, feature_mass_share, pooled_features

__all__ = [
    "ClassificationMetrics", "classification_metrics", "evaluate_logits", "expected_calibration_error",
    "CIFAR_CORRUPTIONS_15", "CIFAR_CORRUPTIONS_EXTRA", "CORRUPTIONS_ALL", "CifarCorrupted",
    "TinyImageNetCorrupted", "available_corruptions", "corruption_summary",
    "DEFORMATIONS", "DeformationSpec", "deform_batch", "warp_batch",
    "fgsm_error", "fgsm_perturb",
    "max_softmax_score", "ood_metrics", "read_class_indices", "restrict_logits",
    "plot_corruption_heatmap", "plot_deformations", "plot_reliability", "plot_reliance_curves",
    "feature_drop_curve", "feature_mass_share", "pooled_features",
]

_PLOTS = ("plot_corruption_heatmap", "plot_deformations", "plot_reliability", "plot_reliance_curves")


def __getattr__(name: str):
    # matplotlib takes ~0.5 s to import; training code that only needs the metrics should not pay it
    if name in _PLOTS:
        from catchup.robustness import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
