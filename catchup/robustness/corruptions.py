"""Common-corruption test sets (CIFAR-10/100-C, Tiny-ImageNet-C) and the mCE summary.

Published layouts (Hendrycks & Dietterich):
- CIFAR-C: `<root>/<corruption>.npy` of shape (50000, 32, 32, 3) uint8, rows [10000*(s-1), 10000*s) hold
  severity s; `<root>/labels.npy` has the matching 50000 labels (the test labels tiled five times).
- Tiny-ImageNet-C: `<root>/<corruption>/<severity 1..5>/<wnid>/*.JPEG`, 64x64 images.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, make_dataset

from catchup.errors import CatchupError

CIFAR_CORRUPTIONS_15: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
CIFAR_CORRUPTIONS_EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS_ALL: tuple[str, ...] = CIFAR_CORRUPTIONS_15 + CIFAR_CORRUPTIONS_EXTRA
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

Transform = Callable[[Any], Any] | None


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise CatchupError(f"corruption data folder {path} does not exist")
    return path


def _check_severity(severity: int) -> None:
    if severity not in SEVERITIES:
        raise CatchupError(f"corruption severity must be one of 1..5, got {severity}")


def _ordered(names: set[str]) -> list[str]:
    """Known corruptions in the canonical order, then any others alphabetically."""
    return [c for c in CORRUPTIONS_ALL if c in names] + sorted(names - set(CORRUPTIONS_ALL))


def available_corruptions(root: str | os.PathLike) -> list[str]:
    """Corruptions present under `root`, in either the CIFAR-C (.npy) or the Tiny-ImageNet-C (folder) layout."""
    path = _check_root(root)
    names = {p.stem for p in path.glob("*.npy") if p.stem != "labels"}
    names |= {p.name for p in path.iterdir() if p.is_dir() and any((p / str(s)).is_dir() for s in SEVERITIES)}
    return _ordered(names)


class CifarCorrupted(Dataset):
    """One (corruption, severity) slice of CIFAR-10/100-C; yields (transform(PIL image), int label).

    The .npy file is memory-mapped and opened lazily per process, so DataLoader workers never copy it.
    `image_size` is the side the model expects; a file holding other sizes is refused.
    """

    def __init__(self, root: str | os.PathLike, corruption: str, severity: int,
                 transform: Transform = None, image_size: int = 32) -> None:
        path = _check_root(root)
        _check_severity(severity)
        self.file = path / f"{corruption}.npy"
        if not self.file.is_file():
            known = ", ".join(available_corruptions(path)) or "none"
            raise CatchupError(f"corruption file {self.file} not found (available: {known})")
        labels_file = path / "labels.npy"
        if not labels_file.is_file():
            raise CatchupError(f"labels file {labels_file} not found next to the corruption files")
        labels = np.load(labels_file)
        if labels.ndim != 1 or labels.shape[0] % len(SEVERITIES) != 0:
            raise CatchupError(f"{labels_file} must hold a 1-D array of 5 x (test-set size) labels, "
                               f"got shape {labels.shape}")
        data = np.load(self.file, mmap_mode="r")
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3:
            raise CatchupError(f"{self.file} must hold (N, H, W, 3) uint8 images, got {data.shape} {data.dtype}")
        if data.shape[0] != labels.shape[0]:
            raise CatchupError(f"{self.file} holds {data.shape[0]} images but labels.npy has {labels.shape[0]} labels")
        if data.shape[1:3] != (image_size, image_size):
            raise CatchupError(f"{self.file} holds {data.shape[1]}x{data.shape[2]} images; "
                               f"the model expects {image_size}x{image_size}")
        self.per_severity = data.shape[0] // len(SEVERITIES)
        self.offset = self.per_severity * (severity - 1)
        self.labels = labels[self.offset:self.offset + self.per_severity].astype(np.int64)
        self.corruption, self.severity, self.transform = corruption, severity, transform
        self._data: np.ndarray | None = None

    def __len__(self) -> int:
        return self.per_severity

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self._data is None:
            self._data = np.load(self.file, mmap_mode="r")
        image = Image.fromarray(np.asarray(self._data[self.offset + index]))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def __getstate__(self) -> dict[str, Any]:
        # pickling a memmap would copy the whole array into every spawned worker
        state = self.__dict__.copy()
        state["_data"] = None
        return state


class TinyImageNetCorrupted(Dataset):
    """One (corruption, severity) folder of Tiny-ImageNet-C, labelled with the training set's `class_to_idx`."""

    def __init__(self, root: str | os.PathLike, corruption: str, severity: int, transform: Transform,
                 class_to_idx: dict[str, int], image_size: int = 64) -> None:
        path = _check_root(root)
        _check_severity(severity)
        folder = path / corruption / str(severity)
        if not folder.is_dir():
            known = ", ".join(available_corruptions(path)) or "none"
            raise CatchupError(f"corruption folder {folder} not found (available: {known})")
        present = {p.name for p in folder.iterdir() if p.is_dir()}
        unknown = sorted(present - set(class_to_idx))
        missing = sorted(set(class_to_idx) - present)
        if unknown or missing:
            raise CatchupError(f"{folder} class folders differ from the training classes "
                               f"(missing: {missing[:3]}, unknown: {unknown[:3]})")
        try:
            self.samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as err:
            raise CatchupError(f"{folder}: {err}".replace("\n", " ")) from None
        with Image.open(self.samples[0][0]) as first:
            if first.size != (image_size, image_size):
                raise CatchupError(f"{self.samples[0][0]} is {first.size[0]}x{first.size[1]}; "
                                   f"the model expects {image_size}x{image_size}")
        self.corruption, self.severity, self.transform = corruption, severity, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        file, label = self.samples[index]
        image = default_loader(file)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def corruption_summary(errors: dict[tuple[str, int], float]) -> dict[str, Any]:
    """Summarise top-1 errors (percent) keyed by (corruption, severity).

    Plain means, no AlexNet normalisation (the CIFAR-level mCE):
    `per_corruption` mean over severities; `per_severity` mean over corruptions; `mce_all` mean over all
    (corruption, severity) entries; `mce_15` the same over the 15 standard corruptions, None unless all 15
    are present (a partial number must not pass for the standard one); `corruptions` the names found.
    """
    if not errors:
        raise ValueError("no corruption errors to summarise")
    by_corruption: dict[str, list[float]] = {}
    by_severity: dict[int, list[float]] = {}
    for (name, severity), err in errors.items():
        by_corruption.setdefault(name, []).append(float(err))
        by_severity.setdefault(int(severity), []).append(float(err))
    names = _ordered(set(by_corruption))
    standard = [float(e) for (name, _), e in errors.items() if name in CIFAR_CORRUPTIONS_15]
    has_15 = set(CIFAR_CORRUPTIONS_15) <= set(by_corruption)
    return {
        "per_corruption": {name: float(np.mean(by_corruption[name])) for name in names},
        "per_severity": {s: float(np.mean(v)) for s, v in sorted(by_severity.items())},
        "mce_15": float(np.mean(standard)) if has_15 else None,
        "mce_all": float(np.mean(list(errors.values()))),
        "corruptions": names,
    }
