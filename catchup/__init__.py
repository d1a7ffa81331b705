"""catchup: Catch-up Mix and mixup baselines for timm CNNs.

Importing the package registers its CIFAR / Tiny-ImageNet models with timm (`timm.create_model("preactresnet18")`).
"""
import catchup.models  # noqa: F401  (registers the model zoo with timm)
from catchup.errors import CatchupError

__all__ = ["CatchupError", "CatchUpMix", "MIXERS", "build_mixer", "catchup_mix"]


def __getattr__(name: str):
    # The mixers (and torch) load on first use, so the scripts check their arguments before paying for them.
    if name in __all__:
        from catchup import mix
        return getattr(mix, name)
    raise AttributeError(f"module 'catchup' has no attribute {name!r}")
