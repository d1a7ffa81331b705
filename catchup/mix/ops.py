"""The input mixes as pure tensor functions (timm's ``rand_bbox``/``mixup`` spirit), shared by the methods."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


def rand_box(rng: np.random.Generator, height: int, width: int, lam: float,
             minmax: Sequence[float] | None = None) -> tuple[int, int, int, int]:
    """CutMix box (y0, y1, x0, x1) covering about 1 - lam of the image, timm's rand_bbox/rand_bbox_minmax rules.

    Written out because timm's versions draw from numpy's global RNG, which the data pipeline also consumes;
    a private generator is what makes a resumed run sample the same boxes.
    """
    if minmax is not None:
        cut_h = int(rng.integers(int(height * minmax[0]), int(height * minmax[1])))
        cut_w = int(rng.integers(int(width * minmax[0]), int(width * minmax[1])))
        y0, x0 = int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, width - cut_w + 1))
        return y0, y0 + cut_h, x0, x0 + cut_w
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    return y0, y1, x0, x1


def cutmix(x: torch.Tensor, index: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Paste each partner's box into the sample (out of place)."""
    y0, y1, x0, x1 = box
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[index][..., y0:y1, x0:x1]
    return out


def mixup(x: torch.Tensor, index: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Convex combination ``lam * x + (1 - lam) * x[index]`` (out of place)."""
    return x * lam + x[index] * (1.0 - lam)
