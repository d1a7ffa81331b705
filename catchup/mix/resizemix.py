"""ResizeMix (Qin et al. 2020, arXiv:2012.11101): the whole partner image, shrunk, pasted into the sample.

Paper defaults: scale tau ~ U(0.1, 0.8) (the side of the pasted image relative to the target's), a random
location, label weight of the partner = pasted area share (tau^2 up to rounding). One scale and location per
batch, and nearest-neighbour resizing, as in OpenMixup's implementation (the public one the paper's
reproductions use).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from catchup.mix.mixer import Mixer, _check
from catchup.mix.plan import MixPlan

__all__ = ["ResizeMix", "resizemix"]

MODES = ("nearest", "bilinear", "bicubic", "area")


def resizemix(x: torch.Tensor, index: torch.Tensor, box: tuple[int, int, int, int],
              mode: str = "nearest") -> tuple[torch.Tensor, float]:
    """Paste ``x[index]`` resized to the box (y0, y1, x0, x1) into x (out of place).

    Returns the mixed batch and the label weight of each sample's own image, 1 - box area / image area.
    """
    y0, y1, x0, x1 = box
    h, w = x.shape[-2:]
    out = x.clone()
    if y1 > y0 and x1 > x0:
        align = False if mode in ("bilinear", "bicubic") else None
        out[..., y0:y1, x0:x1] = F.interpolate(x[index], size=(y1 - y0, x1 - x0), mode=mode, align_corners=align)
    return out, 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)


class ResizeMix(Mixer):
    """ResizeMix; options ``scale`` ([min, max] of tau, default [0.1, 0.8]) and ``interpolation`` (of the resize).

    ``alpha`` is unused: tau is uniform, as in the paper.
    """
    name = "resizemix"
    input_mix = None

    def __init__(self, model=None, *, scale: Sequence[float] = (0.1, 0.8), interpolation: str = "nearest",
                 **kwargs: Any):
        _check(len(scale) == 2 and 0.0 < scale[0] <= scale[1] <= 1.0,
               f"resizemix scale must be [min, max] with 0 < min <= max <= 1, got {list(scale)}")
        _check(interpolation in MODES,
               f"resizemix interpolation must be one of {', '.join(MODES)}, got {interpolation!r}")
        super().__init__(model, **kwargs)
        self.scale, self.interpolation = (float(scale[0]), float(scale[1])), interpolation

    def input_plan(self, x: torch.Tensor, index: torch.Tensor) -> MixPlan:
        h, w = x.shape[-2:]
        tau = float(self.rng.uniform(*self.scale))
        ph, pw = max(int(h * tau), 1), max(int(w * tau), 1)
        y0, x0 = int(self.rng.integers(0, h - ph + 1)), int(self.rng.integers(0, w - pw + 1))
        return MixPlan(0, tau, index, 1.0 - ph * pw / float(h * w), {"box": (y0, y0 + ph, x0, x0 + pw)})

    def mix_input(self, x: torch.Tensor, target: torch.Tensor, plan: MixPlan) -> tuple[torch.Tensor, MixPlan]:
        mixed, lam_eff = resizemix(x, plan.index, plan.extras["box"], self.interpolation)
        return mixed, replace(plan, lam_eff=lam_eff)
