"""The mixer every method shares: timm.data.Mixup's interface, one MixPlan per batch, one stage hook.

``mixer(x, target) -> (x, soft_target)`` samples the plan for the batch, mixes the input itself when the plan's
layer is 0, and otherwise arms the stage hook so the next training forward mixes features at that layer.
``mixer.collate`` is the same data-side half as a DataLoader collate_fn returning timm's ``(x, soft_target)``;
the plan rides on ``x`` to the model (see ``catchup.mix.batch``).

A method is one small class (``catchup.mix.register_mixer`` makes it a recipe's ``mix``), whose steps are:

- which layers: ``default_layers(model)`` (0 = the input, k = the k-th feature_info stage), or the recipe's;
- sample: ``input_plan(x, index)`` or ``feature_plan(stage, index)`` return the batch's immutable ``MixPlan``,
  drawn from ``self.rng`` (the batch's own stream);
- apply: ``mix_input(x, target, plan) -> (x, plan)`` at the input (the plan returned carries what mixing the
  images decided, e.g. a box's area), ``mix_features(h, plan)`` on a stage's [B, C, ...] output in the hook;
- target: ``catchup.mix.plan.soft_target`` builds every method's labels from the final plan.

The probability gate and the partner draw are shared; options are constructor keywords, set after the base
constructor.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import get_worker_info

from catchup.errors import CatchupError
from catchup.mix.batch import MixCollate, PlanHandover
from catchup.mix.ops import cutmix, mixup, rand_box
from catchup.mix.plan import MixPlan, StageHooks, soft_target
from catchup.stages import Stage, probe_channels, resolve_stages, unwrap_model


MODES = ("batch", "pair", "elem", "half")   # timm.data.Mixup's modes


class Mixer:
    """Base of every method; a drop-in for ``timm.data.Mixup`` (and, as ``collate``, ``FastCollateMixup``).

    Arguments are timm.data.Mixup's (``mixup_alpha``, ``cutmix_alpha``, ``cutmix_minmax``, ``prob``,
    ``switch_prob``, ``mode``, ``correct_lam``, ``label_smoothing``, ``num_classes``), so timm's ``mixup_args``
    pass through unchanged; ``alpha`` is the same Beta parameter as ``mixup_alpha`` (give one). Their meaning
    here:

    - ``prob``: the share of batches mixed (one gate per batch, every method); None = the method's
      ``default_prob``: MoEx 0.25, SaliencyMix and SnapMix 0.5 (their authors' settings), else 1; for CutMix
      that is the project's choice (its authors: 0.5 on CIFAR), measured in the README's "Open choices".
    - ``mixup_alpha``/``alpha``: lambda ~ Beta(alpha, alpha) of the method (feature layers, input Mixup, the
      method's own input mixing); timm's ``mixup_alpha=0`` (no Mixup) leaves the method its own alpha.
      ``cutmix_alpha``: lambda of input CutMix; ``cutmix_minmax`` turns CutMix on with timm's min/max boxes.
    - ``switch_prob``: None (the default) keeps each method's own input mixing. Given (timm's train.py always
      gives it), methods whose input layer is plain Mixup or CutMix (mixup, cutmix, manifold, catchup, alignmix)
      mix the input as timm does: CutMix with probability ``switch_prob`` when both alphas are > 0, else the
      one whose alpha is > 0. Methods with their own input mixing ignore it.
    - ``mode``: 'batch' for every method; ``mixup`` and ``cutmix`` also offer timm's 'elem' and 'pair'.
      Partners are a random permutation rather than timm's flipped batch, so odd batch sizes work.
    - ``seed``: None follows torch's seed at build time (timm's seed + rank); ``mixup_enabled = False`` (timm's
      off switch; ``enabled`` is the same flag): plain smoothed one-hot targets.
    """
    name = "none"
    default_alpha = 1.0
    default_prob = 1.0
    input_mix: str | None = "cutmix"       # layer 0: 'cutmix' or 'mixup'; None = the method's own mix_input
    feature_level = False                  # True: may mix hidden layers through the stage hooks
    live_model = False                     # True: mixing reads the model (saliency, CAMs, history): no collate_fn
    modes: tuple[str, ...] = ("batch",)    # the timm modes the method offers

    def __init__(self, model: nn.Module | None = None, *, num_classes: int | None = None, alpha: float | None = None,
                 mixup_alpha: float | None = None, cutmix_alpha: float = 1.0,
                 cutmix_minmax: Sequence[float] | None = None, prob: float | None = None,
                 switch_prob: float | None = None,
                 mode: str = "batch", label_smoothing: float = 0.0, correct_lam: bool = True,
                 layers: Sequence[int | str] | None = None, layer_weights: Sequence[float] | None = None,
                 label_lam: str = "exact", seed: int | None = None, input_size: Sequence[int] | None = None):
        if num_classes is None:     # timm's train.py fills it from the model; so does this
            num_classes = getattr(unwrap_model(model), "num_classes", None) if model is not None else None
            _check(num_classes is not None, "num_classes is required (the model has no num_classes)")
        # timm's --mixup 0 (mixup_alpha=0) means "no input Mixup": the method's own mixing keeps its alpha.
        self.input_alpha = None if mixup_alpha is None else float(mixup_alpha)
        if mixup_alpha is not None:
            _check(alpha is None or float(alpha) == float(mixup_alpha),
                   f"alpha and mixup_alpha are the same setting; got {alpha} and {mixup_alpha}")
            alpha = mixup_alpha if mixup_alpha > 0 or not self.feature_level and self.input_mix else None
        self.alpha = self.default_alpha if alpha is None else float(alpha)
        if self.input_alpha is None:
            self.input_alpha = self.alpha
        prob = self.default_prob if prob is None else float(prob)
        _check(num_classes >= 1, f"num_classes must be >= 1, got {num_classes}")
        _check(0.0 <= prob <= 1.0, f"prob must be in [0, 1] (timm's --mixup-prob), got {prob}")
        _check(0.0 <= label_smoothing < 1.0, f"label_smoothing must be in [0, 1) (timm's --smoothing), "
                                             f"got {label_smoothing}")
        _check(label_lam in ("exact", "sampled"), f"label_lam must be 'exact' or 'sampled', got {label_lam!r}")
        _check(mode in MODES, f"mode must be one of {', '.join(MODES)} (timm's --mixup-mode), got {mode!r}")
        _check(mode in self.modes, f"{self.name} offers mode {' or '.join(map(repr, self.modes))}, not {mode!r} "
                                   f"(timm's --mixup-mode)")
        _check(switch_prob is None or 0.0 <= switch_prob <= 1.0,
               f"switch_prob must be in [0, 1] (timm's --mixup-switch-prob), got {switch_prob}")
        if cutmix_minmax is not None:
            _check(len(cutmix_minmax) == 2 and 0 < cutmix_minmax[0] < cutmix_minmax[1] <= 1,
                   f"cutmix_minmax must be [min, max] with 0 < min < max <= 1 (timm's --cutmix-minmax), "
                   f"got {cutmix_minmax}")
            cutmix_alpha = cutmix_alpha or 1.0     # as timm: min/max boxes turn CutMix on
        self.num_classes, self.cutmix_alpha, self.cutmix_minmax = num_classes, float(cutmix_alpha), cutmix_minmax
        self.prob, self.switch_prob, self.mode = prob, switch_prob, mode
        self.label_smoothing, self.correct_lam, self.label_lam = label_smoothing, correct_lam, label_lam
        plain_input_only = self.input_mix is not None and not self.feature_level
        _check(self.alpha > 0 or (plain_input_only and self.alpha == 0),
               f"alpha must be > 0 for {self.name} (timm's --mixup), got {self.alpha}")
        _check(self.cutmix_alpha >= 0, f"cutmix_alpha must be >= 0 (timm's --cutmix), got {self.cutmix_alpha}")
        _check(self.input_alpha >= 0, f"mixup_alpha must be >= 0 (timm's --mixup), got {self.input_alpha}")
        self.model = model     # methods that look at the model (saliency, CAMs) read it; may be None
        # timm seeds torch with seed + rank before building its mixup: following torch's seed gives every
        # process its own plans and makes --seed change them
        seed = torch.initial_seed() if seed is None else int(seed)
        self.seed, self.calls, self.batch_number = seed, 0, -1
        self._worker_start: int | None = None    # the call count a DataLoader worker's copy started from
        self.last_plan: MixPlan | None = None
        self.rng = np.random.default_rng([seed, 0])
        self.mixup_enabled = True    # timm's mixup-off switch: False -> plain (smoothed) one-hot targets
        self.stages = self._resolve_stages(model, layers)
        if input_size is not None:
            self.stages = probe_channels(model, self.stages, input_size)
        # Otherwise the first batch the main process sees gives the size (``learn_stages``).
        self._stages_probed = input_size is not None or not any(s.module_name for s in self.stages)
        self.input_mixes = self._input_mixes() if any(s.module_name is None for s in self.stages) else ()
        self.layer_weights = _normalized_weights(layer_weights, len(self.stages))
        needs_hooks = any(s.module_name for s in self.stages)
        self.hooks = StageHooks(model, self.stages, self.mix_features) if needs_hooks else None
        self._handover: PlanHandover | None = None
        self._armed_directly = False
        self._collate: MixCollate | None = None

    @property
    def enabled(self) -> bool:
        """The same flag as ``mixup_enabled`` (the name the project's own training script uses)."""
        return self.mixup_enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.mixup_enabled = bool(value)

    # ---- what the training loop calls -------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, soft_target, plan = self.prepare(x, target)
        self.arm(plan)
        self._armed_directly = True
        return x, soft_target

    def prepare(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MixPlan | None]:
        """The data-side half: sample the plan, mix the input if layer 0, build the soft target from the plan."""
        if x.dim() != 4 or target.dim() != 1 or x.shape[0] != target.shape[0]:
            raise CatchupError(f"mixer expects x [B, C, H, W] and target [B], got {tuple(x.shape)} and "
                               f"{tuple(target.shape)}")
        self.learn_stages(tuple(x.shape[1:]))
        # Each batch draws from its own stream, seeded by (seed, batch number): the state to checkpoint is one
        # counter, the same on every process (Accelerate saves custom state from the main process only).
        self.batch_number = self._next_batch_number()
        self.rng = np.random.default_rng([self.seed, self.batch_number])
        plan = self.sample_plan(x) if self.mixup_enabled else None
        if plan is not None and plan.layer == 0:
            x, plan = self._mix_input_as(x, target, plan)
        self.last_plan = plan   # for statistics (layer, label weight) in the training loop
        soft = soft_target(plan, target, self.num_classes, self.label_smoothing)
        self.observe(x, soft, plan)
        return x, soft, plan

    @property
    def collate(self) -> MixCollate:
        """DataLoader collate_fn (e.g. ``timm.data.create_loader(..., collate_fn=mixer.collate)``) returning
        timm's ``(x, soft_target)``; uint8 images stay uint8 for timm's prefetcher. ``x`` carries the batch's
        plan to the model, whose forward pre-hook arms the stage hooks: the training loop hands nothing over.

        Resume: batch n of the run draws from the stream (seed, n), in worker processes too (a worker numbers
        its batches by torch's turn-by-turn hand-out), and the model's training forwards advance ``calls`` in
        the main process, which ``state_dict()`` saves. So a run resumed from a checkpoint with the loader
        skipping the batches already seen replays the same plans, with ``num_workers=0`` or with workers that
        restart each epoch (``persistent_workers=False``). Persistent workers keep their numbering across
        epochs: plans stay distinct and reproducible from the seed, but replay after a mid-epoch resume only
        when every epoch, and the resumed part, has a multiple of ``num_workers`` batches."""
        if self.live_model:
            raise CatchupError(f"{self.name} reads the live model while mixing: mix in the training loop, "
                               "not in the DataLoader collate_fn")
        if self._collate is None:
            if self.model is not None:
                self._handover = PlanHandover(self.model, self._take_plan, self._forward_was_armed)
            self._collate = MixCollate(self)
        return self._collate

    def learn_stages(self, input_size: Sequence[int]) -> None:
        """Probe the stages once, at the size of the first real batch: their layouts, the channel counts that
        feature_info does not give, and a clear error for a stage that cannot be mixed. A DataLoader worker
        (no model, or not its process's to run) samples with the counts feature_info gives; the main process
        probes at the first training forward (``_take_plan``)."""
        if self._stages_probed:
            return
        if self.model is None or get_worker_info() is not None:
            unknown = [s.module_name for s in self.stages if s.module_name and s.channels is None]
            if unknown:
                raise CatchupError(f"the channel counts of {', '.join(map(repr, unknown))} are not in the model's "
                                   "feature_info: pass input_size=(C, H, W) to the mixer so it can probe them")
            return
        self.stages = probe_channels(self.model, self.stages, input_size)
        self._stages_probed = True

    def seek(self, batches_seen: int) -> None:
        """Continue the plans of a run at its batch ``batches_seen`` (e.g. ``start_epoch * len(loader)`` after
        timm's ``--resume``): batch n always draws from the stream (seed, n), so this is the whole resume."""
        _check(int(batches_seen) >= 0, f"batches_seen must be >= 0, got {batches_seen}")
        self.calls = int(batches_seen)

    def for_worker(self) -> "Mixer":
        """A copy that samples plans and mixes inputs (a DataLoader worker's share) without the model or hooks."""
        worker = copy.copy(self)
        worker.model, worker.hooks, worker._handover, worker._collate = None, None, None, None
        return worker

    def feature_plan_template(self) -> MixPlan | None:
        """A feature plan drawn from a throwaway stream (the mixer's own is left as it was): the keys, shapes
        and dtypes of its extras are those of every feature plan. None when the method mixes no features."""
        stage = next((s for s in self.stages if s.module_name is not None), None)
        if stage is None:
            return None
        rng, self.rng = self.rng, np.random.default_rng(0)
        try:
            return self.feature_plan(stage, torch.arange(2))
        finally:
            self.rng = rng

    def arm(self, plan: MixPlan | None) -> None:
        if self.hooks is not None:
            self.hooks.arm(plan)

    def auxiliary_loss(self, logits: torch.Tensor) -> torch.Tensor | None:
        """An extra loss term a method adds after the forward (e.g. a consistency term); None for most."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "enabled": self.mixup_enabled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        self.mixup_enabled = bool(state["enabled"])

    def remove(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
        if self._handover is not None:
            self._handover.remove()

    # ---- the shared sampling: one gate, one pairing --------------------------------------------------

    def sample_plan(self, x: torch.Tensor) -> MixPlan | None:
        if not self.stages or not self.gate():
            return None
        k = int(self.rng.choice(len(self.stages), p=self.layer_weights)) if len(self.stages) > 1 else 0
        stage = self.stages[k]
        index = self.pair(x.shape[0], x.device)
        if stage.module_name is None:
            return self.input_plan(x, index)
        return self.feature_plan(stage, index)

    def gate(self) -> bool:
        """Whether this batch is mixed (probability ``prob``)."""
        return self.prob >= 1.0 or self.rng.random() < self.prob

    def pair(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """The partner of each sample: a random permutation of the batch."""
        return torch.from_numpy(self.rng.permutation(batch_size)).to(device)

    # ---- what a method defines -----------------------------------------------------------------------

    def input_plan(self, x: torch.Tensor, index: torch.Tensor) -> MixPlan:
        """Layer 0: CutMix or Mixup (see ``switch_prob``), lambda from the matching alpha."""
        kind = self.input_mixes[0]
        if len(self.input_mixes) > 1:
            kind = "cutmix" if self.rng.random() < self.switch_prob else "mixup"
        alpha = self.cutmix_alpha if kind == "cutmix" else self.input_alpha
        lam = float(self.rng.beta(alpha, alpha))
        return MixPlan(0, lam, index, lam, {"input_mix": kind})

    def mix_input(self, x: torch.Tensor, target: torch.Tensor, plan: MixPlan) -> tuple[torch.Tensor, MixPlan]:
        """Layer 0: CutMix (lambda corrected to the box area when ``correct_lam``) or input Mixup."""
        if plan.extras.get("input_mix", self.input_mix) == "mixup":
            return mixup(x, plan.index, plan.lam), plan
        box = rand_box(self.rng, x.shape[-2], x.shape[-1], plan.lam, self.cutmix_minmax)
        if self.correct_lam or self.cutmix_minmax is not None:
            plan = replace(plan, lam_eff=1.0 - (box[1] - box[0]) * (box[3] - box[2]) / float(x.shape[-2] * x.shape[-1]))
        return cutmix(x, plan.index, box), plan

    def feature_plan(self, stage: Stage, index: torch.Tensor) -> MixPlan:
        """The plan for a feature layer: lambda ~ Beta(alpha, alpha), label weight lambda."""
        lam = float(self.rng.beta(self.alpha, self.alpha))
        return MixPlan(stage.layer, lam, index, lam, {"lam": torch.tensor(lam)})

    def mix_features(self, h: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        raise CatchupError(f"method {self.name!r} does not mix features")

    def observe(self, x: torch.Tensor, soft: torch.Tensor, plan: MixPlan | None) -> None:
        """Sees every batch the mixer returns (mixed or not): for methods with a history, such as RecursiveMix."""

    # ---- helpers -------------------------------------------------------------------------------------

    def _mix_input_as(self, x: torch.Tensor, target: torch.Tensor, plan: MixPlan) -> tuple[torch.Tensor, MixPlan]:
        """``mix_input`` in float for integer images (timm's uint8 prefetcher batches), rounded back as timm's
        FastCollateMixup does: every input mix commutes with the per-channel normalisation applied later."""
        if x.is_floating_point():
            return self.mix_input(x, target, plan)
        info = torch.iinfo(x.dtype)
        mixed, plan = self.mix_input(x.float(), target, plan)
        return mixed.round_().clamp_(info.min, info.max).to(x.dtype), plan

    def _next_batch_number(self) -> int:
        """The batch's number in the run. In the main process, the call count. A DataLoader worker's copy of the
        mixer sees every num_workers-th batch (torch hands batches to its workers in turn), so it numbers them
        from the count it started with as they are numbered in the loader's order."""
        worker = get_worker_info()
        number = self.calls
        if worker is not None:
            if self._worker_start is None:
                self._worker_start = self.calls
            number = self._worker_start + (self.calls - self._worker_start) * worker.num_workers + worker.id
        self.calls += 1
        return number

    def _forward_was_armed(self) -> bool:
        """Whether ``mixer(x, target)`` armed the coming forward (once: the next forward asks again)."""
        armed, self._armed_directly = self._armed_directly, False
        return armed

    def _take_plan(self, plan: MixPlan | None, batch_number: int, input_size: Sequence[int]) -> None:
        """A training forward's input carried this plan from the collate_fn: record it, arm the hooks, and
        count the batch here too (collated in a worker, it was counted in the worker's copy only)."""
        self.learn_stages(input_size)
        self.last_plan = plan
        self.calls = max(self.calls, batch_number + 1)
        self.arm(plan)

    def _input_mixes(self) -> tuple[str, ...]:
        """The input mixes layer 0 chooses between, and the alpha checks they need."""
        if self.input_mix is None:
            return ()
        if self.switch_prob is None:
            alpha = self.cutmix_alpha if self.input_mix == "cutmix" else self.input_alpha
            name, flag = ("cutmix_alpha", "--cutmix") if self.input_mix == "cutmix" else ("alpha", "--mixup")
            _check(alpha > 0, f"{name} must be > 0 for {self.name}'s input {self.input_mix} (timm's {flag}), "
                              f"got {alpha}")
            return (self.input_mix,)
        mixes = tuple(k for k, a in (("mixup", self.input_alpha), ("cutmix", self.cutmix_alpha)) if a > 0)
        _check(bool(mixes), f"{self.name} mixes the input (layer 0) with Mixup or CutMix, and timm's --mixup and "
                            "--cutmix are both 0: pass --cutmix 1.0 or --mixup 0.8 (or leave layer 0 out of "
                            "mix_layers)")
        return mixes

    def default_layers(self, model: nn.Module) -> list[int]:
        """The layers sampled when none are named (0 = the input, k = the k-th feature_info stage); a method
        that mixes features overrides it and is given the model."""
        return [0]

    def _resolve_stages(self, model, layers) -> list[Stage]:
        if layers is not None and len(layers) == 0:
            raise CatchupError("mix_layers is empty: name at least one layer")
        if self.feature_level and model is None:
            raise CatchupError(f"method {self.name!r} mixes features: build it with the model")
        layers = self.default_layers(model) if layers is None else layers
        if all(layer in (0, "input") for layer in layers):
            return [Stage(0, None, None)]
        if not self.feature_level:
            raise CatchupError(f"method {self.name!r} mixes only the input (layer 0); "
                               f"for hidden layers use 'manifold' or 'catchup'")
        return resolve_stages(model, layers)


class NoMix(Mixer):
    """No mixing: targets are (smoothed) one-hot rows, so every method shares one loss."""
    name = "none"
    modes = ("batch", "pair", "elem")      # nothing is mixed, per batch or per sample

    def _resolve_stages(self, model, layers) -> list[Stage]:
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
