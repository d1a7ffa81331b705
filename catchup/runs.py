"""A run folder: the resolved recipe, atomic rotated checkpoints, final weights, and loading a run back.

    <output>/config.yaml              resolved recipe (rerun with --config)
    <output>/summary.csv              one row per epoch
    <output>/checkpoints/step_%08d/   Accelerate states + named parts + manifest.json (catchup.resume)
    <output>/checkpoints/latest       name of the newest complete checkpoint
    <output>/model.safetensors        final weights, loadable by timm (`timm.models.load_checkpoint`)
    <output>/model_ema.safetensors    final EMA weights (when model_ema is on)
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import catchup.models  # noqa: F401  (registers the CIFAR models with timm)
from catchup.config import TrainConfig, load_config
from catchup.data import DataInfo, build_datasets
from catchup.data.augment import Augment
from catchup.errors import CatchupError
from catchup.rundir import CHECKPOINTS, checkpoint_dir, latest_checkpoint, staging_dir  # noqa: F401  (re-exported)

WEIGHTS = {"final": "model.safetensors", "ema": "model_ema.safetensors"}


def build_model(cfg: TrainConfig, info: DataInfo) -> nn.Module:
    """The timm model a recipe names, sized for the dataset (classes, channels)."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    if info.num_classes < 2:
        raise CatchupError(f"dataset {cfg.dataset!r} has {info.num_classes} class: a classifier needs at least 2 "
                           "(check data_dir)")
    num_classes = cfg.num_classes or info.num_classes
    if num_classes != info.num_classes:
        raise CatchupError(f"num_classes is {cfg.num_classes} but dataset {cfg.dataset!r} has {info.num_classes}")
    try:
        return timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes,
                                 in_chans=info.in_chans, drop_rate=cfg.drop_rate, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise CatchupError(f"unknown model {cfg.model!r}: not a timm model nor one of catchup.models") from None
        raise CatchupError(f"cannot build model {cfg.model!r}: {str(err).splitlines()[0]}") from None
    except TypeError as err:
        raise CatchupError(f"model {cfg.model!r} does not accept these model_kwargs: {err}") from None


def check_norm_batch(model: nn.Module, per_device: int) -> None:
    """BatchNorm in training needs two samples per device: one makes its variance 0 (and torch raises mid-epoch)."""
    if per_device < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise CatchupError(f"batch_size gives {per_device} sample per device and per accumulation step, and the "
                           f"model has BatchNorm, which needs at least 2: raise batch_size")


def save_weights(model: nn.Module, path: Path) -> None:
    """timm-loadable safetensors, written to a temporary name and renamed."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(state, str(tmp))
    except Exception as err:  # safetensors reports a full disk as its own error type, not as OSError
        tmp.unlink(missing_ok=True)
        if "No space left on device" not in str(err):
            raise
        raise CatchupError(f"no space left on the device of {path.parent} while writing {path.name}; the run's "
                           f"checkpoints are kept: free some space and continue with --resume") from None
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: Path) -> None:
    if not path.exists():
        raise CatchupError(f"weights file {path} does not exist (did the run finish?)")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise CatchupError(f"cannot read weights {path}: {str(err).splitlines()[0]}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, model has {tuple(own[wrong[0]].shape)}")
        raise CatchupError(f"weights {path} do not fit model {type(model).__name__} of the run's config: {detail}")
    model.load_state_dict(state)


def save_data_info(output: Path, info: DataInfo, classes: list[str] | None = None) -> None:
    """What the model was built for (classes, channels, size, normalisation), so loading a run needs no data;
    the class names too where the dataset has them, so evaluation on another dataset is caught."""
    fields = {**dataclasses.asdict(info), **({"classes": list(classes)} if classes else {})}
    _write_atomic(output / "data_info.json", json.dumps(fields, indent=2) + "\n")


def load_data_info(run: Path) -> DataInfo | None:
    return _read_data_info(run)[0]


def load_class_names(run: Path) -> list[str] | None:
    return _read_data_info(run)[1]


def class_names(dataset) -> list[str] | None:
    """A dataset's class names (ImageFolder-style ``classes``), looking through subset and transform wrappers."""
    for _ in range(8):
        names = getattr(dataset, "classes", None)
        if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
            return list(names)
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            return None
    return None


def _read_data_info(run: Path) -> tuple[DataInfo | None, list[str] | None]:
    path = run / "data_info.json"
    if not path.exists():
        return None, None
    try:
        fields = json.loads(path.read_text())
        classes = fields.pop("classes", None)
        info = DataInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        if not isinstance(info.num_classes, int) or info.num_classes < 1:
            raise ValueError(f"num_classes {info.num_classes!r}")
        if classes is not None and (not isinstance(classes, list) or len(classes) != info.num_classes):
            raise ValueError(f"{len(classes) if isinstance(classes, list) else 'no'} class names for "
                             f"{info.num_classes} classes")
        return info, classes
    except (OSError, ValueError, TypeError, AttributeError) as err:   # bad JSON, a list, unknown or missing fields
        detail = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise CatchupError(f"{path} is damaged ({detail}); restore it from the run or delete it so that the "
                           f"dataset is read again") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: TrainConfig
    info: DataInfo
    model: nn.Module        # in eval mode, on the requested device
    weights: str            # 'final' or 'ema'


def load_run(run_dir: str | Path, weights: str = "final", device: str | torch.device = "cpu",
             data_dir: str | None = None) -> LoadedRun:
    """A finished run's model with its final (or EMA) weights, the recipe it was trained with, and its data info."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CatchupError(f"no such run folder: {run}")
    if weights not in WEIGHTS:
        raise CatchupError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if not (run / "config.yaml").exists():
        raise CatchupError(f"{run} has no config.yaml: not a catchup run folder")
    cfg = load_config(run / "config.yaml", {"data_dir": data_dir} if data_dir else ())
    info = load_data_info(run) or build_datasets(cfg.dataset, cfg.data_dir, input_size=cfg.input_size,
                                                  train_transform=False, augment=Augment.from_config(cfg),
                                                  num_classes=cfg.num_classes,
                                                  splits=(cfg.train_split, cfg.val_split))[2]
    model = build_model(cfg, info)
    load_weights(model, run / WEIGHTS[weights])
    return LoadedRun(run, cfg, info, model.to(device).eval(), weights)
