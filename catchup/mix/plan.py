"""The contract between a mixer and the model: one MixPlan per training step, one hook per stage.

The mixer samples a plan (layer k, lambda, partners) for the batch. For k == 0 it mixes the input itself;
for k > 0 it arms StageHooks, whose forward hook on stage k hands the stage output to the method's
feature-mixing function during that one training forward and then disarms. Every feature-level method
shares this mechanism instead of editing each backbone's forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from catchup.errors import CatchupError
from catchup.mix.layout import channels_first, restore_layout
from catchup.stages import (MIX_LAYERS_FIX, Stage, memory_format_of, model_label, sequential_tail, stage_layout,
                            unwrap_model)


@dataclass(frozen=True)
class MixPlan:
    """What one batch's mixing does, and everything its soft target needs (see ``soft_target``). Immutable: a
    method's ``mix_input`` returns a new plan with what mixing the images decided (``dataclasses.replace``).

    The label of sample i is ``own_weight[i] * y_i + partner_weight[i] * y_index[i]``; the weights default to
    ``lam_eff`` and ``1 - lam_eff`` for the whole batch. ``partner_target`` replaces the partner's one-hot rows
    by given soft rows (RecursiveMix's history); ``label_matrix`` replaces the pairwise form altogether
    (output o's label is ``sum_j label_matrix[o, j] * y_j``: Co-Mixup's many-to-many assignment).
    """
    layer: int                 # 0 = input, k > 0 = stage k of the mixer's layer list
    lam: float                 # the sampled mixing ratio
    index: torch.Tensor        # LongTensor[B]: the partner of each sample
    lam_eff: float             # the weight of the sample's own label (the batch mean where it varies per sample)
    extras: dict = field(default_factory=dict)  # method-specific values for mixing (e.g. the kept-channel count)
    own_weight: torch.Tensor | None = None       # [B] per-sample weight of the own label (None: lam_eff)
    partner_weight: torch.Tensor | None = None   # [B] weight of the partner's label (None: 1 - own weight)
    partner_target: torch.Tensor | None = None   # [B, N] soft rows standing in for the partner's labels
    label_matrix: torch.Tensor | None = None     # [B, B] output-by-input label weights (replaces the above)

    def to(self, device, non_blocking: bool = False) -> "MixPlan":
        """Moves the tensors (Accelerate's send_to_device calls this when a plan travels with a batch)."""
        move = lambda v: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return replace(self, index=move(self.index), extras={k: move(v) for k, v in self.extras.items()},
                       **{k: move(getattr(self, k)) for k in _LABEL_FIELDS})


_LABEL_FIELDS = ("own_weight", "partner_weight", "partner_target", "label_matrix")


FeatureMixFn = Callable[[torch.Tensor, MixPlan], torch.Tensor]


class PlanSlots:
    """A feature plan held in fixed tensors (the layer, the partners, the method's extras) that one compiled
    graph reads: dynamo specialises on Python values but not on tensor contents, so every plan (any layer, no
    mixing, any lambda) runs the same graph. A new batch size or device reallocates them (one recompile)."""

    def __init__(self, template: dict[str, torch.Tensor]):
        self.template = template
        self.layer = torch.tensor(-1)
        self.index = torch.zeros(0, dtype=torch.long)
        self.extras = dict(template)

    def fit(self, batch_size: int, device: torch.device) -> None:
        if self.index.shape[0] != batch_size or self.index.device != device:
            self.layer = torch.full((), -1, dtype=torch.long, device=device)
            self.index = torch.arange(batch_size, device=device)
            self.extras = {k: torch.zeros_like(v, device=device) for k, v in self.template.items()}

    def fill(self, plan: MixPlan | None) -> None:
        if plan is None or plan.index.shape != self.index.shape:
            self.layer.fill_(-1)      # not fitted to this batch yet: the model's pre-hook fills again
            return
        self.layer.fill_(plan.layer)
        self.index.copy_(plan.index, non_blocking=True)
        for key, slot in self.extras.items():
            slot.copy_(plan.extras[key], non_blocking=True)


class StageHooks:
    """Forward hooks on the mixing stages; an armed plan fires once, in a training forward, at its layer.

    Hooks never fire in ``eval()`` (the module's ``training`` flag is checked on every call) nor on a
    ``deepcopy`` of the model (an EMA model), whose stage modules are other objects. ``use_one_graph`` turns
    them into ``torch.cond`` hooks for a model compiled whole (``catchup.compile.compile_model``).
    """

    def __init__(self, model: nn.Module, stages: list[Stage], mix_fn: FeatureMixFn):
        self.model = unwrap_model(model)
        self.mix_fn = mix_fn
        self.plan: MixPlan | None = None
        self.slots: PlanSlots | None = None
        self.stages = [s for s in stages if s.module_name is not None]
        # The plan applied in the last training forward, kept until the next one is armed: gradient
        # checkpointing runs a checkpointed stage again during backward, which must mix the same way.
        self._applied: MixPlan | None = None
        self._in_forward = False
        modules = dict(self.model.named_modules())
        self._handles = [modules[s.module_name].register_forward_hook(self._make_hook(s, modules[s.module_name]))
                         for s in self.stages]
        self._bypass_hooked = False
        # Closures, not bound methods: an EMA deepcopy copies a bound method's instance (these StageHooks, with
        # the armed plan), but keeps functions as they are.
        self._handles += [self.model.register_forward_pre_hook(lambda m, args: self._forward_starts(m)),
                          self.model.register_forward_hook(lambda m, args, out: self._forward_ends(m))]

    def handle_ids(self) -> set[int]:
        return {h.id for h in self._handles}

    @staticmethod
    def fits_one_graph(template: MixPlan) -> bool:
        """Whether plans like ``template`` can be read from tensors alone (every extra is a tensor)."""
        return all(isinstance(v, torch.Tensor) for v in template.extras.values())

    def use_one_graph(self, template: MixPlan) -> None:
        """Read plans from ``PlanSlots`` through ``torch.cond(layer == k, mix, copy)`` at every stage, so a model
        compiled whole has one training graph. Feature mixing may then read only ``plan.index`` and the
        tensors of ``plan.extras`` (``template``'s keys, shapes and dtypes): Python values would be baked in."""
        if not self.fits_one_graph(template):
            raise CatchupError("one-graph mixing needs plans whose extras are all tensors")
        self.slots = PlanSlots(dict(template.extras))
        modules = dict(self.model.named_modules())
        for handle in self._handles:
            handle.remove()
        self._handles = [modules[s.module_name].register_forward_hook(self._make_cond_hook(s, modules[s.module_name]))
                         for s in self.stages]
        slots, root = self.slots, self.model

        # Eager, around the compiled forward: fit the slots to the batch and fill them, then disarm.
        @torch._dynamo.disable
        def before(module: nn.Module, args: tuple) -> None:
            if module is root and module.training and args and isinstance(args[0], torch.Tensor):
                slots.fit(args[0].shape[0], args[0].device)
                slots.fill(self.plan)

        @torch._dynamo.disable
        def after(module: nn.Module, args: tuple, output) -> None:
            if module is root:      # not on an EMA deepcopy, which shares these hooks
                self.disarm()
        self._handles += [self.model.register_forward_pre_hook(before), self.model.register_forward_hook(after)]

    def _forward_starts(self, module: nn.Module) -> None:
        if module is self.model and module.training:    # not an EMA deepcopy, which shares these hooks
            self._in_forward = True
            if not self._bypass_hooked and getattr(module, "grad_checkpointing", False):
                self._hook_bypasses()

    def _hook_bypasses(self) -> None:
        """Hooks on the last module of each Sequential stage, for gradient checkpointing to find (added only
        then: inner hooks would split ``compile_regions`` more finely)."""
        modules = dict(self.model.named_modules())
        for s in self.stages:
            tail = sequential_tail(modules[s.module_name])
            if tail is not modules[s.module_name]:
                self._handles.append(tail.register_forward_hook(self._make_hook(s, tail, bypass=True)))
        self._bypass_hooked = True

    def _forward_ends(self, module: nn.Module) -> None:
        if module is not self.model or not module.training:
            return
        self._in_forward = False
        plan, self.plan = self.plan, None
        if plan is not None:    # armed for a stage the forward never ran: features unmixed, targets mixed
            name = next(s.module_name for s in self.stages if s.layer == plan.layer)
            where = f"model {model_label(self.model)}: module {name!r} was not called by the training forward"
            if getattr(self.model, "grad_checkpointing", False):
                raise CatchupError(f"{where}: gradient checkpointing (set_grad_checkpointing, timm's "
                                   "--grad-checkpointing) bypasses it, so it cannot be mixed; turn gradient "
                                   "checkpointing off or leave this layer out of mix_layers")
            raise CatchupError(f"{where}, so its hook could not mix; {MIX_LAYERS_FIX}")

    def _make_hook(self, stage: Stage, hooked: nn.Module, bypass: bool = False):
        """The stage's forward hook on ``hooked``: the stage module, or (``bypass``) the last module of a
        Sequential stage, which timm's gradient checkpointing (``checkpoint_seq(..., flatten=True)``) calls in
        place of the stage itself; the bypass hook acts only while the model checkpoints."""
        layer = stage.layer

        def hook(module: nn.Module, inputs, output):
            # `deepcopy` (an EMA model) copies the hook closure by reference: the identity check keeps
            # the copy's stage modules from consuming this model's plan.
            if not module.training or module is not hooked:
                return None
            if bypass and not getattr(self.model, "grad_checkpointing", False):
                return None
            if self._in_forward:
                plan = self.plan
                if plan is None or plan.layer != layer:
                    return None
                # Disarm first: at most one application per forward. (No counters here: under torch.compile
                # every Python value read in a hook becomes a guard, and a changing one recompiles each step.)
                self.plan, self._applied = None, plan
            else:
                # Outside the model's forward, only a checkpointed segment recomputed by the autograd engine
                # mixes again (torch.utils.checkpoint asks the engine the same private question).
                plan = self._applied
                if plan is None or plan.layer != layer or torch._C._current_graph_task_id() == -1:
                    return None
            if not isinstance(output, torch.Tensor):
                raise CatchupError(f"mixing layer {layer} outputs {type(output).__name__}, not a feature map")
            # Returning a new tensor replaces the module output; many stage modules end in in-place
            # ReLUs, so the mixing functions never write into `output`. Methods mix a [B, C, ...] view.
            layout = stage_layout(stage, output.shape, self.model)
            return restore_layout(self.mix_fn(channels_first(output, layout), plan), layout, like=output)
        return hook

    def _make_cond_hook(self, stage: Stage, stage_module: nn.Module):
        layer, slots = stage.layer, self.slots

        def mixed(h: torch.Tensor, index: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
            # lam is only for labels, made outside the model; NaN makes a stray read visible
            plan = MixPlan(layer, math.nan, index, math.nan, dict(zip(slots.extras, extras)))
            layout = stage_layout(stage, h.shape, self.model)
            return _standard_strides(restore_layout(self.mix_fn(channels_first(h, layout), plan), layout, like=h),
                                     memory_format_of(h))

        def unchanged(h: torch.Tensor, index: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
            return h.clone(memory_format=memory_format_of(h))

        def hook(module: nn.Module, inputs, output):
            if not module.training or module is not stage_module:
                return None
            if not isinstance(output, torch.Tensor):
                raise CatchupError(f"mixing layer {layer} outputs {type(output).__name__}, not a feature map")
            return torch.cond(slots.layer == layer, mixed, unchanged, (output, slots.index, *slots.extras.values()))
        return hook

    def arm(self, plan: MixPlan | None) -> None:
        self.plan = plan if plan is not None and plan.layer > 0 else None
        self._applied = None
        if self.slots is not None:
            self.slots.fill(self.plan)

    def disarm(self) -> None:
        self.plan = None
        if self.slots is not None:
            self.slots.layer.fill_(-1)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.plan = self._applied = None


def _standard_strides(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``t`` with the standard strides of its format (a copy only where they differ): torch.cond needs both
    branches' strides to agree, and size-1 dimensions let one layout carry several sets of strides."""
    shape = t.shape if memory_format == torch.contiguous_format else (t.shape[0], *t.shape[2:], t.shape[1])
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= size
    if memory_format == torch.channels_last:
        strides = [strides[0], strides[3], strides[1], strides[2]]
    return t if tuple(t.stride()) == tuple(strides) else t.clone(memory_format=memory_format)


def smooth_one_hot(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Label-smoothed one-hot rows, timm's convention: off = s/N, on = 1 - s + s/N."""
    off = smoothing / num_classes
    out = torch.full((target.shape[0], num_classes), off, device=target.device, dtype=torch.float32)
    return out.scatter_(1, target.long().view(-1, 1), 1.0 - smoothing + off)


def soft_target(plan: MixPlan | None, target: torch.Tensor, num_classes: int,
                smoothing: float = 0.0) -> torch.Tensor:
    """The soft target of a batch mixed by ``plan`` (None: not mixed), on smoothed one-hot rows: the one place
    every method's labels are made."""
    y = smooth_one_hot(target, num_classes, smoothing)
    if plan is None:
        return y
    if plan.label_matrix is not None:
        return plan.label_matrix.to(y.device, y.dtype) @ y
    column = lambda w: w.to(y.device, y.dtype)[:, None]    # noqa: E731
    own = column(plan.own_weight) if plan.own_weight is not None else plan.lam_eff
    partner = column(plan.partner_weight) if plan.partner_weight is not None else 1.0 - own
    other = plan.partner_target.to(y.device, y.dtype) if plan.partner_target is not None \
        else y[plan.index.to(y.device)]
    return y * own + other * partner
