"""Input-level baselines: Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), in timm's conventions."""
from __future__ import annotations

from catchup.mix.mixer import Mixer, cutmix, mixup, rand_box

__all__ = ["InputMixup", "CutMix", "cutmix", "mixup", "rand_box"]


class InputMixup(Mixer):
    """``lam * x + (1 - lam) * x[index]`` with lambda ~ Beta(alpha, alpha); labels mixed with lambda."""
    name = "mixup"
    default_alpha = 1.0
    default_layers = (0,)
    input_mix = "mixup"


class CutMix(Mixer):
    """A partner's box pasted in, lambda ~ Beta(cutmix_alpha, cutmix_alpha), label weight = kept area."""
    name = "cutmix"
    default_layers = (0,)
    input_mix = "cutmix"
