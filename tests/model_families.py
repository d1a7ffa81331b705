"""The smallest variant of each timm model family, with the layout of its feature_info stages: the sweep that
test_layouts.py runs and other modules borrow from."""
import timm
import torch
from torch import nn

import catchup.models  # noqa: F401  (registers preactresnet18 with timm)

NUM_CLASSES = 3
CHANNEL_AXIS = {"NCHW": 1, "NHWC": -1, "NLC": -1}   # where timm puts the channels of each layout

# family: (timm model, narrowing kwargs, input size, layout of every feature_info stage)
FAMILIES = {
    "resnet": ("resnet10t", {}, 32, "NCHW"),
    "resnetv2": ("resnetv2_18", dict(width_factor=0.25), 32, "NCHW"),
    "densenet": ("densenet121", {}, 32, "NCHW"),
    "efficientnet": ("tinynet_e", {}, 32, "NCHW"),             # the smallest EfficientNet
    "mobilenetv3": ("mobilenetv3_small_050", {}, 32, "NCHW"),
    "regnet": ("regnetx_002", {}, 32, "NCHW"),
    "convnext": ("convnext_atto", dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)), 32, "NCHW"),
    "vgg": ("vgg11", dict(mlp_ratio=1 / 512), 32, "NCHW"),     # a narrow pre-logits MLP instead of 4096 wide
    "rexnet": ("rexnet_100", dict(width_mult=0.25), 32, "NCHW"),
    "ghostnet": ("ghostnet_050", {}, 32, "NCHW"),
    "mobilevit": ("mobilevit_xxs", {}, 64, "NCHW"),
    "efficientvit": ("efficientvit_b0", {}, 32, "NCHW"),
    "fastvit": ("fastvit_t8", {}, 32, "NCHW"),
    "nfnet": ("nf_regnet_b0", {}, 32, "NCHW"),
    "cspnet": ("cs3darknet_s", {}, 32, "NCHW"),
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=32, window_size=2, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), 32, "NHWC"),
    "mambaout": ("mambaout_femto", dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)), 32, "NHWC"),
    "vit": ("vit_tiny_patch16_224",   # a class token and two register tokens
            dict(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, reg_tokens=2), 32, "NLC"),
    "deit": ("deit_tiny_distilled_patch16_224",   # class and distillation tokens
             dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2), 32, "NLC"),
    "eva": ("eva02_tiny_patch14_224", dict(img_size=28, embed_dim=16, depth=2, num_heads=2), 28, "NLC"),
    "cait": ("cait_xxs24_224",        # its class token joins only after the patch blocks
             dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, depth_token_only=1), 32, "NLC"),
    "mlp_mixer": ("mixer_s32_224", dict(img_size=64), 64, "NLC"),
    "levit": ("levit_128s", dict(img_size=64), 64, "NLC"),
    "efficientformer": ("efficientformer_l1", dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)), 224,
                        ["NCHW", "NCHW", "NCHW", "NLC"]),    # its last stage is a token map
}


def create(name: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
