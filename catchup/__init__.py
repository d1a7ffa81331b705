"""catchup: Catch-up Mix and mixup baselines for timm CNNs.

`import catchup` loads nothing heavy and changes nothing outside the package: the scripts import it to check
their arguments, and `train.py --lrr 3` must answer before torch would have loaded. The mixers load on first use
(`from catchup import build_mixer`). The project's CIFAR / Tiny-ImageNet models are registered with timm by
importing their package, the way timm's own models are:

    import catchup.models, timm
    model = timm.create_model("preactresnet18", num_classes=100)
"""
from catchup.errors import CatchupError

__all__ = ["CatchupError", "CatchUpMix", "MIXERS", "build_mixer", "catchup_mix"]


def __getattr__(name: str):
    # The mixers (and torch) load on first use, so the scripts check their arguments before paying for them.
    if name in __all__:
        from catchup import mix
        return getattr(mix, name)
    raise AttributeError(f"module 'catchup' has no attribute {name!r}")
