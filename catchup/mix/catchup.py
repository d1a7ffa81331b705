"""Catch-up Mix (Kang, Kang and Kim, AAAI 2024), eqs. (4)-(7) of the paper.

At a random layer k, each sample keeps the floor(lam * C) channels in which it is relatively WEAKEST compared
with its partner (lowest relative filter influence) and takes the other channels from the partner, so the
filters that a strong channel would otherwise drown get gradient. Layer 0 is CutMix on the input.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from catchup.mix.mixer import Mixer
from catchup.mix.plan import MixPlan
from catchup.stages import Stage, feature_stages


def filter_influence(h: torch.Tensor) -> torch.Tensor:
    """Eq. (4)-(5) normalisation: per-sample L2 norm of every channel over its positions, summing to one per sample.

    h is [B, C, ...positions]: H x W for a feature map, N for a token map (``catchup.mix.layout``). Computed in
    float32 whatever h's dtype (squares overflow in fp16). A sample whose channels are all zero gets all-zero
    influence rather than NaN.
    """
    fi = torch.linalg.vector_norm(h, ord=2, dim=tuple(range(2, h.dim())), dtype=torch.float32)
    return fi / fi.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def catchup_keep_mask(h: torch.Tensor, index: torch.Tensor, n_keep: int | torch.Tensor) -> torch.Tensor:
    """Bool [B, C]: True where the sample keeps its own channel, exactly ``n_keep`` per row.

    Channels are ranked by RFI = FI_own - FI_partner (eq. 5) with a stable ascending sort, so ties keep the
    lower channel index. The first ``n_keep`` places of the order are marked instead of slicing a top-k, so no
    shape depends on lambda (``torch.compile`` keeps one graph) and no value has to come back to the host.
    """
    with torch.no_grad():   # a ranking has no gradient: recording the norms for autograd only costs time
        fi = filter_influence(h)
        rfi = fi - fi[index]
        order = torch.sort(rfi, dim=1, stable=True).indices
        first = torch.arange(h.shape[1], device=h.device) < n_keep
        # Scattering bools is several times faster on CPU than scattering int64 ranks and comparing them.
        return torch.zeros_like(rfi, dtype=torch.bool).scatter_(1, order, first.expand_as(order))


def catchup_mix(h: torch.Tensor, index: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Eq. (6): ``M * h + (1 - M) * h[index]`` with M keeping floor(lam * C) lowest-RFI channels of h.

    h: [B, C, H, W] (or [B, C, ...positions]), any float dtype or memory format; index: LongTensor[B], the
    partner of each sample; lam in [0, 1]. Returns the mixed map (h's dtype and memory format; gradients reach
    both h and h[index]) and lam_eff = floor(lam * C) / C, the exact share of the sample's own channels.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    channels = h.shape[1]
    n_keep = math.floor(lam * channels)
    return apply_keep_mask(h, index, catchup_keep_mask(h, index, n_keep)), n_keep / channels


def apply_keep_mask(h: torch.Tensor, index: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``keep * h + (1 - keep) * h[index]`` per channel, out of place, in h's dtype and memory format.

    A contiguous map is one row gather over its [B * C, H * W] view, each row taken from the sample or its
    partner: unlike ``where(keep, h, h[index])`` it never materialises ``h[index]``, and its backward is one
    index_add instead of two masked copies, a scatter and a sum (about half the time and transient memory).
    """
    batch, channels = h.shape[:2]
    if not h.is_contiguous():   # channels_last and other layouts: rows are not contiguous, select elementwise
        return torch.where(keep.view(*keep.shape, *(1,) * (h.dim() - 2)), h, h[index])
    own = torch.arange(batch, device=h.device)[:, None]
    rows = torch.where(keep, own, index[:, None]) * channels + torch.arange(channels, device=h.device)
    return h.reshape(batch * channels, -1).index_select(0, rows.view(-1)).view_as(h)


class CatchUpMix(Mixer):
    """Layer k uniform over the input and every feature_info stage (the paper's K = {0..5} on a ResNet).

    k == 0: CutMix with lambda ~ Beta(cutmix_alpha, cutmix_alpha). k > 0: lambda ~ Beta(alpha, alpha) and
    Catch-up Mix at stage k; the label weight is the exact kept share floor(lam * C) / C, the project's choice
    (``label_lam='sampled'`` uses lambda itself, as eq. 3 writes it and the public re-implementations do).
    """
    name = "catchup"
    # The project's choice: the paper gives no alpha for feature layers but follows AlignMixup's settings (alpha 2);
    # the public re-implementation draws Beta(1, 1). Both are measured in the README's "Open choices".
    default_alpha = 2.0
    input_mix = "cutmix"
    feature_level = True

    def default_layers(self, model: nn.Module) -> list[int]:
        return list(range(len(feature_stages(model))))     # the input and every stage

    def feature_plan(self, stage: Stage, index: torch.Tensor) -> MixPlan:
        lam = float(self.rng.beta(self.alpha, self.alpha))
        n_keep = math.floor(lam * stage.channels)
        lam_eff = n_keep / stage.channels if self.label_lam == "exact" else lam
        # n_keep travels as a 0-dim CPU tensor: a Python int would become a compile-time constant.
        return MixPlan(stage.layer, lam, index, lam_eff, {"n_keep": torch.tensor(n_keep)})

    def mix_features(self, h: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        index = plan.index.to(h.device, non_blocking=True)
        return apply_keep_mask(h, index, catchup_keep_mask(h, index, plan.extras["n_keep"]))
