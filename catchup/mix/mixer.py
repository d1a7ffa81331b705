"""The mixer every method shares: timm.data.Mixup's interface, one MixPlan per batch, one stage hook.

``mixer(x, target) -> (x, soft_target)`` samples the plan for the batch, mixes the input itself when the plan's
layer is 0, and otherwise arms the stage hook so the next training forward mixes features at that layer.
``mixer.collate`` is the same data-side half as a DataLoader collate_fn: it returns ``(x, soft_target, plan)``
and the training loop hands the plan back with ``mixer.arm(plan)``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate, get_worker_info

from catchup.errors import CatchupError
from catchup.mix.plan import MixPlan, StageHooks, mixed_target, smooth_one_hot
from catchup.stages import Stage, probe_channels, resolve_stages


def rand_box(rng: np.random.Generator, height: int, width: int, lam: float,
             minmax: Sequence[float] | None = None) -> tuple[int, int, int, int]:
    """CutMix box (y0, y1, x0, x1) covering about 1 - lam of the image, timm's rand_bbox/rand_bbox_minmax rules.

    Written out because timm's versions draw from numpy's global RNG, which the data pipeline also consumes;
    a private generator is what makes a resumed run sample the same boxes.
    """
    if minmax is not None:
        cut_h = int(rng.integers(int(height * minmax[0]), int(height * minmax[1])))
        cut_w = int(rng.integers(int(width * minmax[0]), int(width * minmax[1])))
        y0, x0 = int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, width - cut_w + 1))
        return y0, y0 + cut_h, x0, x0 + cut_w
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    return y0, y1, x0, x1


def cutmix(x: torch.Tensor, index: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Paste each partner's box into the sample (out of place)."""
    y0, y1, x0, x1 = box
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[index][..., y0:y1, x0:x1]
    return out


def mixup(x: torch.Tensor, index: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Convex combination ``lam * x + (1 - lam) * x[index]`` (out of place)."""
    return x * lam + x[index] * (1.0 - lam)


class Mixer:
    """Base of every method. Subclasses set the class attributes and override ``feature_plan``/``mix_features``.

    Argument names follow timm.data.Mixup where the concept exists (``prob``, ``cutmix_alpha``, ``cutmix_minmax``,
    ``correct_lam``, ``label_smoothing``, ``num_classes``); ``alpha`` is the Beta parameter of lambda.
    """
    name = "none"
    default_alpha = 1.0
    default_layers: tuple[int, ...] | None = ()  # layers sampled by default; () = none, None = every layer
    input_mix = "cutmix"                   # what layer 0 does: 'cutmix' or 'mixup'
    feature_level = False                  # True: may mix hidden layers through the stage hooks
    live_model = False                     # True: mixing reads the model (saliency, CAMs, history): no collate_fn

    def __init__(self, model: nn.Module | None = None, *, num_classes: int, alpha: float | None = None,
                 cutmix_alpha: float = 1.0, cutmix_minmax: Sequence[float] | None = None, prob: float = 1.0,
                 label_smoothing: float = 0.0, correct_lam: bool = True, layers: Sequence[int | str] | None = None,
                 layer_weights: Sequence[float] | None = None, label_lam: str = "exact", seed: int = 0,
                 input_size: Sequence[int] | None = None):
        self.alpha = self.default_alpha if alpha is None else float(alpha)
        _check(num_classes >= 1, f"num_classes must be >= 1, got {num_classes}")
        _check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _check(cutmix_alpha > 0, f"cutmix_alpha must be > 0, got {cutmix_alpha}")
        _check(0.0 <= prob <= 1.0, f"prob must be in [0, 1], got {prob}")
        _check(0.0 <= label_smoothing < 1.0, f"label_smoothing must be in [0, 1), got {label_smoothing}")
        _check(label_lam in ("exact", "sampled"), f"label_lam must be 'exact' or 'sampled', got {label_lam!r}")
        if cutmix_minmax is not None:
            _check(len(cutmix_minmax) == 2 and 0 < cutmix_minmax[0] < cutmix_minmax[1] <= 1,
                   f"cutmix_minmax must be [min, max] with 0 < min < max <= 1, got {cutmix_minmax}")
        self.num_classes, self.cutmix_alpha, self.cutmix_minmax = num_classes, float(cutmix_alpha), cutmix_minmax
        self.prob, self.label_smoothing, self.correct_lam = prob, label_smoothing, correct_lam
        self.label_lam = label_lam
        self.model = model     # methods that look at the model (saliency, CAMs) read it; may be None
        self.seed, self.calls = seed, 0
        self.last_plan: MixPlan | None = None
        self.batch_target: torch.Tensor | None = None
        self.rng = np.random.default_rng([seed, 0])
        self.enabled = True    # the mixup_off_epoch switch: False -> plain (smoothed) one-hot targets
        self.stages = self._resolve_stages(model, layers, input_size)
        self.layer_weights = _normalized_weights(layer_weights, len(self.stages))
        needs_hooks = any(s.module_name for s in self.stages)
        self.hooks = StageHooks(model, self.stages, self.mix_features) if needs_hooks else None

    # ---- what the training loop calls -------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, soft_target, plan = self.prepare(x, target)
        self.arm(plan)
        return x, soft_target

    def prepare(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MixPlan | None]:
        """The data-side half: sample the plan, mix the input if layer 0, build the soft target."""
        if x.dim() != 4 or target.dim() != 1 or x.shape[0] != target.shape[0]:
            raise CatchupError(f"mixer expects x [B, C, H, W] and target [B], got {tuple(x.shape)} and "
                               f"{tuple(target.shape)}")
        # Each batch draws from its own stream, seeded by (seed, batch number): the state to checkpoint is one
        # counter, the same on every process (Accelerate saves custom state from the main process only).
        worker = get_worker_info()   # collate in a DataLoader worker: each worker copy needs its own streams
        self.rng = np.random.default_rng([self.seed, self.calls] + ([worker.seed] if worker is not None else []))
        self.calls += 1
        plan = self.sample_plan(x) if self.enabled else None
        self.last_plan = plan   # for statistics (layer, label weight) in the training loop
        if plan is None:
            return x, smooth_one_hot(target, self.num_classes, self.label_smoothing), None
        if plan.layer == 0:
            self.batch_target = target     # for input mixing that reads the labels (own-class saliency, CAMs)
            try:
                x = self.mix_input(x, plan)
            finally:
                self.batch_target = None
        soft = mixed_target(target, plan.index, plan.lam_eff, self.num_classes, self.label_smoothing)
        return x, soft, plan

    def collate(self, batch: list) -> tuple[torch.Tensor, torch.Tensor, MixPlan | None]:
        """DataLoader collate_fn: ``(x, soft_target, plan)``; pass the plan to ``mixer.arm`` before the forward.

        Worker processes hold copies of the mixer: toggling ``enabled`` in the main process reaches them only
        when the workers are started again (use ``persistent_workers=False`` or rebuild the loader).
        """
        if self.live_model:
            raise CatchupError(f"{self.name} reads the live model while mixing: mix in the training loop, "
                               "not in the DataLoader collate_fn")
        x, target = default_collate(batch)[:2]
        return self.prepare(x, target)

    def arm(self, plan: MixPlan | None) -> None:
        if self.hooks is not None:
            self.hooks.arm(plan)

    def sample_plan(self, x: torch.Tensor) -> MixPlan | None:
        if not self.stages or (self.prob < 1.0 and self.rng.random() >= self.prob):
            return None
        k = int(self.rng.choice(len(self.stages), p=self.layer_weights)) if len(self.stages) > 1 else 0
        stage = self.stages[k]
        index = torch.from_numpy(self.rng.permutation(x.shape[0])).to(x.device)
        if stage.module_name is None:
            alpha = self.cutmix_alpha if self.input_mix == "cutmix" else self.alpha
            lam = float(self.rng.beta(alpha, alpha))
            return MixPlan(layer=0, lam=lam, index=index, lam_eff=lam)
        return self.feature_plan(stage, index)

    def auxiliary_loss(self, logits: torch.Tensor) -> torch.Tensor | None:
        """An extra loss term a method adds after the forward (e.g. a consistency term); None for most."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "enabled": self.enabled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        self.enabled = bool(state["enabled"])

    def remove(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()

    # ---- what a method defines -----------------------------------------------------------------------

    def mix_input(self, x: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        """Layer 0: CutMix (lambda corrected to the box area when ``correct_lam``) or input Mixup."""
        if self.input_mix == "mixup":
            return mixup(x, plan.index, plan.lam)
        box = rand_box(self.rng, x.shape[-2], x.shape[-1], plan.lam, self.cutmix_minmax)
        if self.correct_lam or self.cutmix_minmax is not None:
            plan.lam_eff = 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / float(x.shape[-2] * x.shape[-1])
        return cutmix(x, plan.index, box)

    def feature_plan(self, stage: Stage, index: torch.Tensor) -> MixPlan:
        """The plan for a feature layer: lambda ~ Beta(alpha, alpha), label weight lambda."""
        lam = float(self.rng.beta(self.alpha, self.alpha))
        return MixPlan(stage.layer, lam, index, lam, {"lam": torch.tensor(lam)})

    def mix_features(self, h: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        raise CatchupError(f"method {self.name!r} does not mix features")

    # ---- helpers -------------------------------------------------------------------------------------

    def _resolve_stages(self, model, layers, input_size) -> list[Stage]:
        if layers is None:
            if self.default_layers is not None and all(k == 0 for k in self.default_layers):
                return [Stage(0, None, None)] if self.default_layers else []
        elif len(layers) == 0:
            raise CatchupError("mix_layers is empty: name at least one layer")
        elif all(layer in (0, "input") for layer in layers):
            return [Stage(0, None, None)]
        if not self.feature_level:
            raise CatchupError(f"method {self.name!r} mixes only the input (layer 0); "
                               f"for hidden layers use 'manifold' or 'catchup'")
        if model is None:
            raise CatchupError(f"method {self.name!r} mixes features: build it with the model")
        if layers is None and self.default_layers is not None:
            available = len(resolve_stages(model))
            layers = [k for k in self.default_layers if k < available]
        return probe_channels(model, resolve_stages(model, layers), input_size)


class NoMix(Mixer):
    """No mixing: targets are (smoothed) one-hot rows, so every method shares one loss."""
    name = "none"

    def _resolve_stages(self, model, layers, input_size) -> list[Stage]:
        return []


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise CatchupError(message)


def _normalized_weights(weights: Sequence[float] | None, n: int) -> np.ndarray | None:
    if n == 0:
        return None
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64)
    _check(w.shape == (n,), f"mix_layer_weights has {w.size} entries for {n} mixing layers")
    _check(bool(np.all(w >= 0)) and w.sum() > 0, f"mix_layer_weights must be >= 0 and not all 0, got {list(weights)}")
    return w / w.sum()
