"""YAML training recipes: `_base_` inheritance, command-line overrides, typed checks, resolved dump.

A recipe is a flat YAML mapping whose keys are timm train.py option names where the concept exists.
`load_config("configs/x.yaml", ["--lr", "0.05"])` returns a checked `TrainConfig`; every mistake
(unknown key, wrong type, out-of-range value, broken file) raises a one-line `CatchupError`.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from catchup.config_checks import _CHOICES, _RANGES, _check_opt
from catchup.config_types import Mismatch, coerce, describe
from catchup.errors import CatchupError


@dataclass
class TrainConfig:
    # model
    model: str = "preactresnet18"  # timm model name (the project registers its CIFAR variants with timm)
    model_kwargs: dict = field(default_factory=dict)  # extra keyword arguments for timm.create_model
    pretrained: bool = False  # load timm pretrained weights
    num_classes: int | None = None  # None = from the dataset
    drop_rate: float = 0.0  # dropout before the classifier (timm --drop)
    drop_path: float | None = None  # stochastic depth rate, for models that support it
    # data
    dataset: str = "digits"  # dataset name known to catchup.data
    data_dir: str | None = None  # dataset root folder
    download: bool = False  # let torchvision download the dataset when it is missing
    train_fraction: float = 1.0  # share of each class kept for training (per-class subsets)
    input_size: int | None = None  # square input side; None = the model's default
    workers: int = 2  # DataLoader worker processes
    train_split: str = "train"  # training split of hfds/<name> and wds/<name> data (timm --train-split)
    val_split: str = "validation"  # evaluation split of hfds/<name> and wds/<name> data (timm --val-split)
    aug_repeats: float = 0  # repeated augmentation: each image this many times per epoch (timm RepeatAugSampler); 0 = off
    aa: str | None = None  # ImageNet-style data: auto-augment policy, e.g. rand-m7-mstd0.5-inc1 (timm --aa)
    reprob: float = 0.0  # ImageNet-style data: random erasing probability
    remode: str = "pixel"  # ImageNet-style data: random erasing fill: const, rand or pixel
    recount: int = 1  # ImageNet-style data: random erasing count
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # ImageNet-style data: random-resized-crop area range
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # ImageNet-style data: random-resized-crop aspect range
    hflip: float = 0.5  # ImageNet-style data: horizontal flip probability
    vflip: float = 0.0  # ImageNet-style data: vertical flip probability
    color_jitter: float = 0.4  # ImageNet-style data: color jitter factor (timm turns it off when aa is set)
    train_interpolation: str = "random"  # ImageNet-style data: training resize interpolation (random = bilinear/bicubic)
    crop_pct: float | None = None  # ImageNet-style data: eval center-crop fraction; None = the model's (timm)
    interpolation: str | None = None  # ImageNet-style data: eval resize interpolation; None = the model's (timm)
    # optimisation
    batch_size: int = 128  # GLOBAL batch across processes and accumulation
    eval_batch_size: int | None = None  # None = batch_size
    epochs: int = 100  # training epochs
    max_steps: int = 0  # stop after this many optimizer steps; 0 = no limit
    opt: str = "sgd"  # timm optimizer name (timm's "sgd" is Nesterov SGD)
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # optimizer momentum
    weight_decay: float = 1e-4  # weight decay (timm skips bias and norm parameters)
    sched: str = "multistep"  # lr schedule: multistep, step, cosine or none
    decay_milestones: list[int] = field(default_factory=list)  # epochs at which lr is multiplied by decay_rate
    decay_rate: float = 0.1  # lr factor applied at each milestone
    warmup_epochs: int = 0  # linear warmup epochs
    warmup_lr: float = 1e-5  # lr at the start of warmup
    min_lr: float = 0.0  # floor for decaying schedules
    smoothing: float = 0.0  # label smoothing
    bce_loss: bool = False  # binary cross-entropy instead of soft-target cross-entropy
    bce_target_thresh: float | None = None  # with bce_loss: targets above it become 1, the rest 0 (RSB A2: 0.2)
    model_ema: bool = False  # keep an exponential moving average of the weights
    model_ema_decay: float = 0.9998  # EMA decay per optimizer step
    channels_last: bool = False  # channels-last memory format
    torchcompile: bool | str = False  # torch.compile the model: true (inductor), false, or a backend name
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = None  # gradient norm clipping; None = off
    seed: int = 0  # random seed
    # mixing
    mix: str = "none"  # mixing method
    mix_prob: float | None = None  # share of batches mixed; None = the method's (1; MoEx 0.25; SaliencyMix, SnapMix 0.5)
    mix_alpha: float | None = None  # Beta(alpha, alpha) for the mixing ratio; None = the method's default
    cutmix_alpha: float = 1.0  # Beta(alpha, alpha) for CutMix boxes (layer 0 of feature-level methods)
    cutmix_minmax: list[float] | None = None  # CutMix box size range as image fractions, instead of cutmix_alpha
    mix_layers: list[int | str] | None = None  # stages to mix at (0 = input, or module names); None = all
    mix_layer_weights: list[float] | None = None  # sampling weights of mix_layers; None = uniform
    label_lam: str = "exact"  # label weight: exact kept share (floor(lam*C)/C) or the sampled lam
    mixup_off_epoch: int = 0  # stop mixing from this epoch on; 0 = never
    mix_kwargs: dict = field(default_factory=dict)  # method-specific options passed to build_mixer
    # bookkeeping
    output: str = "runs/default"  # run folder: checkpoints, resolved config.yaml, logs
    eval_every: int = 1  # evaluate every this many epochs
    eval_last: int = 0  # also evaluate after each of the last this many epochs (median_last10_top1 uses them)
    checkpoint_every_steps: int = 0  # extra mid-epoch checkpoints; 0 = only at epoch ends
    checkpoint_keep: int = 2  # checkpoints kept on disk
    log_every: int = 10  # log training metrics every this many optimizer steps
    wandb_mode: str = "auto"  # auto, online, offline or disabled
    wandb_project: str = "catchup"  # W&B project
    wandb_entity: str | None = None  # W&B team or user; None = the default entity
    wandb_name: str | None = None  # W&B run name; None = generated
    wandb_tags: list[str] = field(default_factory=list)  # W&B run tags
    wandb_group: str | None = None  # W&B group; catchup.sweep sets it to the sweep's name
    wandb_log_model: bool = False  # log the final weights as a W&B model artifact (config.json + model.safetensors)
    track_filters: bool = False  # log filter-influence statistics during training
    track_filters_every: int = 100  # optimizer steps between filter statistics


_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig))
CLI = "on the command line"

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


# PyYAML follows YAML 1.1, which reads `1e-4` (no dot) as a string; recipes are full of such learning
# rates and weight decays, so both the loader and the dumper also treat them as floats.
class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    def represent_list(self, data: list) -> yaml.SequenceNode:
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_Dumper.add_representer(list, _Dumper.represent_list)
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))


def _yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _check_layer(data: Mapping[Any, Any], where: str) -> dict[str, Any]:
    """One recipe layer (a file or the command line) with keys checked and values converted."""
    out = {}
    for key, value in data.items():
        if key not in _TYPES:
            raise CatchupError(f"unknown recipe key {key!r} {where}; {_suggest(str(key))}")
        try:
            out[key] = coerce(value, _TYPES[key])
        except Mismatch:
            raise CatchupError(f"recipe key {key!r} expects {describe(_TYPES[key])}, "
                               f"got {value!r} ({type(value).__name__}) {where}") from None
    return out


def _suggest(key: str) -> str:
    hint = _ALIASES.get(key.replace("-", "_").lower())
    if hint is None:
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = close[0] if close else None
    if hint is None:
        return "the valid keys are the fields of TrainConfig in catchup/config.py"
    return f"did you mean {hint!r}?" if hint in _TYPES else hint


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise CatchupError(f"cannot read recipe {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise CatchupError(f"recipe {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                           f"{err.start}); save it as UTF-8") from None
    try:
        data = _yaml_value(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).replace("\n", " ")
        raise CatchupError(f"cannot parse recipe {path}{line}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CatchupError(f"recipe {path} must be a mapping of `key: value` lines, "
                           f"got a {type(data).__name__}")
    return data


def _read_recipe(path: Path, chain: tuple[tuple[Path, str], ...] = ()) -> tuple[dict, dict]:
    """(values, where each value was set) of one recipe file with its `_base_` files merged under it."""
    real = path.resolve()
    if any(real == seen for seen, _ in chain):
        names = [shown for _, shown in chain] + [str(path)]
        raise CatchupError(f"recipe inheritance cycle: {' -> '.join(names)}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise CatchupError(f"`_base_` in {path} must be a path or a list of paths, got {bases!r}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for base in bases:
        base_path = Path(os.path.normpath(path.parent / os.path.expanduser(base)))
        if not base_path.is_file():
            raise CatchupError(f"recipe file not found: {base_path} (the `_base_` of {path})")
        base_values, base_sources = _read_recipe(base_path, chain + ((real, str(path)),))
        values.update(base_values)
        sources.update(base_sources)
    where = f"in {path}"
    own = _check_layer(data, where)
    values.update(own)
    sources.update(dict.fromkeys(own, where))
    return values, sources


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """`--key value`, `--key=value`, bare `--flag` (true) and `--no-flag` (false) as {key: value}.

    Dashes and underscores are interchangeable in keys; values are read as YAML (`0.05` -> float,
    `[0,1]` -> list, `null` -> None), except that keys expecting a string keep the text as typed.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise CatchupError(f"unexpected command-line argument {token!r}; "
                               "overrides look like --key value or --key=value")
        name, has_value, text = token[2:].partition("=")
        key = name.replace("-", "_")
        i += 1
        if not has_value and key.startswith("no_") and key[3:] in _TYPES:
            if not _takes_bool(_TYPES[key[3:]]):
                raise CatchupError(f"--{name}: recipe key {key[3:]!r} is not a true/false key")
            out[key[3:]] = False
            continue
        if not has_value and (i == len(argv) or argv[i].startswith("--")):
            if key in _TYPES and not _takes_bool(_TYPES[key]):
                raise CatchupError(f"--{name} needs a value (recipe key {key!r} expects {describe(_TYPES[key])})")
            out[key] = True
            continue
        if not has_value:
            text, i = argv[i], i + 1
        try:
            value = _yaml_value(text)
        except yaml.YAMLError:
            raise CatchupError(f"cannot parse the value {text!r} of --{name} as YAML") from None
        if key in _TYPES and _TYPES[key] in (str, str | None) and value is not None:
            value = text  # `--wandb-name 2024` names the run "2024"
        out[key] = value
    return out


def _takes_bool(tp: Any) -> bool:
    return tp is bool or bool in typing.get_args(tp)


def load_config(path: str | Path | None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> TrainConfig:
    """The recipe at `path` (None = defaults) with its `_base_` chain and the overrides applied, validated.

    `overrides` is command-line text (see parse_overrides) or an already parsed {key: value} mapping.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CatchupError(f"recipe file not found: {path}")
        values, sources = _read_recipe(path)
    parsed = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    cli = _check_layer(parsed, CLI)
    values.update(cli)
    sources.update(dict.fromkeys(cli, CLI))
    cfg = TrainConfig(**values)
    validate(cfg, sources)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Every recipe key with its value, in dataclass order (e.g. for the W&B run config)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: TrainConfig, path: str | Path, notes: Sequence[str] = ()) -> None:
    """Write the resolved recipe so that `load_config(path)` gives back an equal config; `notes` become comment
    lines under the header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, default_flow_style=False, sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    header = "".join(f"# {note}\n" for note in ("resolved recipe: rerun with --config " + path.name, *notes))
    tmp.write_text(header + body, encoding="utf-8")
    os.replace(tmp, path)  # readers never see a half-written file


def validate(cfg: TrainConfig, sources: Mapping[str, str] | None = None) -> None:
    """Raise CatchupError for the first value out of its range or choices.

    `sources` maps keys to where they were set ("in configs/x.yaml"), for the message.
    """
    sources = sources or {}

    def fail(key: str, why: str) -> typing.NoReturn:
        where = f" (set {sources[key]})" if key in sources else ""
        raise CatchupError(f"recipe key {key!r} {why}, got {getattr(cfg, key)!r}{where}")

    # configs built in code skip load_config's type checks; a scalar where a list belongs is not fine here
    for key, value in _check_layer(config_to_dict(cfg), "in the config").items():
        if value != getattr(cfg, key):
            fail(key, f"expects {describe(_TYPES[key])}")
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            fail(key, f"must be one of {', '.join(choices)}")
    for key, check, text in _RANGES:
        if not check(getattr(cfg, key)):
            fail(key, f"must be {text}")
    if cfg.decay_milestones and cfg.decay_milestones[-1] >= cfg.epochs:
        fail("decay_milestones", f"must all be < epochs ({cfg.epochs})")
    if cfg.batch_size % cfg.grad_accum_steps:
        fail("batch_size", f"(the global batch) must be divisible by grad_accum_steps ({cfg.grad_accum_steps})")
    if cfg.bce_target_thresh is not None and not cfg.bce_loss:
        fail("bce_target_thresh", "applies to binary cross-entropy only: set bce_loss: true")
    if cfg.mix_layers is not None and cfg.mix_layer_weights is not None \
            and len(cfg.mix_layers) != len(cfg.mix_layer_weights):
        fail("mix_layer_weights", f"must have one weight per entry of mix_layers ({len(cfg.mix_layers)})")
    if isinstance(cfg.torchcompile, str):
        from catchup.compile import compile_backend   # imports dynamo: only when a backend is named
        try:
            compile_backend(cfg.torchcompile)
        except CatchupError:
            fail("torchcompile", "must be true (inductor), false, or a name from torch._dynamo.list_backends()")
    why = _check_opt(cfg.opt)
    if why:
        fail("opt", f"is not a timm optimizer name ({why})")
