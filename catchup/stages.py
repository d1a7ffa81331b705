"""Stage discovery: which modules of a timm model feature-level mixing can act on, and their layouts.

Layer 0 is the input; layers 1..n are the modules listed in the model's timm ``feature_info`` (for a ResNet:
stem, then stages 1-4, the paper's K = {0..5}). A recipe may instead name layers by index or module name.

Each stage's output layout is one of timm's ``Format`` names: ``NCHW`` (CNNs), ``NHWC`` (Swin, MambaOut,
Sequencer: models whose ``output_fmt`` says so), ``NLC`` (ViT-style tokens [B, N, C], prefix tokens included)
or ``NCL``. One probe forward finds each stage's layout and refuses stages that cannot be hooked.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from catchup.errors import CatchupError

MIX_LAYERS_FIX = ("name hookable modules (each outputting one feature map) with mix_layers, "
                  "e.g. mix_layers: [0, 'layer1']")
# timm's Format names (timm.layers.Format) and the axis of their channels; plain strings, so that the hook can
# read them under torch.compile.
CHANNEL_DIM = {"NCHW": 1, "NHWC": 3, "NLC": 2, "NCL": 1}


@dataclass(frozen=True)
class Stage:
    layer: int                 # 0 = input, k > 0 = the k-th mixing layer
    module_name: str | None    # None for the input
    channels: int | None       # None until known (named modules outside feature_info)
    layout: str | None = None  # a timm Format name ('NCHW', 'NHWC', 'NLC', 'NCL'); None until probed


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
        return _hookable(base, default, modules)
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
    return _hookable(base, numbered, modules)


def probe_channels(model: nn.Module, stages: list[Stage], input_size: Sequence[int] | None = None) -> list[Stage]:
    """Each stage with its channel count and layout, from one no-grad eval forward of a single zero image.

    The probe also refuses, naming the model and the fix, stages the mixer could not act on: modules the
    forward never calls (a hook on them never fires) and modules whose output is not one feature map (tuples,
    lists, flat vectors). Without an input size (none given, none in the model's ``pretrained_cfg``) a model
    whose channel counts all come from feature_info is not probed: its layouts are read from the first output
    the hook mixes (``stage_layout``).
    """
    named = [s for s in stages if s.module_name]
    if not named:
        return stages
    base = unwrap_model(model)
    if input_size is None:
        cfg = getattr(base, "pretrained_cfg", None) or getattr(base, "default_cfg", None) or {}
        input_size = cfg.get("input_size")
    if input_size is None:
        if all(s.channels is not None for s in named):
            return stages
        raise CatchupError("cannot infer the stage channels: pass input_size=(C, H, W) to the mixer")
    modules = dict(base.named_modules())
    seen: dict[str, torch.Size | str] = {}

    def record(name):
        def hook(module, inputs, output):   # returns None: the output is left alone
            seen.setdefault(name, output.shape if isinstance(output, torch.Tensor) else type(output).__name__)
        return hook

    # A Sequential stage is also recorded at its last module, which gradient checkpointing calls in its place
    handles = [m.register_forward_hook(record(s.module_name)) for s in named
               for m in {modules[s.module_name], sequential_tail(modules[s.module_name])}]
    param = next(base.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = base.training
    try:
        base.eval()
        with torch.no_grad():
            base(torch.zeros(1, *input_size, device=device))
    except (RuntimeError, ValueError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CatchupError(f"model {model_label(base)} failed a forward at input_size {tuple(input_size)} "
                           f"({first}); pass the size it takes as input_size") from err
    finally:
        base.train(was_training)
        for h in handles:
            h.remove()
    declared = declared_format(base)
    probed = []
    for s in stages:
        if s.module_name is None:
            probed.append(s)
            continue
        where = f"model {model_label(base)}: module {s.module_name!r}"
        out = seen.get(s.module_name)
        if out is None and getattr(base, "grad_checkpointing", False):
            raise CatchupError(f"{where} is never called by the forward: gradient checkpointing (timm's "
                               "--grad-checkpointing) bypasses it; turn it off or leave this layer out of mix_layers")
        if out is None:
            raise CatchupError(f"{where} is never called by the forward, so a hook on it cannot mix; {MIX_LAYERS_FIX}")
        if isinstance(out, str):
            raise CatchupError(f"{where} outputs a {out}, not one feature map; {MIX_LAYERS_FIX}")
        layout = infer_layout(out, s.channels, declared, where)
        channels = s.channels if s.channels is not None else int(out[CHANNEL_DIM[layout]])
        probed.append(Stage(s.layer, s.module_name, channels, layout))
    return probed


def sequential_tail(module: nn.Module) -> nn.Module:
    """The module whose output a (nested) nn.Sequential returns: its last module, followed down."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[-1]
    return module


def infer_layout(shape: Sequence[int], channels: int | None, declared: str | None = None,
                 where: str = "a mixing layer") -> str:
    """The layout of a stage output of this shape: the axis holding the stage's channel count.

    timm's ``output_fmt`` (``declared``) decides when the count is unknown or two axes hold it, else timm's
    defaults: NCHW for 4-d maps, NLC for 3-d token maps.
    """
    if len(shape) == 4:
        options = ("NCHW", "NHWC")
    elif len(shape) == 3:
        options = ("NLC", "NCL")
    else:
        raise CatchupError(f"{where} outputs a tensor of shape {tuple(shape)}, not a feature map "
                           f"([B, C, H, W], [B, H, W, C] or tokens [B, N, C]); {MIX_LAYERS_FIX}")
    default = declared if declared in options else options[0]
    if channels is None:
        return default
    fits = [f for f in options if shape[CHANNEL_DIM[f]] == channels]
    if not fits:
        raise CatchupError(f"{where} outputs shape {tuple(shape)}, with no axis of the {channels} channels "
                           f"its feature_info states; {MIX_LAYERS_FIX}")
    return default if default in fits else fits[0]


def stage_channels(model: nn.Module) -> dict[str, int]:
    """{module name: channel count} of the model's feature_info stages; empty for a model without one."""
    if not getattr(unwrap_model(model), "feature_info", None):
        return {}
    return {s.module_name: s.channels for s in feature_stages(model)[1:]}


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor stored NHWC (and not also plainly contiguous), else contiguous_format."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def stage_layout(stage: Stage, shape: Sequence[int], model: nn.Module) -> str:
    """The stage's probed layout, or (for a model built without an input size) the one this output shows."""
    if stage.layout is not None:
        return stage.layout
    return infer_layout(shape, stage.channels, declared_format(model),
                        f"model {model_label(model)}: module {stage.module_name!r}")


def declared_format(model: nn.Module) -> str | None:
    """The model's timm ``output_fmt`` (Swin, MambaOut, Sequencer: 'NHWC'), or None where it declares none."""
    fmt = getattr(unwrap_model(model), "output_fmt", None)
    fmt = getattr(fmt, "value", fmt)     # a timm Format member or its string
    return fmt if fmt in CHANNEL_DIM else None


def model_label(model: nn.Module) -> str:
    """The timm model name where the model has one, else its class name (for error messages)."""
    base = unwrap_model(model)
    cfg = getattr(base, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(base).__name__


def _hookable(model: nn.Module, stages: list[Stage], modules: dict[str, nn.Module]) -> list[Stage]:
    """The stages, refused if feature_info names a module the model does not have (hrnet names 'stem')."""
    for s in stages:
        if s.module_name is not None and s.module_name not in modules:
            raise CatchupError(f"model {model_label(model)}: its feature_info names {s.module_name!r}, which is not "
                               f"a module of the model, so it cannot be hooked; {MIX_LAYERS_FIX}")
    return stages
