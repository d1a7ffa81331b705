"""Clean-test metrics: top-1/top-5 accuracy, NLL and expected calibration error (ECE)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Gather = Callable[[Tensor], Tensor]
TransformBatch = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ClassificationMetrics:
    """top1/top5 and ece in percent, nll the mean negative log-likelihood, n the sample count."""

    top1: float
    top5: float
    nll: float
    ece: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def expected_calibration_error(confidences: Tensor, correct: Tensor, n_bins: int = 15) -> float:
    """ECE in percent over `n_bins` equal-width confidence bins (lo, hi] covering (0, 1].

    Each bin contributes |accuracy - mean confidence| weighted by its share of the samples.
    Written by hand because torch/sklearn have no ECE (sklearn's calibration_curve drops bin counts).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = confidences.detach().double().flatten().cpu()
    hit = correct.detach().double().flatten().cpu()
    if conf.numel() != hit.numel():
        raise ValueError(f"{conf.numel()} confidences but {hit.numel()} correctness flags")
    if conf.numel() == 0:
        return 0.0
    inner_edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)[1:-1]
    # right=False: a confidence equal to an edge belongs to the bin that edge closes, i.e. bins are (lo, hi]
    bins = torch.bucketize(conf, inner_edges, right=False)
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    hit_sum = torch.bincount(bins, weights=hit, minlength=n_bins)
    gap = (hit_sum - conf_sum).abs()  # = count * |acc_b - conf_b|
    return float(gap.sum() / conf.numel() * 100.0)


def classification_metrics(logits: Tensor, targets: Tensor, n_bins: int = 15) -> ClassificationMetrics:
    """Top-1/top-5 (percent), mean NLL and ECE (percent) of `logits` [N, K] against integer `targets` [N]."""
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"expected logits [N, K] and targets [N], "
                         f"got {tuple(logits.shape)} and {tuple(targets.shape)}")
    n = logits.shape[0]
    if n == 0:
        raise ValueError("no samples to evaluate")
    logits = logits.detach().float()
    targets = targets.detach().long().to(logits.device)
    k = min(5, logits.shape[1])  # fewer than 5 classes: top-5 degenerates to top-K (= 100 %)
    topk = logits.topk(k, dim=1).indices
    hits = topk == targets[:, None]
    probs = logits.softmax(dim=1)
    confidence, prediction = probs.max(dim=1)
    return ClassificationMetrics(
        top1=float(hits[:, 0].double().mean() * 100.0),
        top5=float(hits.any(dim=1).double().mean() * 100.0),
        nll=float(F.cross_entropy(logits, targets)),
        ece=expected_calibration_error(confidence, prediction == targets, n_bins),
        n=n,
    )


def evaluate_logits(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    transform_batch: TransformBatch | None = None,
    gather: Gather | None = None,
) -> tuple[Tensor, Tensor]:
    """Run `model` in eval mode over `loader` ((x, y) batches); return all logits and targets on CPU.

    `transform_batch(x, y) -> x` alters each (device) batch first (deformations reuse this loop).
    `gather` is applied to each batch's logits and targets before they leave the device; pass
    `accelerator.gather_for_metrics` in multi-process runs so duplicated padding samples are dropped.
    The model's previous train/eval flag is restored afterwards.
    """
    was_training = model.training
    model.eval()
    all_logits: list[Tensor] = []
    all_targets: list[Tensor] = []
    try:
        with torch.no_grad():
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if transform_batch is not None:
                    x = transform_batch(x, y)
                logits = model(x)
                if gather is not None:
                    logits, y = gather(logits), gather(y)
                all_logits.append(logits.float().cpu())
                all_targets.append(y.long().cpu())
    finally:
        model.train(was_training)
    if not all_logits:
        raise ValueError("the loader yielded no batches")
    return torch.cat(all_logits), torch.cat(all_targets)
