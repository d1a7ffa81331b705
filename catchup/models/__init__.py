"""CIFAR / Tiny-ImageNet models registered with timm: `import catchup.models`, then `timm.create_model(name)`."""
from catchup.models.densenet_cifar import DenseNetCifar
from catchup.models.mobilenetv2_cifar import MobileNetV2Cifar
from catchup.models.preact_resnet import PreActResNet
from catchup.models.pyramidnet import PyramidNet
from catchup.models.resnet_cifar import CifarResNet
from catchup.models.vgg_cifar import VggCifar
from catchup.models.wide_resnet import WideResNet

MODEL_NAMES = (
    "preactresnet18", "preactresnet34", "preactresnet50", "resnet18_cifar", "resnext50_cifar", "wrn16_8",
    "wrn28_10", "pyramidnet", "pyramidnet200", "vgg16_bn_cifar", "mobilenetv2_cifar", "densenet121_cifar",
)

__all__ = [
    "MODEL_NAMES", "CifarResNet", "DenseNetCifar", "MobileNetV2Cifar", "PreActResNet", "PyramidNet", "VggCifar",
    "WideResNet",
]
