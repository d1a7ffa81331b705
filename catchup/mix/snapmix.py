"""SnapMix (Huang, Wang and Tao, AAAI 2021): label weights from class activation maps, not from box areas.

A box of the partner (size from lambda_1) is resized into a box of the sample (size from lambda); the
sample keeps the share of its class-activation-map (CAM) mass that lies outside its box, the partner
contributes the CAM mass share of the box it gave. The two weights need not sum to one.

Defaults are the official code's from-scratch setting (github.com/Shaoli-Huang/SnapMix README: prob 0.5, the
default beta 1), like every method's defaults here; its ImageNet-pretrained fine-grained runs use lambda,
lambda_1 ~ Beta(5, 5) and prob 1 (``mix_alpha: 5, mix_prob: 1``). CAMs come from an extra no-grad forward
of the current model on the clean batch, in the model's current (training) mode as the official code does (so
BatchNorm running statistics also see the clean batch), and are bilinearly upsampled to the image size.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from catchup.errors import CatchupError
from catchup.mix.mixer import Mixer
from catchup.mix.ops import rand_box
from catchup.mix.plan import MixPlan
from catchup.stages import unwrap_model

__all__ = ["SnapMix", "class_activation_maps", "snapmix"]


def class_activation_maps(features: torch.Tensor, classifier: nn.Linear, target: torch.Tensor,
                          size: tuple[int, int]) -> torch.Tensor:
    """Normalised CAM of each sample's own class, [B, H, W]: ReLU(features) . w_y + b_y, upsampled, minus its
    minimum, divided by its sum (a map whose sum is 0 stays NaN, as in the official code; callers fall back)."""
    fms = F.relu(features.float())
    weight = classifier.weight.float()[target]                       # [B, C]
    cam = torch.einsum("bchw,bc->bhw", fms, weight)
    if classifier.bias is not None:
        cam = cam + classifier.bias.float()[target].view(-1, 1, 1)
    cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    cam = cam - cam.amin((1, 2), keepdim=True)
    return cam / cam.sum((1, 2), keepdim=True)


def snapmix(x: torch.Tensor, cam: torch.Tensor, index: torch.Tensor, box: tuple[int, int, int, int],
            partner_box: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste ``x[index]``'s ``partner_box``, bilinearly resized, into each sample's ``box`` (out of place).

    cam: normalised CAMs [B, H, W] of the clean batch. Returns the mixed batch and the label weights
    (own, partner), each [B]: 1 - CAM mass of the sample inside ``box``, CAM mass of the partner inside
    ``partner_box``; where a CAM is degenerate (NaN) the weight falls back to the pasted area share.
    """
    y0, y1, x0, x1 = box
    v0, v1, u0, u1 = partner_box
    h, w = x.shape[-2:]
    patch = F.interpolate(x[index][..., v0:v1, u0:u1], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=True)
    out = x.clone()
    out[..., y0:y1, x0:x1] = patch
    own = 1.0 - cam[:, y0:y1, x0:x1].sum((1, 2))
    partner = cam[index][:, v0:v1, u0:u1].sum((1, 2))
    area = (y1 - y0) * (x1 - x0) / float(h * w)
    own = torch.nan_to_num(own, nan=1.0 - area)
    partner = torch.nan_to_num(partner, nan=area)
    return out, own, partner


class SnapMix(Mixer):
    """SnapMix on any model with timm's ``forward_features`` and a plain ``nn.Linear`` from ``get_classifier()``
    applied to the globally pooled features (ResNets, DenseNets, MobileNetV2, the project's CIFAR models).

    The soft target is ``w_own * y + w_partner * y[index]`` (rows need not sum to one). Two samples with the
    same label simply add their weights (the official code counts such pairs twice). The model is read on every
    call, so mix in the training loop, not in a DataLoader collate_fn.
    """
    name = "snapmix"
    live_model = True
    default_alpha = 1.0
    default_prob = 0.5
    input_mix = None

    def __init__(self, model=None, **kwargs: Any):
        super().__init__(model, **kwargs)
        base = unwrap_model(model) if model is not None else None
        if base is None or not callable(getattr(base, "forward_features", None)):
            raise CatchupError("snapmix computes class activation maps: build it with a model that has timm's "
                               "forward_features()")
        get_classifier = getattr(base, "get_classifier", None)
        classifier = get_classifier() if callable(get_classifier) else None
        if not isinstance(classifier, nn.Linear):
            raise CatchupError(f"snapmix needs get_classifier() to be a single nn.Linear on pooled features; "
                               f"{type(base).__name__} has {type(classifier).__name__}")

    def input_plan(self, x: torch.Tensor, index: torch.Tensor) -> MixPlan:
        h, w = x.shape[-2:]
        lam, lam_partner = (float(v) for v in self.rng.beta(self.alpha, self.alpha, size=2))
        box = rand_box(self.rng, h, w, lam, self.cutmix_minmax)
        partner_box = rand_box(self.rng, h, w, lam_partner, self.cutmix_minmax)
        return MixPlan(0, lam, index, lam, {"box": box, "partner_box": partner_box})

    def cams(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        base = unwrap_model(self.model)
        with torch.no_grad():
            features = base.forward_features(x)
        classifier = base.get_classifier()
        if features.dim() != 4 or features.shape[1] != classifier.in_features:
            raise CatchupError(f"snapmix: forward_features gives {tuple(features.shape)}, which the classifier "
                               f"({classifier.in_features} inputs) does not read after global pooling")
        return class_activation_maps(features, classifier, target, tuple(x.shape[-2:]))

    def mix_input(self, x: torch.Tensor, target: torch.Tensor, plan: MixPlan) -> tuple[torch.Tensor, MixPlan]:
        box, partner_box = plan.extras["box"], plan.extras["partner_box"]
        if box[0] == box[1] or box[2] == box[3] or partner_box[0] == partner_box[1] or partner_box[2] == partner_box[3]:
            return x, replace(plan, lam_eff=1.0)   # an empty box: the official code leaves the batch unmixed
        with torch.no_grad():
            cam = self.cams(x, target)
        x, own, partner = snapmix(x, cam, plan.index, box, partner_box)
        return x, replace(plan, own_weight=own, partner_weight=partner, lam_eff=float(own.mean()))
