"""catchup: Catch-up Mix and mixup baselines for timm CNNs."""
from catchup.errors import CatchupError
from catchup.mix import MIXERS, CatchUpMix, build_mixer, catchup_mix

__all__ = ["CatchupError", "CatchUpMix", "MIXERS", "build_mixer", "catchup_mix"]
