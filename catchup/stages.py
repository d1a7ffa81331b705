"""Stage discovery: which modules of a timm CNN feature-level mixing can act on.

Layer 0 is the input; layers 1..n are the modules listed in the model's timm ``feature_info`` (for a ResNet:
stem, then stages 1-4, the paper's K = {0..5}). A recipe may instead name layers by index or module name.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from catchup.errors import CatchupError


@dataclass(frozen=True)
class Stage:
    layer: int                 # 0 = input, k > 0 = the k-th mixing layer
    module_name: str | None    # None for the input
    channels: int | None       # None until known (named modules outside feature_info)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DDP/FSDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def feature_stages(model: nn.Module) -> list[Stage]:
    """The input plus one stage per timm ``feature_info`` entry; a clear error if the model has none."""
    info = getattr(unwrap_model(model), "feature_info", None)
    if not info:
        raise CatchupError(
            f"model {type(unwrap_model(model)).__name__} has no timm feature_info; "
            "name its stages explicitly, e.g. mix_layers: [0, 'layer1', 'layer2']")
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    return [Stage(0, None, None)] + [
        Stage(k + 1, e["module"], int(e["num_chs"])) for k, e in enumerate(entries)]


def resolve_stages(model: nn.Module, layers: Sequence[int | str] | None = None) -> list[Stage]:
    """The mixing layers a method samples from: every feature stage by default, else the named ones.

    Integers index into [input] + feature_info; strings are module names (``'input'`` is layer 0).
    Returned in the order given; each stage's ``layer`` is its index in the returned list's numbering
    (0 stays the input so that ``plan.layer == 0`` always means input-level mixing).
    """
    base = unwrap_model(model)
    modules = dict(base.named_modules())
    needs_info = layers is None or any(isinstance(v, int) and not isinstance(v, bool) and v != 0 for v in layers)
    default = feature_stages(base) if needs_info or getattr(base, "feature_info", None) else None
    if layers is None:
        return default
    if len(layers) == 0:
        raise CatchupError("mix_layers is empty: name at least one layer")
    by_name = {s.module_name: s for s in default or ()}
    chosen: list[Stage] = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, str)):
            raise CatchupError(f"mix_layers entry {layer!r} is neither a layer index nor a module name")
        if layer == 0 or layer == "input":
            stage = Stage(0, None, None)
        elif isinstance(layer, int):
            if not 0 < layer < len(default):
                raise CatchupError(
                    f"mix_layers index {layer} is out of range: this model has layers 0..{len(default) - 1} "
                    f"(0 = input, then {', '.join(s.module_name for s in default[1:])})")
            stage = default[layer]
        elif layer in modules:
            known = by_name.get(layer)
            stage = Stage(-1, layer, known.channels if known else None)
        else:
            near = difflib.get_close_matches(layer, list(modules), n=3)
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise CatchupError(f"mix_layers names module {layer!r}, which this model does not have{hint}")
        chosen.append(stage)
    names = [s.module_name for s in chosen]
    if len(set(names)) != len(names):
        raise CatchupError(f"mix_layers lists a layer twice: {list(layers)}")
    # Number the feature stages 1..n in the order given, keeping 0 for the input.
    numbered, k = [], 1
    for stage in chosen:
        if stage.module_name is None:
            numbered.append(Stage(0, None, None))
        else:
            numbered.append(Stage(k, stage.module_name, stage.channels))
            k += 1
    return numbered


def probe_channels(model: nn.Module, stages: list[Stage], input_size: Sequence[int] | None = None) -> list[Stage]:
    """Fill in unknown channel counts with one no-grad eval forward of a single zero image."""
    if all(s.channels is not None for s in stages if s.module_name):
        return stages
    base = unwrap_model(model)
    if input_size is None:
        cfg = getattr(base, "pretrained_cfg", None) or getattr(base, "default_cfg", None) or {}
        input_size = cfg.get("input_size")
    if input_size is None:
        raise CatchupError("cannot infer the stage channels: pass input_size=(C, H, W) to the mixer")
    modules = dict(base.named_modules())
    seen: dict[str, int] = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, _channels_of(output, name))   # returns None: the output is left alone
        return hook

    handles = [modules[s.module_name].register_forward_hook(record(s.module_name))
               for s in stages if s.module_name and s.channels is None]
    param = next(base.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = base.training
    try:
        base.eval()
        with torch.no_grad():
            base(torch.zeros(1, *input_size, device=device))
    finally:
        base.train(was_training)
        for h in handles:
            h.remove()
    return [Stage(s.layer, s.module_name, s.channels if s.channels is not None or not s.module_name
                  else seen.get(s.module_name)) for s in stages]


def _channels_of(output, name: str) -> int:
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        raise CatchupError(f"module {name!r} does not output a [B, C, H, W] feature map; it cannot be a mixing layer")
    return int(output.shape[1])
