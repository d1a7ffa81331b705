"""Per-class subsets and label access without decoding images."""
from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
from torch.utils.data import Dataset, Subset

from catchup.errors import CatchupError


def check_fraction(fraction: float) -> None:
    ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1
    if not ok:
        raise CatchupError(f"train_fraction must be a number in (0, 1], got {fraction!r}")


def per_class_subset(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Sorted indices keeping round-half-up(fraction * n_c) (at least 1) random samples of every class c."""
    check_fraction(fraction)
    labels = np.asarray(labels, dtype=np.int64)
    # Decimal of the shortest repr: 0.15 * 10 is 1.4999999999999998 in binary but must round up to 2
    share = Decimal(repr(float(fraction)))
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    _, counts = np.unique(labels, return_counts=True)
    keep, start = [], 0
    for n in counts.tolist():
        k = max(1, int((share * n).to_integral_value(rounding=ROUND_HALF_UP)))
        keep.append(rng.choice(order[start:start + n], size=k, replace=False))
        start += n
    return np.sort(np.concatenate(keep)).tolist() if keep else []


def dataset_labels(ds: Dataset) -> list[int]:
    """Labels of a dataset built here (or a Subset of one), read from metadata without decoding images."""
    if isinstance(ds, Subset):
        base = dataset_labels(ds.dataset)
        return [base[i] for i in ds.indices]
    targets = getattr(ds, "targets", None)
    if targets is None and getattr(ds, "samples", None) is not None:
        targets = [label for _, label in ds.samples]
    if targets is None:
        raise CatchupError(f"cannot read the labels of a {type(ds).__name__} without decoding it")
    return np.asarray(targets, dtype=np.int64).tolist()

