"""YAML training recipes: `_base_` inheritance, command-line overrides, typed checks, resolved dump.

A recipe is a flat YAML mapping whose keys are timm train.py option names where the concept exists.
`load_config("configs/x.yaml", ["--lr", "0.05"])` returns a checked `TrainConfig`; every mistake
(unknown key, wrong type, out-of-range value, broken file) raises a one-line `CatchupError`.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from catchup.config_checks import (
    ERASE_MODES, INTERPOLATIONS, LABEL_LAM, MIXER_ARGUMENTS, MODEL_ARGUMENTS, SCHEDULERS, SEED_MAX, WANDB_MODES, Rule,
    _check_opt, above, at_least, key, kwargs_collision, shown, suggest, value_problem, within,
)
from catchup.config_types import Mismatch, coerce, describe
from catchup.errors import CatchupError


MODEL, DATA, OPTIM, MIXING, BOOK = "model", "data", "optimisation", "mixing", "bookkeeping"
_FRACTION = within(0, 1, "[)")
_PAIR = "[min, max] with 0 < min <= max"


@dataclass
class TrainConfig:
    """Every recipe key, described once (see catchup/config_checks.py for `key` and the rules)."""
    model: str = key("preactresnet18", "timm model name (`import catchup.models` registers the project's CIFAR "
                     "variants with timm)", group=MODEL)
    model_kwargs: dict = key({}, "extra keyword arguments for timm.create_model", group=MODEL)
    pretrained: bool = key(False, "load timm pretrained weights", group=MODEL)
    num_classes: int | None = key(None, "None = from the dataset", at_least(1), group=MODEL)
    drop_rate: float = key(0.0, "dropout before the classifier (timm --drop)", _FRACTION, group=MODEL)
    drop_path: float | None = key(None, "stochastic depth rate, for models that support it", _FRACTION, group=MODEL)

    dataset: str = key("digits", "dataset name known to catchup.data", group=DATA)
    data_dir: str | None = key(None, "dataset root folder", group=DATA, resumable=True)
    download: bool = key(False, "let torchvision download the dataset when it is missing", group=DATA,
                         resumable=True)
    train_fraction: float = key(1.0, "share of each class kept for training (per-class subsets)",
                                within(0, 1, "(]"), group=DATA)
    input_size: int | None = key(None, "square input side; None = the model's default", at_least(1), group=DATA)
    workers: int = key(2, "DataLoader worker processes", at_least(0), group=DATA, resumable=True)
    train_split: str = key("train", "training split of hfds/<name> and wds/<name> data (timm --train-split)",
                           group=DATA)
    val_split: str = key("validation", "evaluation split of hfds/<name> and wds/<name> data (timm --val-split)",
                         group=DATA)
    aug_repeats: float = key(0, "repeated augmentation: each image this many times per epoch (timm "
                             "RepeatAugSampler); 0 = off", Rule("0 (off) or >= 1", lambda v: v == 0 or v >= 1),
                             group=DATA)
    aa: str | None = key(None, "ImageNet-style data: auto-augment policy, e.g. rand-m7-mstd0.5-inc1 (timm --aa)",
                         group=DATA)
    reprob: float = key(0.0, "ImageNet-style data: random erasing probability", within(0, 1), group=DATA)
    remode: str = key("pixel", "ImageNet-style data: random erasing fill", group=DATA,
                      choices=ERASE_MODES)
    recount: int = key(1, "ImageNet-style data: random erasing count", at_least(1), group=DATA)
    scale: list[float] = key([0.08, 1.0], "ImageNet-style data: random-resized-crop area range",
                             Rule(_PAIR + " <= 1", lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1), group=DATA)
    ratio: list[float] = key([3 / 4, 4 / 3], "ImageNet-style data: random-resized-crop aspect range",
                             Rule(_PAIR, lambda v: len(v) == 2 and 0 < v[0] <= v[1]), group=DATA)
    hflip: float = key(0.5, "ImageNet-style data: horizontal flip probability", within(0, 1), group=DATA)
    vflip: float = key(0.0, "ImageNet-style data: vertical flip probability", within(0, 1), group=DATA)
    color_jitter: float = key(0.4, "ImageNet-style data: color jitter factor (timm turns it off when aa is set)",
                              at_least(0), group=DATA)
    train_interpolation: str = key("random", "ImageNet-style data: training resize interpolation (random = "
                                   "bilinear/bicubic)", group=DATA, choices=("random", *INTERPOLATIONS))
    crop_pct: float | None = key(None, "ImageNet-style data: eval center-crop fraction; None = the model's (timm)",
                                 within(0, 1, "(]"), group=DATA)
    interpolation: str | None = key(None, "ImageNet-style data: eval resize interpolation; None = the model's "
                                    "(timm)", group=DATA, choices=INTERPOLATIONS)

    batch_size: int = key(128, "GLOBAL batch across processes and accumulation", at_least(1), group=OPTIM)
    eval_batch_size: int | None = key(None, "None = batch_size", at_least(1), group=OPTIM, resumable=True)
    epochs: int = key(100, "training epochs", at_least(1), group=OPTIM, resumable=True)
    max_steps: int = key(0, "stop after this many optimizer steps; 0 = no limit", at_least(0), group=OPTIM,
                         resumable=True)
    opt: str = key("sgd", 'timm optimizer name (timm\'s "sgd" is Nesterov SGD)', group=OPTIM)
    lr: float = key(0.1, "peak learning rate", above(0), group=OPTIM)
    momentum: float = key(0.9, "optimizer momentum", _FRACTION, group=OPTIM)
    weight_decay: float = key(1e-4, "weight decay (timm skips bias and norm parameters)", at_least(0), group=OPTIM)
    sched: str = key("multistep", "lr schedule (timm's, or none for a constant lr)", group=OPTIM, choices=SCHEDULERS)
    decay_milestones: list[int] = key([], "epochs at which lr is multiplied by decay_rate (multistep: none = a "
                                      "constant lr after warmup)", Rule("strictly ascending and > 0", lambda v: all(
                                          a < b for a, b in zip([0] + v, v))), group=OPTIM)
    decay_rate: float = key(0.1, "lr factor applied at each milestone", above(0), group=OPTIM)
    warmup_epochs: int = key(0, "linear warmup epochs", at_least(0), group=OPTIM)
    warmup_lr: float = key(1e-5, "lr at the start of warmup", at_least(0), group=OPTIM)
    min_lr: float = key(0.0, "floor for decaying schedules", at_least(0), group=OPTIM)
    smoothing: float = key(0.0, "label smoothing", _FRACTION, group=OPTIM)
    bce_loss: bool = key(False, "binary cross-entropy instead of soft-target cross-entropy", group=OPTIM)
    bce_target_thresh: float | None = key(None, "with bce_loss: targets above it become 1, the rest 0 (RSB A2: "
                                          "0.2)", within(0, 1, "()"), group=OPTIM)
    model_ema: bool = key(False, "keep an exponential moving average of the weights", group=OPTIM)
    model_ema_decay: float = key(0.9998, "EMA decay per optimizer step", within(0, 1, "()"), group=OPTIM)
    channels_last: bool = key(False, "channels-last memory format", group=OPTIM)
    # resumable: compiled regions compute what the eager modules compute (tested bit for bit)
    torchcompile: bool | str = key(False, "torch.compile the model: true (inductor), false, or a backend name",
                                   group=OPTIM, resumable=True)
    grad_accum_steps: int = key(1, "micro-batches per optimizer step", at_least(1), group=OPTIM)
    clip_grad: float | None = key(None, "gradient norm clipping; None = off", above(0), group=OPTIM)
    seed: int = key(0, "random seed", within(0, SEED_MAX), group=OPTIM)

    mix: str = key("none", "mixing method", group=MIXING)       # the choices live in the mixer registry
    mix_prob: float | None = key(None, "share of batches mixed; None = the method's (1; MoEx 0.25; SaliencyMix, "
                                 "SnapMix 0.5)", within(0, 1), group=MIXING)
    mix_alpha: float | None = key(None, "Beta(alpha, alpha) for the mixing ratio; None = the method's default",
                                  above(0), group=MIXING)
    cutmix_alpha: float = key(1.0, "Beta(alpha, alpha) for CutMix boxes (layer 0 of feature-level methods)",
                              above(0), group=MIXING)
    cutmix_minmax: list[float] | None = key(None, "CutMix box size range as image fractions, instead of "
                                            "cutmix_alpha", Rule("[min, max] with 0 <= min < max <= 1", lambda v:
                                                                 len(v) == 2 and 0 <= v[0] < v[1] <= 1),
                                            group=MIXING)
    mix_layers: list[int | str] | None = key(None, "stages to mix at (0 = input, or module names); None = all",
                                             Rule("a non-empty list of stage indices >= 0 or module names",
                                                  lambda v: len(v) > 0 and all(isinstance(x, str) or x >= 0
                                                                               for x in v)), group=MIXING)
    mix_layer_weights: list[float] | None = key(None, "sampling weights of mix_layers; None = uniform",
                                                Rule("non-negative with a positive sum",
                                                     lambda v: all(w >= 0 for w in v) and sum(v) > 0), group=MIXING)
    label_lam: str = key("exact", "label weight: exact kept share (floor(lam*C)/C) or the sampled lam",
                         group=MIXING, choices=LABEL_LAM)
    mixup_off_epoch: int = key(0, "stop mixing from this epoch on; 0 = never", at_least(0), group=MIXING)
    mix_kwargs: dict = key({}, "method-specific options passed to build_mixer", group=MIXING)

    output: str = key("runs/default", "run folder: checkpoints, resolved config.yaml, logs", group=BOOK,
                      resumable=True)
    eval_every: int = key(1, "evaluate every this many epochs", at_least(1), group=BOOK, resumable=True)
    eval_last: int = key(0, "also evaluate after each of the last this many epochs (median_last10_top1 uses "
                         "them)", at_least(0), group=BOOK, resumable=True)
    checkpoint_every_steps: int = key(0, "extra mid-epoch checkpoints; 0 = only at epoch ends", at_least(0),
                                      group=BOOK, resumable=True)
    checkpoint_keep: int = key(2, "checkpoints kept on disk", at_least(1), group=BOOK, resumable=True)
    log_every: int = key(10, "log training metrics every this many optimizer steps", at_least(1), group=BOOK,
                         resumable=True)
    wandb_mode: str = key("auto", "W&B mode; auto = online when W&B credentials are present, else offline",
                          group=BOOK, choices=WANDB_MODES, resumable=True)
    wandb_project: str = key("catchup", "W&B project", group=BOOK, resumable=True)
    wandb_entity: str | None = key(None, "W&B team or user; None = the default entity", group=BOOK, resumable=True)
    wandb_name: str | None = key(None, "W&B run name; None = generated", group=BOOK, resumable=True)
    wandb_tags: list[str] = key([], "W&B run tags", group=BOOK, resumable=True)
    wandb_group: str | None = key(None, "W&B group; catchup.sweep sets it to the sweep's name", group=BOOK,
                                  resumable=True)
    wandb_log_model: bool = key(False, "log the final weights as a W&B model artifact (config.json + "
                                "model.safetensors)", group=BOOK, resumable=True)
    track_filters: bool = key(False, "log filter-influence statistics during training", group=BOOK)
    track_filters_every: int = key(100, "optimizer steps between filter statistics", at_least(1), group=BOOK)


KEYS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Keys that may differ on `--resume`: how long the run goes on (the lr schedule is rebuilt for a new `epochs`),
# where the data and workers come from, how often it is evaluated, logged and checkpointed, and W&B. None of them
# changes what an optimizer step computes; every other key is the run's identity.
RESUMABLE: tuple[str, ...] = tuple(name for name, f in KEYS.items() if f.metadata["resumable"])
_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)
FIELDS: tuple[str, ...] = tuple(KEYS)
CLI = "on the command line"


# PyYAML follows YAML 1.1, which reads `1e-4` (no dot) as a string; recipes are full of such learning
# rates and weight decays, so both the loader and the dumper also treat them as floats.
class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):
                break       # the base class refuses it with its own "found unhashable key"
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
    try:
        return yaml.load(text, Loader=_Loader)
    except RecursionError:      # PyYAML's parser recurses once per bracket
        raise yaml.YAMLError("brackets nested too deeply") from None


def _check_layer(data: Mapping[Any, Any], where: str) -> dict[str, Any]:
    """One recipe layer (a file or the command line) with keys checked and values converted."""
    out = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in _TYPES:
            raise CatchupError(f"unknown recipe key {shown(key)} {where}; {suggest(str(key), FIELDS)}")
        try:
            out[key] = coerce(value, _TYPES[key])
        except Mismatch:
            raise CatchupError(f"recipe key {key!r} expects {describe(_TYPES[key])}, "
                               f"got {shown(value)} ({type(value).__name__}) {where}") from None
    return out


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
        raise CatchupError(f"`_base_` in {path} must be a path or a list of paths, got {shown(bases)}")
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
        except yaml.YAMLError as err:
            shown = text if len(text) <= 60 else text[:50] + "..."
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise CatchupError(f"cannot parse the value {shown!r} of --{name} as YAML: {problem}") from None
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
    """Raise CatchupError for the first value of the wrong type, out of its range or choices, or at odds with
    another key. `sources` maps keys to where they were set ("in configs/x.yaml"), for the message."""
    sources = sources or {}

    def fail(key: str, why: str) -> typing.NoReturn:
        where = f" (set {sources[key]})" if key in sources else ""
        raise CatchupError(f"recipe key {key!r} {why}, got {shown(getattr(cfg, key))}{where}")

    for name, f in KEYS.items():
        value = getattr(cfg, name)
        problem = value_problem(value)       # first: nan would pass the equality below and every range
        if problem:
            fail(name, problem)
        try:     # configs built in code skip load_config's type checks; a scalar where a list belongs is not fine
            if coerce(value, _TYPES[name]) != value:
                raise Mismatch
        except Mismatch:
            fail(name, f"expects {describe(_TYPES[name])}")
        if value is None:
            continue
        if f.metadata["choices"] and value not in f.metadata["choices"]:
            fail(name, f"must be one of {', '.join(f.metadata['choices'])}")
        rule = f.metadata["rule"]
        if rule is not None and not rule.test(value):
            fail(name, f"must be {rule.text}" + (" or null" if type(None) in typing.get_args(_TYPES[name]) else ""))
    if cfg.decay_milestones and cfg.decay_milestones[-1] >= cfg.epochs:
        fail("decay_milestones", f"must all be < epochs ({cfg.epochs})")
    if cfg.sched == "step" and not cfg.decay_milestones:
        fail("decay_milestones", "needs one entry with sched: step (the lr decays every decay_milestones[0] epochs)")
    if cfg.batch_size % cfg.grad_accum_steps:
        fail("batch_size", f"(the global batch) must be divisible by grad_accum_steps ({cfg.grad_accum_steps})")
    if cfg.bce_target_thresh is not None and not cfg.bce_loss:
        fail("bce_target_thresh", "applies to binary cross-entropy only: set bce_loss: true")
    if cfg.mix_layers is not None and cfg.mix_layer_weights is not None \
            and len(cfg.mix_layers) != len(cfg.mix_layer_weights):
        fail("mix_layer_weights", f"must have one weight per entry of mix_layers ({len(cfg.mix_layers)})")
    mixing_keys = {name: name for name, f in KEYS.items() if f.metadata["group"] == MIXING}
    for name, passed in (("mix_kwargs", {**mixing_keys, **MIXER_ARGUMENTS}), ("model_kwargs", MODEL_ARGUMENTS)):
        problem = kwargs_collision(getattr(cfg, name), passed)
        if problem:
            fail(name, problem)
    if isinstance(cfg.torchcompile, str):
        from catchup.compile import compile_backend   # imports dynamo: only when a backend is named
        try:
            compile_backend(cfg.torchcompile)
        except CatchupError:
            fail("torchcompile", "must be true (inductor), false, or a name from torch._dynamo.list_backends()")
    why = _check_opt(cfg.opt)
    if why:
        fail("opt", f"is not a timm optimizer name ({why})")
