"""``torch.compile`` that mixing never recompiles: the whole model as one graph, or regions around the hooks.

Compiling the whole model puts the stage hooks inside the compiled code, and dynamo guards on the Python
values they read (the plan's layer, whether a plan is armed): a plain hook recompiles for every layer a mixer
picks. ``compile_model`` picks one of two designs:

- **One graph** (``compile_whole``), when the mixer's stage hooks are the model's only inner hooks and its
  feature plans carry only tensors (none, the input-level methods, Manifold Mixup, MoEx, Catch-up Mix): the
  hooks read the plan from fixed tensors through ``torch.cond(layer == k, mix, copy)`` (``StageHooks.
  use_one_graph``), so every plan (any layer, no mixing, any lambda) runs one training graph, with nothing
  cut out of it.
- **Regions** (``compile_regions``) otherwise (AlignMix's plans hold a Python direction; the filter tracker
  switches its hooks on and off, which dynamo would not notice): only the ``forward`` of each *region* is
  compiled, the largest submodules with no hooked module strictly inside them. Forward hooks run in
  ``Module.__call__``, outside ``forward``, so they stay eager between compiled regions; the cuts cost
  fusion across them (34-45 % of a CPU ResNet-18 step, README).

Either way state-dict keys are unchanged (no ``_orig_mod.`` wrapper), so checkpoints and weights are the same
whether a run is compiled or not. Shapes are static: evaluation pads its last, smaller batch (``pad_batch``)
instead of recompiling for it. Each graph is compiled once per kind of call (training, evaluation).
"""
from __future__ import annotations

import types
from collections import Counter
from typing import Callable

import torch
from torch import nn

from catchup.errors import CatchupError
from catchup.stages import memory_format_of

Backend = str | Callable


def compile_backend(value: bool | str) -> str | None:
    """The recipe's ``torchcompile`` in timm's form: false -> None, true -> 'inductor', or a backend name."""
    if value is False:
        return None
    if value is True:
        return "inductor"
    known = torch._dynamo.list_backends(exclude_tags=())
    if value not in known:
        raise CatchupError(f"torchcompile: unknown backend {value!r}; use true (inductor), false, or one of "
                           f"{', '.join(sorted(known))}")
    return value


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def compile_model(model: nn.Module, backend: Backend, mixer=None) -> str:
    """Compile ``model`` in place for training with ``mixer`` (register every hook first); says how."""
    hooks = getattr(mixer, "hooks", None)
    template = mixer.feature_plan_template() if hooks is not None else None
    plans_are_tensors = template is None or hooks.fits_one_graph(template)
    if _other_hooks(model, hooks.handle_ids() if hooks is not None else set()) or not plans_are_tensors:
        return f"{len(compile_regions(model, backend))} compiled regions around the hooked modules"
    if hooks is not None:
        hooks.use_one_graph(template)
    compile_whole(model, backend)
    return "one compiled graph" + (" (mixing through torch.cond at each stage)" if hooks is not None else "")


def _other_hooks(model: nn.Module, own: set[int]) -> bool:
    """Whether a module inside the model has a forward hook other than ``own`` (handle ids) or a pre-hook."""
    return any(set(m._forward_hooks) - own or m._forward_pre_hooks for m in model.modules() if m is not model)


def compile_whole(model: nn.Module, backend: Backend = "inductor", **options) -> None:
    """``torch.compile`` of the model's ``forward``, in place, on a copy of its code object: dynamo caches per
    code object and does not guard on module hooks, so another model of the class, with other hooks, must not
    share the cache. Options go to ``torch.compile`` (``dynamic`` defaults to False)."""
    options.setdefault("dynamic", False)
    if backend == "inductor" and not _channels_last(model):
        # Inductor's layout optimisation gives a torch.cond branch strides its traced fake tensors did not have
        # (a stride assertion fails at run time): keep the model's own layout; set channels_last to get NHWC.
        options.setdefault("options", {"layout_optimization": False})
    func = type(model).forward
    own = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                             func.__closure__)
    model.forward = types.MethodType(torch.compile(own, backend=backend, **options), model)


def _channels_last(model: nn.Module) -> bool:
    return any(memory_format_of(p) == torch.channels_last for p in model.parameters())


def compile_regions(model: nn.Module, backend: Backend = "inductor", **options) -> list[str]:
    """Compile, in place, the ``forward`` of each region of ``model``; returns the region names.

    A region is a submodule none of whose strict descendants has a forward (pre-)hook; the model itself when
    nothing inside it is hooked. Register the mixer's (and any tracker's) hooks first. Options go to
    ``torch.compile`` (``dynamic`` defaults to False).
    """
    options.setdefault("dynamic", False)
    regions: list[tuple[str, nn.Module]] = []

    def visit(name: str, module: nn.Module) -> None:
        inner_hooks = any(_hooked(m) for m in module.modules() if m is not module)
        if not inner_hooks:
            regions.append((name, module))
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    compiled_code: dict[types.CodeType, Callable] = {}
    for _, module in regions:
        if is_compiled_region(module):
            continue
        func = type(module).forward
        # One compiled function per forward code object, bound to each module: a deepcopy (an EMA model)
        # rebinds it to the copy, and modules of one class share dynamo's cache as they would anyway.
        if func.__code__ not in compiled_code:
            compiled_code[func.__code__] = torch.compile(func, backend=backend, **options)
        module.forward = types.MethodType(compiled_code[func.__code__], module)
    _raise_recompile_limit(Counter(type(m).forward.__code__ for _, m in regions))
    return [name or "(model)" for name, _ in regions]


def _raise_recompile_limit(shared: Counter) -> None:
    """Dynamo caches compiled code per code object, up to a limit (8) after which it silently runs eagerly.

    Regions of one class (the four stages of a ResNet) share their class's ``forward`` code, and each is
    compiled for training and evaluation (and an EMA copy may add its own), so the limit must cover them all.
    """
    needed = 4 * max(shared.values(), default=1)
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), needed))


def is_compiled_region(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return hasattr(getattr(forward, "__func__", None), "_torchdynamo_orig_callable")


def is_compiled(model: nn.Module) -> bool:
    """True when any part of the model runs compiled code (regional or ``torch.compile(model)``)."""
    return any(is_compiled_region(m) or hasattr(m, "_orig_mod") for m in model.modules())


def uncompile(model: nn.Module) -> nn.Module:
    """Drop the compiled forwards again (in place), e.g. on a copy that should run eagerly."""
    for module in model.modules():
        if is_compiled_region(module):
            del module.forward
    return model


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with its last sample repeated up to ``size`` rows (eval only: no sample sees another)."""
    missing = size - x.shape[0]
    if missing <= 0:
        return x
    return torch.cat([x, x[-1:].expand(missing, *x.shape[1:])]).contiguous(memory_format=memory_format_of(x))



class PaddedEval(nn.Module):
    """Wraps a compiled model for evaluation: every batch is padded to the largest batch seen (the loader's
    batch size, from its first batch) and the padding's outputs dropped, so the last, smaller batch runs the
    same static-shape code as the others."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.batch_size = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        self.batch_size = max(self.batch_size, n)
        return self.model(pad_batch(x, self.batch_size))[:n]
