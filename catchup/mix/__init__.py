"""Mixing methods, one file each, behind one interface: ``build_mixer(name, model, num_classes, **options)``."""
from __future__ import annotations

import difflib
import inspect
from typing import Any

from torch import nn

from catchup.errors import CatchupError
from catchup.mix.alignmix import AlignMix
from catchup.mix.batch import MixCollate, PlannedBatch
from catchup.mix.catchup import CatchUpMix, catchup_mix, filter_influence
from catchup.mix.comixup import CoMixup
from catchup.mix.input import CutMix, InputMixup
from catchup.mix.manifold import ManifoldMixup, manifold_mix
from catchup.mix.mixer import Mixer, NoMix
from catchup.mix.moex import MoEx, moex
from catchup.mix.plan import MixPlan, StageHooks, soft_target
from catchup.mix.puzzlemix import PuzzleMix
from catchup.mix.recursivemix import RecursiveMix
from catchup.mix.resizemix import ResizeMix
from catchup.mix.saliencymix import SaliencyMix
from catchup.mix.snapmix import SnapMix

MIXERS: dict[str, type[Mixer]] = {cls.name: cls for cls in (
    NoMix, InputMixup, CutMix, ManifoldMixup, MoEx, CatchUpMix,
    SaliencyMix, ResizeMix, SnapMix, AlignMix, RecursiveMix, PuzzleMix, CoMixup)}


def register_mixer(cls: type[Mixer]) -> type[Mixer]:
    """Make a Mixer subclass known by its ``name`` to ``build_mixer`` and to the recipe key ``mix`` (use it as a
    class decorator). A method is one small class: see ``Mixer`` for the steps it may define."""
    if not (isinstance(cls, type) and issubclass(cls, Mixer)):
        raise CatchupError(f"register_mixer takes a Mixer subclass, got {cls!r}")
    if MIXERS.get(cls.name, cls) is not cls:
        raise CatchupError(f"a mixing method named {cls.name!r} is already registered ({MIXERS[cls.name].__name__})")
    MIXERS[cls.name] = cls
    return cls


def mixer_options(name: str) -> set[str]:
    """The keyword options method ``name`` accepts (its own and the base Mixer's)."""
    cls = _method(name)
    return {p for c in cls.__mro__ if "__init__" in vars(c) for p in inspect.signature(c.__init__).parameters}


def build_mixer(name: str, model: nn.Module | None = None, **options: Any) -> Mixer:
    """The mixer called ``name`` (see ``MIXERS``) for ``model``; options are the Mixer arguments, timm's
    ``mixup_args`` included, so ``build_mixer(name, model, **mixup_args)`` replaces ``timm.data.Mixup(**mixup_args)``
    (and its ``.collate`` replaces ``FastCollateMixup``). ``num_classes`` defaults to the model's."""
    cls = _method(name)
    unknown = sorted(set(options) - mixer_options(name))
    if unknown:
        raise CatchupError(f"mixing method {name!r} takes no option {', '.join(map(repr, unknown))}")
    return cls(model, **options)


__all__ = ["MIXERS", "build_mixer", "register_mixer", "mixer_options", "Mixer", "MixPlan", "StageHooks", "soft_target", "MixCollate",
           "PlannedBatch", "NoMix", "InputMixup", "CutMix",
           "ManifoldMixup", "MoEx", "CatchUpMix", "catchup_mix", "filter_influence", "manifold_mix", "moex",
           "SaliencyMix", "ResizeMix", "SnapMix", "AlignMix", "RecursiveMix", "PuzzleMix", "CoMixup"]


def _method(name: str) -> type[Mixer]:
    if name not in MIXERS:
        near = difflib.get_close_matches(name, MIXERS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise CatchupError(f"unknown mixing method {name!r}{hint} (known: {', '.join(MIXERS)})")
    return MIXERS[name]
