"""What a recipe key is, said once: `key(default, help, rule, group=..., choices=..., resumable=...)` makes the
TrainConfig field, and its metadata is what `--help`, the README tables, `validate` and `--resume` read.

    lr: float = key(0.1, "peak learning rate", above(0), group="optimisation")

A rule is a test with the words that explain it (`above(0)` reads "> 0"); a key whose type allows null accepts
None without a rule saying so. Checks between keys (milestones below `epochs`, ...) stay in `config.validate`.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import reprlib
from dataclasses import dataclass
from typing import Any, Callable

SCHEDULERS = ("multistep", "step", "cosine", "none")  # timm create_scheduler_v2 names, plus "none"
LABEL_LAM = ("exact", "sampled")
WANDB_MODES = ("auto", "online", "offline", "disabled")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")  # timm's names
ERASE_MODES = ("const", "rand", "pixel")
SEED_MAX = 2**31 - 1   # numpy seeds stop at 2**32 - 1, and Accelerate adds the process index to the seed
MAX_DEPTH = 8          # brackets inside a value: model_kwargs/mix_kwargs need two or three
MAX_ITEMS = 10_000

# The arguments `recipe.make_mixer` and `runs.build_model` pass themselves, with the recipe key (or the data)
# they come from: the same name in `mix_kwargs` / `model_kwargs` would collide with, or silently replace, it.
MIXER_ARGUMENTS = {
    "alpha": "mix_alpha", "prob": "mix_prob", "cutmix_alpha": "cutmix_alpha", "cutmix_minmax": "cutmix_minmax",
    "label_smoothing": "smoothing", "layers": "mix_layers", "layer_weights": "mix_layer_weights",
    "label_lam": "label_lam", "seed": "seed", "num_classes": "num_classes", "input_size": "the dataset",
    "mean": "the dataset", "std": "the dataset",
}
MODEL_ARGUMENTS = {"pretrained": "pretrained", "num_classes": "num_classes", "in_chans": "the dataset",
                   "drop_rate": "drop_rate", "drop_path_rate": "drop_path"}


@dataclass(frozen=True)
class Rule:
    text: str                       # completes "recipe key 'lr' must be ..."
    test: Callable[[Any], bool]


def above(low: float) -> Rule:
    return Rule(f"> {low}", lambda v: v > low)


def at_least(low: float) -> Rule:
    return Rule(f">= {low}", lambda v: v >= low)


def within(low: float, high: float, brackets: str = "[]") -> Rule:
    """`within(0, 1, "[)")` is 0 <= v < 1."""
    def test(v: Any) -> bool:
        return (low <= v if brackets[0] == "[" else low < v) and (v <= high if brackets[1] == "]" else v < high)
    return Rule(f"in {brackets[0]}{low}, {high}{brackets[1]}", test)


def key(default: Any, help: str, rule: Rule | None = None, *, group: str, choices: tuple[str, ...] = (),
        resumable: bool = False) -> Any:
    """A TrainConfig field described once. `resumable`: the key may change on `--resume` (it does not change
    what an optimizer step computes); `choices`: the only values allowed."""
    metadata = {"help": help, "group": group, "rule": rule, "choices": choices, "resumable": resumable}
    if isinstance(default, (list, dict)):   # a fresh copy per config, as dataclasses require
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def value_problem(value: Any) -> str | None:
    """Why a value (any nesting of lists and mappings) is not a recipe value, or None: numbers are finite,
    strings and mapping keys non-empty, nesting at most MAX_DEPTH deep and MAX_ITEMS items in all (YAML aliases
    can repeat one list many times over)."""
    todo, seen = [(value, 0)], 0
    while todo:
        item, depth = todo.pop()
        seen += 1
        if depth > MAX_DEPTH:
            return f"is nested more than {MAX_DEPTH} brackets deep"
        if seen > MAX_ITEMS:
            return f"holds more than {MAX_ITEMS} items"
        if isinstance(item, float) and not math.isfinite(item):
            return "must hold finite numbers only" if depth else "must be a finite number"
        if isinstance(item, str) and not item:
            return "must not hold an empty string" if depth else "must not be an empty string"
        if isinstance(item, dict):
            for name in item:
                if not isinstance(name, str) or not name:
                    return f"must have non-empty text keys (found {name!r})"
            todo += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, (list, tuple)):
            todo += [(v, depth + 1) for v in item]
    return None


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 6, 6, 60, 60


def shown(value: Any) -> str:
    """`repr(value)` cut short, for an error line: a YAML alias can make a value too big to print."""
    return _SHORT.repr(value)


def kwargs_collision(options: dict, passed: dict[str, str]) -> str | None:
    """Why an options mapping (mix_kwargs, model_kwargs) names an argument the code passes itself, or None;
    `passed` maps such names to the recipe key they come from (or "the dataset")."""
    for name in options:
        if passed.get(name) == "the dataset":
            return f"cannot set {name!r}: it comes from the dataset"
        if name in passed:
            return f"cannot set {name!r}: use the recipe key {passed[name]!r}"
    return None


_LAUNCHER_PRECISION = "mixed precision is chosen at launch: `accelerate launch --mixed_precision bf16|fp16`"
_LAUNCHER_DEVICES = "devices and processes are chosen at launch by `accelerate launch`"
# Names people bring from timm's train.py and other mixup code bases; a value that is a field name
# becomes "did you mean ...?", anything else is shown as is.
_ALIASES = {
    "learning_rate": "lr", "label_smoothing": "smoothing", "drop": "drop_rate", "img_size": "input_size",
    "data": "data_dir", "compile": "torchcompile", "ema": "model_ema", "model_ema_enable": "model_ema",
    "ema_decay": "model_ema_decay", "checkpoint_hist": "checkpoint_keep", "log_interval": "log_every",
    "log_wandb": "wandb_mode", "experiment": "output", "mixup_alpha": "mix_alpha", "alpha": "mix_alpha",
    "mixup_prob": "mix_prob",
    "mixup": "use `mix: mixup` to pick the method and `mix_alpha` for timm's --mixup alpha",
    "cutmix": "use `mix: cutmix` to pick the method and `cutmix_alpha` for timm's --cutmix alpha",
    "nesterov": "timm's `opt: sgd` is already Nesterov SGD; `opt: momentum` is plain momentum SGD",
    "amp": _LAUNCHER_PRECISION, "amp_dtype": _LAUNCHER_PRECISION, "mixed_precision": _LAUNCHER_PRECISION,
    "device": _LAUNCHER_DEVICES, "distributed": _LAUNCHER_DEVICES, "local_rank": _LAUNCHER_DEVICES,
}


def suggest(key: str, fields: tuple[str, ...]) -> str:
    """What to say about an unknown recipe key: the field it most likely means, or how to do it here."""
    hint = _ALIASES.get(key.replace("-", "_").lower())
    if hint is None:
        close = difflib.get_close_matches(key, fields, n=1)
        hint = close[0] if close else None
    if hint is None:
        return "the valid keys are the fields of TrainConfig in catchup/config.py"
    return f"did you mean {hint!r}?" if hint in fields else hint


# timm has had these for years; knowing them spares importing timm (and torch) to check most recipes
_COMMON_OPTIMIZERS = {"sgd", "momentum", "adam", "adamw", "nadam", "radam", "rmsprop", "rmsproptf", "lamb", "lion"}


def _timm_optimizers() -> set[str]:
    try:
        from timm.optim import list_optimizers
    except ImportError:  # timm releases before the optimizer registry
        return _COMMON_OPTIMIZERS
    return set(list_optimizers())


def _check_opt(opt: str) -> str | None:
    """None if timm's create_optimizer_v2 accepts `opt`, else why not."""
    *prefix, name = opt.lower().split("_")
    if prefix not in ([], ["lookahead"]):
        return "the only prefix timm accepts is `lookahead_`"
    if name in _COMMON_OPTIMIZERS:
        return None
    known = _timm_optimizers()
    if name in known:
        return None
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"did you mean {close[0]!r}?" if close else "see timm.optim.list_optimizers()"
