"""MoEx, Moment Exchange (Li et al. 2021): a sample takes its partner's PONO moments at one layer."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from catchup.mix.mixer import Mixer, _check
from catchup.mix.plan import MixPlan
from catchup.stages import Stage


def moex(h: torch.Tensor, index: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Positional normalization (mean/std over channels at each position) with the partner's moments.

    ``(h - mu) / sigma * sigma[index] + mu[index]``, computed in float32 (as the reference code does) and
    returned in h's dtype; sigma uses the unbiased variance plus eps, like the reference implementation.
    """
    x = h.float()
    mean = x.mean(dim=1, keepdim=True)
    std = (x.var(dim=1, keepdim=True) + eps).sqrt()
    scale = std[index] / std
    return (x * scale + (mean[index] - mean * scale)).to(h.dtype)


class MoEx(Mixer):
    """Exchange moments after the stem with probability ``prob``; labels ``lam * y + (1 - lam) * y[index]``
    with a fixed ``lam``. Defaults are the authors' CIFAR setting (prob 0.25, lam 0.5; ImageNet used lam 0.9):
    the image keeps its content and gives only its moments away, so exchanging in every batch while the label
    gives the partner half the weight teaches the model to ignore its own evidence."""
    name = "moex"
    default_prob = 0.25
    input_mix = None           # layer 0 (when asked for) exchanges the moments of the input
    feature_level = True

    def default_layers(self, model: nn.Module) -> list[int]:
        return [1]              # the stem's output

    def __init__(self, model=None, *, lam: float = 0.5, eps: float = 1e-5, **kwargs: Any):
        _check(0.0 <= lam <= 1.0, f"moex lam must be in [0, 1], got {lam}")
        super().__init__(model, **kwargs)
        self.lam, self.eps = float(lam), float(eps)

    # the exchange weight is fixed, not drawn from Beta(alpha, alpha)
    def input_plan(self, x: torch.Tensor, index: torch.Tensor) -> MixPlan:
        return MixPlan(0, self.lam, index, self.lam)

    def feature_plan(self, stage: Stage, index: torch.Tensor) -> MixPlan:
        return MixPlan(stage.layer, self.lam, index, self.lam)

    def mix_input(self, x: torch.Tensor, target: torch.Tensor, plan: MixPlan) -> tuple[torch.Tensor, MixPlan]:
        return moex(x, plan.index, self.eps), plan

    def mix_features(self, h: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        return moex(h, plan.index.to(h.device, non_blocking=True), self.eps)
