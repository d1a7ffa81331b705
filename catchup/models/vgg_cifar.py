"""VGG-16 with batch norm for 32 px inputs, the kuangliu/pytorch-cifar variant.

Thirteen 3x3 conv-BN-ReLU layers in five blocks of `width * (1, 2, 4, 8, 8)` channels, each block followed by a
2x2 max-pool, then a single linear classifier on the pooled 512 features (no 4096-wide MLP). At 32 px the last
pool leaves 1x1, exactly the reference; other sizes are global-average-pooled after it.
"""
from typing import List, Tuple

from torch import nn
from timm.models import generate_default_cfgs, register_model

from catchup.models._common import CifarClassifier, build_cifar_model, check_no_drop_path, cifar_cfg, init_weights

# (channels as a multiple of `width`, number of convs) per block.
VGG16_BLOCKS: Tuple[Tuple[int, int], ...] = ((1, 2), (2, 2), (4, 3), (8, 3), (8, 3))


def _conv_bn_relu(in_chs: int, out_chs: int) -> nn.Sequential:
    # Biased convs before BN, as in the reference and torchvision, to keep the same parameter set. One unit, so
    # gradient checkpointing never cuts between the BN and its in-place ReLU.
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, padding=1), nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True))


class VggCifar(CifarClassifier):
    """Feature levels: `stages.0` .. `stages.4`, each the ReLU output just before a max-pool.

    The stem is the first conv-BN-ReLU; stage i > 0 starts with the previous block's max-pool.
    """

    def __init__(
        self,
        num_classes: int = 100,
        in_chans: int = 3,
        width: int = 64,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        check_no_drop_path("VGG", drop_path_rate)
        self.in_chans = in_chans
        self.stem = _conv_bn_relu(in_chans, width)
        self.feature_info = []
        in_chs, stages = width, []
        for i, (mult, num_convs) in enumerate(VGG16_BLOCKS):
            layers: List[nn.Module] = [] if i == 0 else [nn.MaxPool2d(2)]
            for _ in range(num_convs - (1 if i == 0 else 0)):
                layers.append(_conv_bn_relu(in_chs, width * mult))
                in_chs = width * mult
            stages.append(nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=in_chs, reduction=2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.final = nn.MaxPool2d(2)
        self._init_head(in_chs, num_classes, global_pool, drop_rate)
        init_weights(self)


default_cfgs = generate_default_cfgs({"vgg16_bn_cifar": cifar_cfg(first_conv="stem.0", pool_size=(1, 1))})


@register_model
def vgg16_bn_cifar(pretrained: bool = False, **kwargs) -> VggCifar:
    """VGG-16-BN for 32 px inputs (kuangliu/pytorch-cifar)."""
    return build_cifar_model(VggCifar, "vgg16_bn_cifar", pretrained, num_feature_levels=5, **kwargs)
