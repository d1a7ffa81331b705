"""DenseNet-121 for 32 px inputs, the kuangliu/pytorch-cifar variant.

A 3x3 stride-1 stem conv of 2 * growth channels, dense blocks of (6, 12, 24, 16) BN-ReLU-1x1-BN-ReLU-3x3 layers,
transitions (BN-ReLU-1x1 conv halving the channels, 2x2 average pool) between them, a final BN-ReLU.
Reduction 8 overall. `width` is the growth rate (32).
"""
from typing import Sequence

import torch
from torch import nn
from timm.models import generate_default_cfgs, register_model

from catchup.models._common import CifarClassifier, build_cifar_model, check_no_drop_path, cifar_cfg, init_weights


def _bn_relu_conv(in_chs: int, out_chs: int, kernel: int) -> nn.Sequential:
    conv = nn.Conv2d(in_chs, out_chs, kernel, padding=kernel // 2, bias=False)
    return nn.Sequential(nn.BatchNorm2d(in_chs), nn.ReLU(inplace=True), conv)


class DenseLayer(nn.Module):
    def __init__(self, in_chs: int, growth_rate: int):
        super().__init__()
        bottleneck = 4 * growth_rate
        self.conv = nn.Sequential(_bn_relu_conv(in_chs, bottleneck, 1), _bn_relu_conv(bottleneck, growth_rate, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # New features first, as in the reference code.
        return torch.cat([self.conv(x), x], dim=1)


class Transition(nn.Sequential):
    def __init__(self, in_chs: int, out_chs: int):
        super().__init__(_bn_relu_conv(in_chs, out_chs, 1), nn.AvgPool2d(2))


class DenseNetCifar(CifarClassifier):
    """Feature levels: `stem` (the stem conv output), then `stages.0` .. `stages.3`, each a dense block output
    (stage i > 0 starts with the transition that precedes its dense block)."""

    def __init__(
        self,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_classes: int = 100,
        in_chans: int = 3,
        width: int = 32,
        compression: float = 0.5,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        check_no_drop_path("DenseNet", drop_path_rate)
        self.in_chans = in_chans
        chs = 2 * width
        self.stem = nn.Conv2d(in_chans, chs, 3, padding=1, bias=False)
        self.feature_info = [dict(num_chs=chs, reduction=1, module="stem")]
        stages, reduction = [], 1
        for i, num_layers in enumerate(block_config):
            layers = []
            if i > 0:
                out_chs = int(chs * compression)
                layers.append(Transition(chs, out_chs))
                chs, reduction = out_chs, reduction * 2
            for _ in range(num_layers):
                layers.append(DenseLayer(chs, width))
                chs += width
            stages.append(nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.final = nn.Sequential(nn.BatchNorm2d(chs), nn.ReLU(inplace=True))
        self._init_head(chs, num_classes, global_pool, drop_rate)
        init_weights(self)


default_cfgs = generate_default_cfgs({"densenet121_cifar": cifar_cfg()})


@register_model
def densenet121_cifar(pretrained: bool = False, **kwargs) -> DenseNetCifar:
    """DenseNet-121 for 32 px inputs (kuangliu/pytorch-cifar)."""
    return build_cifar_model(DenseNetCifar, "densenet121_cifar", pretrained, num_feature_levels=5, **kwargs)
