"""MobileNetV2 for 32 px inputs, the kuangliu/pytorch-cifar variant.

Differences from the ImageNet network, as in the reference: stride-1 stem, stride 1 (not 2) in the 24-channel
group, ReLU rather than ReLU6, and a 1x1 conv + BN projection shortcut on stride-1 blocks whose width changes.
Overall reduction 8 (32 px -> 4x4), then a 1x1 conv to 1280 channels, global average pooling and a linear layer.
"""
from typing import List, Tuple

import torch
from torch import nn
from timm.layers import DropPath, make_divisible
from timm.models import generate_default_cfgs, register_model

from catchup.models._common import CifarClassifier, build_cifar_model, cifar_cfg, drop_path_rates, init_weights

# (expansion, out channels at width 32, blocks, first stride), grouped into the four feature stages.
STAGES: Tuple[Tuple[Tuple[int, int, int, int], ...], ...] = (
    ((1, 16, 1, 1), (6, 24, 2, 1)),
    ((6, 32, 3, 2),),
    ((6, 64, 4, 2), (6, 96, 3, 1)),
    ((6, 160, 3, 2), (6, 320, 1, 1)),
)


def _conv_bn(in_chs: int, out_chs: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(out_chs)]


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; a residual only at stride 1."""

    def __init__(self, in_chs: int, out_chs: int, expansion: int, stride: int, drop_path_rate: float = 0.0):
        super().__init__()
        mid = in_chs * expansion
        self.conv = nn.Sequential(
            *_conv_bn(in_chs, mid), nn.ReLU(inplace=True),
            *_conv_bn(mid, mid, 3, stride, groups=mid), nn.ReLU(inplace=True),
            *_conv_bn(mid, out_chs),
        )
        self.has_residual = stride == 1
        proj = self.has_residual and in_chs != out_chs
        self.shortcut = nn.Sequential(*_conv_bn(in_chs, out_chs)) if proj else nn.Identity()
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.has_residual:
            out = self.drop_path(out) + self.shortcut(x)
        return out


class MobileNetV2Cifar(CifarClassifier):
    """Feature levels: `stem` (conv-BN-ReLU), then `stages.0` .. `stages.3` at reductions 1, 1, 2, 4, 8.

    `width` is the stem width (32); all widths scale with `width / 32`, rounded to multiples of 8 as in the
    paper, and the 1280-channel head conv only grows.
    """

    def __init__(
        self,
        num_classes: int = 100,
        in_chans: int = 3,
        width: int = 32,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        scale = width / 32
        self.in_chans = in_chans
        self.stem = nn.Sequential(*_conv_bn(in_chans, width, 3), nn.ReLU(inplace=True))
        self.feature_info = [dict(num_chs=width, reduction=1, module="stem")]

        num_blocks = sum(n for stage in STAGES for _, _, n, _ in stage)
        dpr = iter(drop_path_rates(drop_path_rate, num_blocks))
        in_chs, reduction, stages = width, 1, []
        for i, stage in enumerate(STAGES):
            blocks = []
            for expansion, chs, n, stride in stage:
                out_chs = make_divisible(chs * scale, 8)
                for b in range(n):
                    blocks.append(InvertedResidual(in_chs, out_chs, expansion, stride if b == 0 else 1, next(dpr)))
                    in_chs = out_chs
                reduction *= stride
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        head_chs = make_divisible(1280 * max(1.0, scale), 8)
        self.final = nn.Sequential(*_conv_bn(in_chs, head_chs), nn.ReLU(inplace=True))
        self._init_head(head_chs, num_classes, global_pool, drop_rate)
        init_weights(self)


default_cfgs = generate_default_cfgs({"mobilenetv2_cifar": cifar_cfg(first_conv="stem.0")})


@register_model
def mobilenetv2_cifar(pretrained: bool = False, **kwargs) -> MobileNetV2Cifar:
    """MobileNetV2 for 32 px inputs (kuangliu/pytorch-cifar)."""
    return build_cifar_model(MobileNetV2Cifar, "mobilenetv2_cifar", pretrained, num_feature_levels=5, **kwargs)
