"""catchup: Catch-up Mix and mixup baselines for timm CNNs.

Importing the package registers its CIFAR / Tiny-ImageNet models with timm (`timm.create_model("preactresnet18")`).
"""
import catchup.models  # noqa: F401  (registers the model zoo with timm)
from catchup.errors import CatchupError
from catchup.mix import MIXERS, CatchUpMix, build_mixer, catchup_mix

__all__ = ["CatchupError", "CatchUpMix", "MIXERS", "build_mixer", "catchup_mix"]
