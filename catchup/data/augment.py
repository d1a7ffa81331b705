"""timm's ImageNet training and evaluation transforms, driven by timm train.py's augmentation options.

`Augment` carries the options under timm's names and defaults; `imagenet_train_transform` and
`imagenet_eval_transform` call `timm.data.create_transform` with them, after `resolve_data_config` has filled in
the model's crop_pct, interpolation, mean and std. Every value is checked first, so a typo in a RandAugment
string stops the run before any training with a one-line message.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from catchup.config import KEYS
from catchup.errors import CatchupError

AUTOAUGMENT_POLICIES = ("original", "originalr", "v0", "v0r", "3a")
# RandAugment sections timm parses (`rand-m9-n2-mstd0.5-mmax10-inc1-p0.5-t<choices>`); timm skips some malformed
# sections silently (`rand-mX` keeps the default magnitude), so the grammar is checked here first.
_RAND_SECTION = re.compile(r"m\d+|n\d+|mstd\d*\.?\d+|mmax\d+|inc[01]|p\d*\.?\d+|t\w+")
_AUGMIX_SECTION = re.compile(r"m\d+|w\d+|d\d+|a\d*\.?\d+|b[01]|mstd\d*\.?\d+")
_AA_SECTION = re.compile(r"mstd\d*\.?\d+")


@dataclass(frozen=True)
class Augment:
    """Augmentation options of the ImageNet-style family, with timm train.py's names and defaults."""
    model: str | None = None  # timm model whose pretrained config supplies crop_pct, interpolation, mean, std
    aa: str | None = None  # auto-augment policy: rand-m9-mstd0.5-inc1, augmix-m5-w3-d2, original, v0, ...
    reprob: float = 0.0  # random erasing probability
    remode: str = "pixel"  # random erasing fill: const, rand or pixel
    recount: int = 1  # random erasing count
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range
    hflip: float = 0.5  # horizontal flip probability
    vflip: float = 0.0  # vertical flip probability
    color_jitter: float = 0.4  # color jitter factor (off when aa is set, as in timm)
    train_interpolation: str = "random"  # resize interpolation in training (random = bilinear or bicubic)
    crop_pct: float | None = None  # eval center-crop fraction; None = the model's
    interpolation: str | None = None  # eval resize interpolation; None = the model's

    @classmethod
    def from_config(cls, cfg: Any) -> Augment:
        """The options of a recipe (any object with these attribute names, e.g. TrainConfig)."""
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)}
        for key in ("scale", "ratio"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def changed(self) -> list[str]:
        """The augmentation keys set away from timm's defaults (the model name aside)."""
        default = Augment()
        return [f.name for f in dataclasses.fields(self)
                if f.name != "model" and getattr(self, f.name) != getattr(default, f.name)]


def _fail(key: str, why: str, value: Any) -> CatchupError:
    return CatchupError(f"recipe key {key!r} {why}, got {value!r}")


def check_aa(aa: str) -> None:
    """Raise CatchupError unless timm parses `aa` the way it is written."""
    name, *sections = aa.split("-")
    grammar = {"rand": _RAND_SECTION, "augmix": _AUGMIX_SECTION}.get(name)
    if grammar is None:
        if name not in AUTOAUGMENT_POLICIES:
            raise _fail("aa", "must be rand-..., augmix-... or an AutoAugment policy "
                        f"({', '.join(AUTOAUGMENT_POLICIES)})", aa)
        grammar = _AA_SECTION
    bad = [s for s in sections if not grammar.fullmatch(s)]
    if bad:
        raise _fail("aa", f"has a section timm does not read ({bad[0]!r}); e.g. rand-m9-mstd0.5-inc1", aa)


def check_augment(aug: Augment) -> None:
    """The recipe's own rules for these keys (TrainConfig's fields, which load_config already applied to a
    recipe), for an Augment built in code; and the auto-augment grammar."""
    if aug.aa is not None:
        check_aa(aug.aa)
    for f in dataclasses.fields(aug):
        value = getattr(aug, f.name)
        if f.name not in KEYS or value is None:
            continue
        value = list(value) if isinstance(value, tuple) else value
        choices, rule = KEYS[f.name].metadata["choices"], KEYS[f.name].metadata["rule"]
        if choices and value not in choices:
            raise _fail(f.name, f"must be one of {', '.join(choices)}", value)
        if rule is not None and not rule.test(value):
            raise _fail(f.name, f"must be {rule.text}", value)


def resolve_model_data(aug: Augment, input_size: int | None) -> dict[str, Any]:
    """timm's `resolve_data_config` for the model named in `aug`: input size, crop_pct, interpolation, mean, std.

    Without a pretrained config (a project model, or none named) timm's ImageNet defaults apply.
    """
    import timm
    from timm.data import resolve_data_config

    pretrained = timm.models.get_pretrained_cfg(aug.model) if aug.model else None
    args = {"input_size": (3, input_size, input_size) if input_size else None, "crop_pct": aug.crop_pct,
            "interpolation": aug.interpolation}
    return resolve_data_config(args, pretrained_cfg=pretrained.to_dict() if pretrained else {"crop_pct": 0.875})


def train_transform_args(aug: Augment, size: int, mean, std) -> dict[str, Any]:
    """Keyword arguments of `timm.data.create_transform` for training, as timm's train.py passes them."""
    return dict(input_size=size, is_training=True, scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip,
                vflip=aug.vflip, color_jitter=aug.color_jitter, auto_augment=aug.aa,
                interpolation=aug.train_interpolation, mean=tuple(mean), std=tuple(std), re_prob=aug.reprob,
                re_mode=aug.remode, re_count=aug.recount)


def imagenet_train_transform(aug: Augment, size: int, mean, std) -> Callable:
    from timm.data import create_transform
    check_augment(aug)
    try:
        return create_transform(**train_transform_args(aug, size, mean, std))
    except (AssertionError, ValueError, KeyError, TypeError) as err:  # timm asserts on what it cannot parse
        raise _fail("aa", f"is not accepted by timm ({type(err).__name__}: {err})", aug.aa) from None


def imagenet_eval_transform(size: int, mean, std, interpolation: str, crop_pct: float) -> Callable:
    """Resize the short side to floor(size / crop_pct), center crop `size`, normalize (timm's eval transform)."""
    from timm.data import create_transform
    return create_transform(input_size=size, is_training=False, interpolation=interpolation, mean=tuple(mean),
                            std=tuple(std), crop_pct=crop_pct)
