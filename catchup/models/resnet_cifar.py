"""Post-activation ResNet-18 and ResNeXt-50 (32x4d) with a CIFAR stem, the OpenMixup CIFAR style.

timm's own ResNet with its stem swapped: a 3x3 stride-1 conv + BN + ReLU and no max-pooling, so 32 px inputs keep
their resolution through the first stage. Module names are timm's (`conv1`, `act1`, `layer1..4`, `fc`).
"""
from typing import Sequence, Type, Union

from torch import nn
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from catchup.errors import CatchupError
from catchup.models._common import build_cifar_model, cifar_cfg


class CifarResNet(ResNet):
    """Feature levels: `act1` (stem), then `layer1` .. `layer4` at reductions 1, 1, 2, 4, 8."""

    def __init__(
        self,
        block: Union[Type[BasicBlock], Type[Bottleneck]],
        layers: Sequence[int],
        num_classes: int = 100,
        in_chans: int = 3,
        width: int = 64,
        cardinality: int = 1,
        base_width: int = 64,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = False,
    ):
        if width % 2:
            raise CatchupError(f"width must be even, got {width}")
        # timm sizes a 'deep' stem's output as 2 * stem_width (a plain stem is fixed at 64 channels); that is how
        # the first stage gets `width` input channels. The deep stem itself is replaced just below.
        super().__init__(
            block, tuple(layers), num_classes=num_classes, in_chans=in_chans, cardinality=cardinality,
            base_width=base_width, stem_width=width // 2, stem_type="deep",
            channels=(width, width * 2, width * 4, width * 8), global_pool=global_pool,
            drop_rate=drop_rate, drop_path_rate=drop_path_rate, zero_init_last=zero_init_last,
        )
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        # The stem no longer downsamples (timm's stem divides the resolution by 4).
        self.feature_info = [dict(info, reduction=max(1, info["reduction"] // 4)) for info in self.feature_info]


def _create(variant: str, pretrained: bool, **kwargs) -> CifarResNet:
    return build_cifar_model(CifarResNet, variant, pretrained, num_feature_levels=5, **kwargs)


default_cfgs = generate_default_cfgs({
    "resnet18_cifar": cifar_cfg(first_conv="conv1"),
    "resnext50_cifar": cifar_cfg(first_conv="conv1"),
})


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pooling."""
    return _create("resnet18_cifar", pretrained, **dict(dict(block=BasicBlock, layers=(2, 2, 2, 2)), **kwargs))


@register_model
def resnext50_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNeXt-50 32x4d with a 3x3 stride-1 stem and no max-pooling."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), cardinality=32, base_width=4)
    return _create("resnext50_cifar", pretrained, **dict(model_args, **kwargs))
