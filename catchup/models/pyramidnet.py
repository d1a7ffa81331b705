"""PyramidNet (Han et al., 2017), the CIFAR network of CutMix / MoEx / RecursiveMix (PyramidNet-200, alpha 240).

Follows the authors' code (dyhan0920/PyramidNet-PyTorch): a 3x3 conv + BN stem with `width` (16) channels, three
stages whose widths grow by `alpha / (3n)` per block, pre-activation blocks ending in BN (no ReLU after the block's
first BN), average-pooled shortcuts at stride 2 zero-padded to the wider residual, a final BN-ReLU.
"""
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model

from catchup.errors import CatchupError
from catchup.models._common import CifarClassifier, build_cifar_model, cifar_cfg, init_weights


def _bn_relu_conv(in_chs: int, out_chs: int, kernel: int, stride: int = 1, relu: bool = True) -> list:
    act = [nn.ReLU(inplace=True)] if relu else []
    return [nn.BatchNorm2d(in_chs), *act, nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, bias=False)]


class PyramidBlock(nn.Module):
    """A basic (two 3x3) or bottleneck (1x1-3x3-1x1, 4x wider output) pyramidal block."""

    def __init__(self, in_chs: int, planes: int, stride: int, bottleneck: bool, drop_path_rate: float = 0.0):
        super().__init__()
        if bottleneck:
            out_chs = planes * 4
            layers = [*_bn_relu_conv(in_chs, planes, 1, relu=False), *_bn_relu_conv(planes, planes, 3, stride),
                      *_bn_relu_conv(planes, out_chs, 1)]
        else:
            out_chs = planes
            layers = [*_bn_relu_conv(in_chs, planes, 3, stride, relu=False), *_bn_relu_conv(planes, planes, 3)]
        self.residual = nn.Sequential(*layers, nn.BatchNorm2d(out_chs))
        self.shortcut = nn.AvgPool2d(2, ceil_mode=True) if stride != 1 else nn.Identity()
        self.pad_chs = out_chs - in_chs
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Zero channels fill the shortcut up to the residual width; F.pad keeps shapes static for torch.compile.
        shortcut = F.pad(self.shortcut(x), (0, 0, 0, 0, 0, self.pad_chs))
        return self.drop_path(self.residual(x)) + shortcut


class PyramidNet(CifarClassifier):
    """Feature levels: `stem` (conv + BN), then `stages.0` .. `stages.2`."""

    def __init__(
        self,
        depth: int = 200,
        alpha: float = 240,
        bottleneck: bool = True,
        num_classes: int = 100,
        in_chans: int = 3,
        width: int = 16,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        layers_per_block = 9 if bottleneck else 6
        if depth < 2 + layers_per_block or (depth - 2) % layers_per_block:
            kind = "bottleneck" if bottleneck else "basic"
            raise CatchupError(f"{kind} PyramidNet depth must be {layers_per_block}n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // layers_per_block
        add_rate = alpha / (3 * n)
        expansion = 4 if bottleneck else 1
        self.in_chans = in_chans
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.feature_info = [dict(num_chs=width, reduction=1, module="stem")]

        # the widths grow by add_rate per block, summed in floating point as the authors' code does
        planes, widths = float(width), []
        for _ in range(3 * n):
            planes += add_rate
            widths.append(round(planes))
        next_width = iter(widths)

        def make_block(stage: int, in_chs: int, stride: int, drop_path: float) -> tuple:
            planes = next(next_width)
            return PyramidBlock(in_chs, planes, stride, bottleneck, drop_path), planes * expansion

        in_chs = self._build_stages(width, 1, (n, n, n), drop_path_rate, make_block)
        self._init_head(in_chs, num_classes, global_pool, drop_rate)
        init_weights(self)


def _create(variant: str, pretrained: bool, **kwargs) -> PyramidNet:
    return build_cifar_model(PyramidNet, variant, pretrained, num_feature_levels=4, **kwargs)


default_cfgs = generate_default_cfgs({
    "pyramidnet": cifar_cfg(first_conv="stem.0", pool_size=(8, 8)),
    "pyramidnet200": cifar_cfg(first_conv="stem.0", pool_size=(8, 8)),
})


@register_model
def pyramidnet(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet of any `depth`, `alpha` and block type (`bottleneck=True`); defaults are PyramidNet-200."""
    return _create("pyramidnet", pretrained, **kwargs)


@register_model
def pyramidnet200(pretrained: bool = False, **kwargs) -> PyramidNet:
    """PyramidNet-200, bottleneck, alpha 240 (the CutMix / MoEx CIFAR-100 model)."""
    return _create("pyramidnet200", pretrained, **dict(dict(depth=200, alpha=240, bottleneck=True), **kwargs))
