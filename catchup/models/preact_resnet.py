"""Pre-activation ResNet (He et al., 2016b), the CIFAR version of Manifold Mixup / PuzzleMix / AlignMixup.

3x3 stride-1 stem conv (no norm, no pool), four stages of `width * (1, 2, 4, 8)` planes with strides 1, 2, 2, 2,
a final BN-ReLU, global average pooling and a linear classifier. `stem_stride=2` gives the 64 px Tiny-ImageNet
variant of the PuzzleMix / Co-Mixup code.

Written here rather than taken from timm's ResNetV2: that one has a 7x7 stride-2 stem with max-pooling, a 1x1-conv
classifier, and its basic pre-activation block only exists in recent timm releases.
"""
from typing import Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model

from catchup.errors import CatchupError
from catchup.models._common import CifarClassifier, build_cifar_model, cifar_cfg, init_weights


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path_rate: float = 0.0):
        super().__init__()
        out_chs = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, out_chs, 3, padding=1, bias=False)
        needs_proj = stride != 1 or in_chs != out_chs
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False) if needs_proj else None
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # As in the reference code, a projection shortcut sees the pre-activated input.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return self.drop_path(out) + shortcut


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path_rate: float = 0.0):
        super().__init__()
        out_chs = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        needs_proj = stride != 1 or in_chs != out_chs
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False) if needs_proj else None
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return self.drop_path(out) + shortcut


PreActBlock = Union[Type[PreActBasicBlock], Type[PreActBottleneck]]


class PreActResNet(CifarClassifier):
    """Feature levels: `stem` (the stem conv output), then `stages.0` .. `stages.3`."""

    def __init__(
        self,
        block: PreActBlock,
        layers: Sequence[int],
        num_classes: int = 100,
        in_chans: int = 3,
        width: int = 64,
        stem_stride: int = 1,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if stem_stride not in (1, 2):
            raise CatchupError(f"stem_stride must be 1 (32 px CIFAR) or 2 (64 px Tiny-ImageNet), got {stem_stride}")
        self.in_chans = in_chans
        self.stem = nn.Conv2d(in_chans, width, 3, stride=stem_stride, padding=1, bias=False)
        self.feature_info = [dict(num_chs=width, reduction=stem_stride, module="stem")]

        def make_block(stage: int, in_chs: int, stride: int, drop_path: float) -> tuple:
            planes = width * 2**stage
            return block(in_chs, planes, stride, drop_path), planes * block.expansion

        in_chs = self._build_stages(width, stem_stride, layers, drop_path_rate, make_block)
        self._init_head(in_chs, num_classes, global_pool, drop_rate)
        init_weights(self)


def _create(variant: str, pretrained: bool, **kwargs) -> PreActResNet:
    return build_cifar_model(PreActResNet, variant, pretrained, num_feature_levels=5, **kwargs)


default_cfgs = generate_default_cfgs({
    "preactresnet18": cifar_cfg(),
    "preactresnet34": cifar_cfg(),
    "preactresnet50": cifar_cfg(),
})


@register_model
def preactresnet18(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreAct ResNet-18 (CIFAR); `stem_stride=2` for 64 px Tiny-ImageNet."""
    return _create("preactresnet18", pretrained, **dict(dict(block=PreActBasicBlock, layers=(2, 2, 2, 2)), **kwargs))


@register_model
def preactresnet34(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreAct ResNet-34 (CIFAR); `stem_stride=2` for 64 px Tiny-ImageNet."""
    return _create("preactresnet34", pretrained, **dict(dict(block=PreActBasicBlock, layers=(3, 4, 6, 3)), **kwargs))


@register_model
def preactresnet50(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreAct ResNet-50 (CIFAR, bottleneck blocks); `stem_stride=2` for 64 px Tiny-ImageNet."""
    return _create("preactresnet50", pretrained, **dict(dict(block=PreActBottleneck, layers=(3, 4, 6, 3)), **kwargs))
