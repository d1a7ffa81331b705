"""DataInfo and the train/eval transforms of each data family.

Fixed-size families (CIFAR, Tiny-ImageNet, Fashion-MNIST, digits) use `PadCropFlip`, a small tensor transform;
the ImageNet-style family uses timm's transforms (catchup/data/augment.py), the fine-grained family
torchvision.transforms.v2.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from catchup.data.augment import Augment, imagenet_eval_transform, imagenet_train_transform
from catchup.errors import CatchupError

# family -> (native side length, random-crop padding, horizontal flip). Fashion-MNIST: pad-2 crop + flip, the
# usual choice in mixup/random-erasing Fashion-MNIST runs (garment classes are mirror-symmetric). Digits: no flip
# (a mirrored 2, 3, 7 is not that digit), a shift of at most 1 pixel on 8x8 images.
FIXED_FAMILIES = {
    "cifar": (32, 4, True), "tinyimagenet": (64, 4, True), "mnist": (28, 2, True), "digits": (8, 1, False),
}


@dataclass(frozen=True)
class DataInfo:
    num_classes: int
    in_chans: int
    input_size: int  # side length of the training/eval crops
    mean: tuple[float, ...]  # per channel, in [0,1] pixel units
    std: tuple[float, ...]
    family: str  # 'cifar' | 'imagenet' | 'finegrained' | 'digits' | 'mnist' | 'tinyimagenet'
    crop_pct: float = 0.875  # imagenet family: eval resize to input_size / crop_pct, then center crop
    interpolation: str = "bilinear"  # imagenet family: eval resize interpolation


class PadCropFlip:
    """Zero-pad + random crop + optional horizontal flip + normalize, on uint8/float tensors (PIL accepted).

    Written by hand because a v2.Compose of the same four steps costs ~110-170 us per small image in dispatch
    overhead, this ~15 us. uint8 input is scaled by 1/255, float input is taken as already in [0, 1].
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], in_chans: int,
                 pad: int = 0, flip: bool = False) -> None:
        self.size, self.in_chans, self.pad, self.flip = size, in_chans, pad, flip
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._mul = 1.0 / std_t
        self._mul_u8 = 1.0 / (255.0 * std_t)
        self._add = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t

    def __call__(self, img: Any) -> torch.Tensor:
        x = _to_chw_tensor(img, self.in_chans)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            raise CatchupError(f"expected a {self.size}x{self.size} image, got {tuple(x.shape[-2:])}")
        if self.pad or self.flip:
            offsets = 2 * self.pad + 1
            # one draw for crop offsets and flip: torch's RNG is seeded per DataLoader worker
            r = int(torch.randint(offsets * offsets * (2 if self.flip else 1), ()))
            if self.flip:
                r, mirror = divmod(r, 2)
            else:
                mirror = 0
            if self.pad:
                i, j = divmod(r, offsets)
                x = F.pad(x, (self.pad,) * 4)[:, i:i + self.size, j:j + self.size]
            if mirror:
                x = x.flip(-1)
        mul = self._mul_u8 if x.dtype == torch.uint8 else self._mul
        return x.to(torch.float32).mul(mul).add_(self._add)

    def __repr__(self) -> str:
        return f"PadCropFlip(size={self.size}, pad={self.pad}, flip={self.flip})"


def _to_chw_tensor(img: Any, in_chans: int) -> torch.Tensor:
    if isinstance(img, Image.Image):
        img = img.convert("L" if in_chans == 1 else "RGB")
        return v2.functional.pil_to_tensor(img)
    if isinstance(img, np.ndarray):
        img = torch.from_numpy(np.ascontiguousarray(img))
        return img[None] if img.ndim == 2 else img.permute(2, 0, 1)
    return img[None] if img.ndim == 2 else img


def _normalize_tail(info: DataInfo) -> list[v2.Transform]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(info.mean, info.std), v2.ToPureTensor()]


def _finegrained_resize(info: DataInfo) -> int:
    return round(256 * info.input_size / 224)  # the 256 -> 224 recipe, scaled to other crop sizes


def build_train_transform(info: DataInfo, augment: Augment | None = None) -> Callable:
    """Training-time augmentation for `info.family`; input a PIL image (or CHW tensor), output normalized.

    `augment` (timm train.py's options) drives the imagenet family; the other families have fixed recipes.
    """
    if info.family in FIXED_FAMILIES:
        _, pad, flip = FIXED_FAMILIES[info.family]
        return PadCropFlip(info.input_size, info.mean, info.std, info.in_chans, pad=pad, flip=flip)
    s = info.input_size
    if info.family == "imagenet":
        return imagenet_train_transform(augment or Augment(), s, info.mean, info.std)
    if info.family == "finegrained":
        r = _finegrained_resize(info)
        head = [v2.Resize((r, r), antialias=True), v2.RandomCrop(s)]
    else:
        raise CatchupError(f"unknown data family {info.family!r}")
    return v2.Compose([*head, v2.RandomHorizontalFlip(), *_normalize_tail(info)])


def build_eval_transform(info: DataInfo) -> Callable:
    """Evaluation transform: PIL image (or CHW uint8 tensor) -> normalized float tensor [C,H,W]."""
    if info.family in FIXED_FAMILIES:
        return PadCropFlip(info.input_size, info.mean, info.std, info.in_chans)
    s = info.input_size
    if info.family == "imagenet":
        return imagenet_eval_transform(s, info.mean, info.std, info.interpolation, info.crop_pct)
    if info.family == "finegrained":
        r = _finegrained_resize(info)
        head = [v2.Resize((r, r), antialias=True), v2.CenterCrop(s)]
    else:
        raise CatchupError(f"unknown data family {info.family!r}")
    return v2.Compose([*head, *_normalize_tail(info)])

