"""Wide-ResNet (Zagoruyko & Komodakis, 2016), the pre-activation CIFAR network WRN-depth-k.

3x3 stem conv with `width` (16) channels, three stages of `(depth - 4) / 6` basic blocks with
`width * k * (1, 2, 4)` channels and strides 1, 2, 2, a final BN-ReLU, global average pooling and a linear
classifier. `block_drop_rate` is the paper's dropout between the two convolutions of a block (0.3 there).
"""
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model

from catchup.errors import CatchupError
from catchup.models._common import CifarClassifier, build_cifar_model, cifar_cfg, init_weights


class WideBasicBlock(nn.Module):
    def __init__(
        self, in_chs: int, out_chs: int, stride: int = 1, block_drop_rate: float = 0.0, drop_path_rate: float = 0.0
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.block_drop_rate = block_drop_rate
        needs_proj = stride != 1 or in_chs != out_chs
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False) if needs_proj else None
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # As in the reference code, a projection shortcut sees the pre-activated input.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        out = F.dropout(out, p=self.block_drop_rate, training=self.training)
        return self.drop_path(self.conv2(out)) + shortcut


class WideResNet(CifarClassifier):
    """Feature levels: `stem` (the stem conv output), then `stages.0` .. `stages.2`."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 100,
        in_chans: int = 3,
        width: int = 16,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise CatchupError(f"Wide-ResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        self.in_chans = in_chans
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.feature_info = [dict(num_chs=width, reduction=1, module="stem")]

        def make_block(stage: int, in_chs: int, stride: int, drop_path: float) -> tuple:
            out_chs = width * widen_factor * 2**stage
            return WideBasicBlock(in_chs, out_chs, stride, block_drop_rate, drop_path), out_chs

        in_chs = self._build_stages(width, 1, (n, n, n), drop_path_rate, make_block)
        self._init_head(in_chs, num_classes, global_pool, drop_rate)
        init_weights(self)


def _create(variant: str, pretrained: bool, **kwargs) -> WideResNet:
    return build_cifar_model(WideResNet, variant, pretrained, num_feature_levels=4, **kwargs)


default_cfgs = generate_default_cfgs({
    "wrn16_8": cifar_cfg(pool_size=(8, 8)),
    "wrn28_10": cifar_cfg(pool_size=(8, 8)),
})


@register_model
def wrn16_8(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-16-8."""
    return _create("wrn16_8", pretrained, **dict(dict(depth=16, widen_factor=8), **kwargs))


@register_model
def wrn28_10(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-10."""
    return _create("wrn28_10", pretrained, **dict(dict(depth=28, widen_factor=10), **kwargs))
