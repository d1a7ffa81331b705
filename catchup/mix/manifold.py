"""Manifold Mixup (Verma et al. 2019): interpolate the hidden state at a random layer."""
from __future__ import annotations

import torch
from torch import nn

from catchup.mix.mixer import Mixer
from catchup.mix.ops import mixup
from catchup.mix.plan import MixPlan
from catchup.stages import feature_stages


def manifold_mix(h: torch.Tensor, index: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """``lam * h + (1 - lam) * h[index]``, out of place, in h's dtype and memory format."""
    return mixup(h, index, lam)


class ManifoldMixup(Mixer):
    """Layer k uniform over {input, stage 1, stage 2} (the original PreActResNet setting: the input, after the
    first and after the second residual stage), lambda ~ Beta(2, 2); the input layer uses plain Mixup."""
    name = "manifold"
    default_alpha = 2.0
    input_mix = "mixup"
    feature_level = True

    def default_layers(self, model: nn.Module) -> list[int]:
        return [k for k in (0, 2, 3) if k < len(feature_stages(model))]   # input, stage 1, stage 2

    def mix_features(self, h: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        lam = plan.extras["lam"].to(dtype=h.dtype)
        return manifold_mix(h, plan.index.to(h.device, non_blocking=True), lam)
