"""The value rules of recipe keys: ranges, choices and timm optimizer names (``config.validate`` applies them)."""
from __future__ import annotations

import difflib
from typing import Any, Callable

SCHEDULERS = ("multistep", "step", "cosine", "none")  # timm create_scheduler_v2 names, plus "none"
LABEL_LAM = ("exact", "sampled")
WANDB_MODES = ("auto", "online", "offline", "disabled")


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


_RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    *((k, lambda v: v > 0, "> 0") for k in ("lr", "cutmix_alpha", "decay_rate")),
    ("mix_alpha", _optional(lambda v: v > 0), "> 0 or null"),
    *((k, lambda v: v >= 1, ">= 1") for k in (
        "batch_size", "grad_accum_steps", "epochs", "eval_every", "checkpoint_keep", "log_every",
        "track_filters_every")),
    *((k, lambda v: v >= 0, ">= 0") for k in (
        "max_steps", "warmup_epochs", "warmup_lr", "min_lr", "momentum", "weight_decay", "workers",
        "checkpoint_every_steps", "mixup_off_epoch", "eval_last")),
    *((k, _optional(lambda v: v >= 1), ">= 1 or null") for k in ("num_classes", "input_size", "eval_batch_size")),
    ("clip_grad", _optional(lambda v: v > 0), "> 0 or null"),
    ("smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("bce_target_thresh", _optional(lambda v: 0 < v < 1), "in (0, 1) or null"),
    ("drop_rate", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("drop_path", _optional(lambda v: 0 <= v < 1), "in [0, 1) or null"),
    ("train_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("mix_prob", _optional(lambda v: 0 <= v <= 1), "in [0, 1] or null"),
    ("aug_repeats", lambda v: v == 0 or v >= 1, "0 (off) or >= 1"),
    ("model_ema_decay", lambda v: 0 < v < 1, "in (0, 1)"),
    ("decay_milestones", lambda v: all(a < b for a, b in zip([0] + v, v)), "strictly ascending and > 0"),
    ("cutmix_minmax", _optional(lambda v: len(v) == 2 and 0 <= v[0] < v[1] <= 1),
     "[min, max] with 0 <= min < max <= 1"),
    ("mix_layers", _optional(lambda v: len(v) > 0 and all(isinstance(x, str) or x >= 0 for x in v)),
     "a non-empty list of stage indices >= 0 or module names"),
    ("mix_layer_weights", _optional(lambda v: all(w >= 0 for w in v) and sum(v) > 0),
     "non-negative with a positive sum"),
]
_CHOICES = {"sched": SCHEDULERS, "label_lam": LABEL_LAM, "wandb_mode": WANDB_MODES}


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
