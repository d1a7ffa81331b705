"""Out-of-distribution detection metrics (ImageNet-O protocol: maximum-softmax-probability detector).

The ImageNet-O evaluation scores ImageNet-O images (OOD) against ImageNet validation images of the same
200 classes (in-distribution), with the classifier's logits restricted to those 200 classes. The class
list ships with the data set (its README lists the 200 WordNet ids); pass that file to
`read_class_indices` with the ImageNet `class_to_idx`, or a file of 0-based class indices, one a line.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from catchup.errors import CatchupError

_WNID = re.compile(r"^n\d{8}$")


def max_softmax_score(logits: Tensor) -> Tensor:
    """OOD score = -max softmax probability: higher means more likely out-of-distribution."""
    return -logits.detach().float().softmax(dim=1).max(dim=1).values


def restrict_logits(logits: Tensor, class_indices: list[int] | Tensor) -> Tensor:
    """Keep only the columns of `class_indices` (e.g. ImageNet-O's 200 of the 1000 ImageNet classes)."""
    idx = torch.as_tensor(class_indices, dtype=torch.long, device=logits.device)
    if idx.numel() == 0:
        raise CatchupError("the class-index list is empty")
    if int(idx.min()) < 0 or int(idx.max()) >= logits.shape[1]:
        raise CatchupError(f"class indices must lie in [0, {logits.shape[1]}), got {int(idx.min())}..{int(idx.max())}")
    return logits[:, idx]


def read_class_indices(path: str | os.PathLike, class_to_idx: dict[str, int] | None = None) -> list[int]:
    """Class indices from a text file: lines starting with an integer index or a WordNet id (`n01443537 ...`,
    resolved through `class_to_idx`); other lines (headers, prose) are skipped."""
    file = Path(path)
    if not file.is_file():
        raise CatchupError(f"class list {file} not found")
    indices: list[int] = []
    for line_no, line in enumerate(file.read_text().splitlines(), start=1):
        token = line.split()[0] if line.split() else ""
        if token.isdigit():
            indices.append(int(token))
        elif _WNID.match(token):
            if class_to_idx is None:
                raise CatchupError(f"{file}:{line_no} names WordNet id {token}; pass the ImageNet class_to_idx")
            if token not in class_to_idx:
                raise CatchupError(f"{file}:{line_no}: WordNet id {token} is not one of the model's classes")
            indices.append(class_to_idx[token])
    if not indices:
        raise CatchupError(f"{file} lists no class index or WordNet id")
    if len(set(indices)) != len(indices):
        raise CatchupError(f"{file} lists a class twice")
    return indices


def _as_numpy(scores: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(scores, Tensor):
        scores = scores.detach().cpu().double().numpy()
    return np.asarray(scores, dtype=np.float64).ravel()


def ood_metrics(scores_in: Tensor | np.ndarray, scores_out: Tensor | np.ndarray,
                ood_positive: bool = True, recall: float = 0.95) -> dict[str, float]:
    """FPR95, AUROC and AUPR, all in percent, from OOD scores (higher = more OOD).

    ood_positive=True (the ImageNet-O convention): OOD is the positive class; FPR95 is the share of
    in-distribution samples flagged OOD at the highest threshold t that still catches >= 95 % of the OOD
    samples, a sample being flagged when score >= t (ties at t are flagged). ood_positive=False swaps the
    roles (in-distribution positive, scored by -score): AUROC is unchanged, AUPR and FPR95 are not.
    """
    # imported here: sklearn takes ~1 s to import and only the OOD evaluation needs it
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    s_in, s_out = _as_numpy(scores_in), _as_numpy(scores_out)
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("both score sets must be non-empty")
    if ood_positive:
        pos, neg = s_out, s_in
    else:
        pos, neg = -s_in, -s_out
    labels = np.concatenate([np.ones_like(pos), np.zeros_like(neg)])
    scores = np.concatenate([pos, neg])
    # roc_curve's points are exactly the thresholds "score >= t" at each distinct score, so the first
    # point reaching the target recall is the highest such threshold
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    fpr_at_recall = float(fpr[np.searchsorted(tpr, recall, side="left")])
    return {
        "fpr95": 100.0 * fpr_at_recall,
        "auroc": 100.0 * float(roc_auc_score(labels, scores)),
        "aupr": 100.0 * float(average_precision_score(labels, scores)),
    }
