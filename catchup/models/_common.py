"""Shared pieces of the CIFAR / Tiny-ImageNet model zoo: pretrained cfgs, the builder and the classifier interface.

Every model here is a plain timm citizen: a `default_cfgs` entry, a `@register_model` factory and the usual
classifier methods (`forward_features`, `forward_head`, `reset_classifier`, ...), so `timm.create_model`,
`resolve_data_config` and timm's training tools work on it unchanged.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union

import torch
from torch import nn
from timm.layers import create_classifier
from timm.models import build_model_with_cfg
from timm.models._manipulate import checkpoint_seq

from catchup.errors import CatchupError

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

ModelT = TypeVar("ModelT", bound=nn.Module)


def cifar_cfg(first_conv: str = "stem", classifier: str = "fc", pool_size=(4, 4), **kwargs: Any) -> Dict[str, Any]:
    """A pretrained cfg for a 32 px CIFAR-100 model without published weights (`url=''`).

    Models are fully convolutional with global pooling: Tiny-ImageNet users simply feed 64 px inputs.
    """
    return {
        "url": "",
        "num_classes": 100,
        "input_size": (3, 32, 32),
        "pool_size": pool_size,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
        "first_conv": first_conv,
        "classifier": classifier,
        **kwargs,
    }


def _has_local_weights(kwargs: Dict[str, Any]) -> bool:
    sources = [kwargs.get("pretrained_cfg_overlay"), kwargs.get("pretrained_cfg")]
    return any(isinstance(s, dict) and (s.get("file") or s.get("state_dict")) for s in sources)


def build_cifar_model(
    model_cls: Type[ModelT], variant: str, pretrained: bool, num_feature_levels: int, **kwargs: Any
) -> ModelT:
    """`build_model_with_cfg` plus a clear error (not a download attempt) when weights are asked for.

    Local weights still load through timm: `pretrained=True, pretrained_cfg_overlay=dict(file=path)`.
    """
    if pretrained and not _has_local_weights(kwargs):
        raise CatchupError(
            f"{variant} has no published pretrained weights: use pretrained=False, "
            "or pretrained_cfg_overlay=dict(file=PATH) for your own checkpoint"
        )
    # features_only=True collects the feature_info outputs with forward hooks, which reach nested names
    # ('stages.0') that timm's default module-rewriting FeatureListNet cannot.
    feature_cfg = dict(feature_cls="hook", out_indices=tuple(range(num_feature_levels)))
    return build_model_with_cfg(model_cls, variant, pretrained, feature_cfg=feature_cfg, **kwargs)


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> List[float]:
    """Stochastic-depth rates rising linearly from 0 to `drop_path_rate` over the blocks (timm's schedule)."""
    # Plain Python, not torch.linspace, so models can be built under a 'meta' device context.
    return [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


def check_no_drop_path(variant: str, drop_path_rate: float) -> None:
    """Non-residual nets accept `drop_path_rate` only as 0, so recipes can pass it to every model uniformly."""
    if drop_path_rate:
        raise CatchupError(f"{variant} has no residual branches, so drop_path_rate must be 0 (got {drop_path_rate})")


def init_weights(model: nn.Module) -> None:
    """He (fan-out) init for convs, unit BN, zero biases: the init of the WRN / PyramidNet / timm ResNet code."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class CifarClassifier(nn.Module):
    """stem -> stages -> final -> global pool -> dropout -> fc, with timm's classifier interface.

    Subclasses build `self.stem`, `self.stages` (an `nn.Sequential` of stage `nn.Sequential`s, the modules
    named in `feature_info`) and `self.final` (head-side norm/conv, or `nn.Identity`), then call `_init_head`;
    the pre-activation residual nets build their stages and final BN-ReLU with `_build_stages`.
    """

    stem: nn.Module
    stages: nn.Sequential
    final: nn.Module
    feature_info: List[Dict[str, Any]]

    def _build_stages(self, in_chs: int, reduction: int, depths: Sequence[int], drop_path_rate: float,
                      make_block: Callable[[int, int, int, float], Tuple[nn.Module, int]]) -> int:
        """`self.stages`: `depths[i]` blocks in stage i, the first stage at stride 1 and each later one halving the
        resolution in its first block; one `feature_info` entry per stage; the final BN-ReLU. Stochastic depth
        rises over all blocks. `make_block(stage, in_chs, stride, drop_path_rate)` returns (block, its output
        channels). Returns the channels of the last stage."""
        rates = iter(drop_path_rates(drop_path_rate, sum(depths)))
        stages = []
        for i, depth in enumerate(depths):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(depth):
                block, in_chs = make_block(i, in_chs, stride if b == 0 else 1, next(rates))
                blocks.append(block)
            reduction *= stride
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.final = nn.Sequential(nn.BatchNorm2d(in_chs), nn.ReLU(inplace=True))
        return in_chs

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_features = num_features
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self._make_classifier(num_classes, global_pool)

    def _make_classifier(self, num_classes: int, pool_type: str) -> None:
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool_type)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # Checkpointing runs the stages block by block, so forward hooks on the stage modules do not fire.
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        ref = next(self.parameters())
        self._make_classifier(num_classes, self.global_pool.pool_type if global_pool is None else global_pool)
        self.fc.to(device=ref.device, dtype=ref.dtype)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return self.final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
