"""Filter reliance (the paper's Figure 1c): accuracy as each sample's pooled features are dropped by value.

Features are the pooled pre-classifier ("pre-logits") activations of a timm model, post-ReLU and so
non-negative for the CNNs studied; `head` is the classifier that maps them to logits.
A model that relies on few filters loses its accuracy after dropping only its few largest features.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

Gather = Callable[[Tensor], Tensor]


def pooled_features(model: nn.Module, loader: Iterable, device: torch.device | str,
                    gather: Gather | None = None) -> tuple[Tensor, Tensor]:
    """Pre-logits features [N, D] and targets [N] on CPU via timm's forward_features/forward_head.

    `model.get_classifier()` is the matching head. `gather` as in `evaluate_logits`.
    """
    was_training = model.training
    model.eval()
    feats: list[Tensor] = []
    targets: list[Tensor] = []
    try:
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                f = model.forward_head(model.forward_features(x), pre_logits=True)
                if gather is not None:
                    f, y = gather(f), gather(y)
                feats.append(f.float().cpu())
                targets.append(y.long().cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("the loader yielded no batches")
    return torch.cat(feats), torch.cat(targets)


def feature_drop_curve(features: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor,
                       steps: Sequence[int], order: str = "largest",
                       batch_size: int = 4096) -> list[tuple[int, float]]:
    """[(n_dropped, top-1 accuracy in percent)] after zeroing, per sample, its n largest (or smallest) features.

    Ties in value are dropped in feature-index order (stable sort), so the curve is deterministic.
    """
    if features.ndim != 2 or targets.shape != (features.shape[0],):
        raise ValueError(f"expected features [N, D] and targets [N], "
                         f"got {tuple(features.shape)} and {tuple(targets.shape)}")
    if order not in ("largest", "smallest"):
        raise ValueError(f"order must be 'largest' or 'smallest', got {order!r}")
    n, d = features.shape
    bad = [s for s in steps if not 0 <= s <= d]
    if bad:
        raise ValueError(f"steps must lie in [0, {d}], got {bad}")
    ranking = torch.sort(features, dim=1, descending=(order == "largest"), stable=True).indices
    param = next(iter(head.parameters()), None) if isinstance(head, nn.Module) else None
    correct = {s: 0 for s in steps}
    with torch.no_grad():
        for start in range(0, n, batch_size):
            f, r = features[start:start + batch_size], ranking[start:start + batch_size]
            y = targets[start:start + batch_size]
            for s in steps:
                masked = f.scatter(1, r[:, :s], 0.0)
                if param is not None:
                    masked = masked.to(device=param.device, dtype=param.dtype)
                pred = head(masked).argmax(dim=1).cpu()
                correct[s] += int((pred == y.cpu()).sum())
    return [(s, 100.0 * correct[s] / n) for s in steps]


def feature_mass_share(features: Tensor, q: Sequence[float] = (0.5, 0.9)) -> dict[float, float]:
    """Mean over samples of the fraction of features needed to hold a share q of the sample's feature mass.

    Mass is |feature| (= the value for post-ReLU features), features taken largest first. Smaller means the
    representation leans on fewer filters. Samples whose features are all zero carry no mass and are skipped.
    """
    if features.ndim != 2:
        raise ValueError(f"expected features [N, D], got {tuple(features.shape)}")
    if any(not 0.0 < share <= 1.0 for share in q):
        raise ValueError(f"mass shares must lie in (0, 1], got {list(q)}")
    mass = features.detach().abs().double().cpu()
    total = mass.sum(dim=1)
    keep = total > 0
    if not bool(keep.any()):
        raise ValueError("every sample has all-zero features")
    mass, total = mass[keep], total[keep]
    cumulative = mass.sort(dim=1, descending=True).values.cumsum(dim=1)
    d = features.shape[1]
    out: dict[float, float] = {}
    for share in q:
        # relative slack so that e.g. 4+3+2 holds 90 % of 10 despite rounding in the cumulative sum
        reached = cumulative >= (share * total)[:, None] * (1 - 1e-12)
        needed = reached.double().argmax(dim=1) + 1  # first index reaching the share
        out[float(share)] = float((needed.double() / d).mean())
    return out
