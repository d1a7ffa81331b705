"""AlignMixup (Venkataramanan et al., CVPR 2022): interpolate feature maps after aligning them spatially.

At the last stage, the C-dim feature vectors at the H x W positions of a sample and of its partner are
matched by an entropic optimal-transport plan (Sinkhorn, uniform marginals, cost = squared L2 distance);
the plan, scaled to an assignment matrix R (rows sum to one), carries one map onto the other's geometry.
Which one is carried is chosen at random per step, as in the official code:
  direction 0: lam * A + (1 - lam) * A' R^T     (the partner aligned to the sample)
  direction 1: lam * A R + (1 - lam) * A'        (the sample aligned to the partner)
The label weight is lam either way. Otherwise (the other half of the steps) plain input mixup.

Defaults from the official CIFAR code (github.com/shashankvkt/AlignMixup_CVPR22): lambda ~ Beta(2, 2), layer
uniform over {input mixup, aligned mixup after the last residual stage}, Sinkhorn eps 0.1 and 100 iterations.
The official loop may stop once the potentials move by less than 0.1; here all iterations always run (no
host synchronisation per iteration, and a plan closer to the marginals).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from catchup.mix.mixer import Mixer, _check
from catchup.mix.plan import MixPlan
from catchup.stages import Stage, feature_stages, memory_format_of

__all__ = ["AlignMix", "alignmix", "sinkhorn_plan", "transport_cost"]

COSTS = ("sqeuclidean", "cosine")


def transport_cost(a: torch.Tensor, b: torch.Tensor, cost: str = "sqeuclidean") -> torch.Tensor:
    """Pairwise cost between positions: a [B, N, C], b [B, M, C] -> [B, N, M] in float32."""
    a, b = a.float(), b.float()
    if cost == "cosine":
        a = torch.nn.functional.normalize(a, dim=-1)
        b = torch.nn.functional.normalize(b, dim=-1)
        return 1.0 - a @ b.transpose(1, 2)
    # the official code's sum |a_i - b_j|^2, expanded so no [B, N, M, C] tensor is built
    sq = (a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2.0 * a @ b.transpose(1, 2)
    return sq.clamp_min(0.0)


def sinkhorn_plan(cost: torch.Tensor, eps: float = 0.1, iters: int = 100) -> torch.Tensor:
    """Entropic OT plan between uniform marginals, log-domain Sinkhorn: cost [B, N, M] -> plan [B, N, M].

    Rows sum to 1/N and columns to 1/M (up to convergence); the same updates as the official code's
    SinkhornDistance (u then v, potentials in cost units).
    """
    n, m = cost.shape[-2:]
    log_mu = torch.log(torch.tensor(1.0 / n + 1e-8, dtype=cost.dtype, device=cost.device))
    log_nu = torch.log(torch.tensor(1.0 / m + 1e-8, dtype=cost.dtype, device=cost.device))
    u = cost.new_zeros(cost.shape[:-1])
    v = cost.new_zeros(cost.shape[:-2] + (m,))

    def scores(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (-cost + u[..., :, None] + v[..., None, :]) / eps

    for _ in range(iters):
        u = eps * (log_mu - torch.logsumexp(scores(u, v), dim=-1)) + u
        v = eps * (log_nu - torch.logsumexp(scores(u, v).transpose(-2, -1), dim=-1)) + v
    return scores(u, v).exp()


def alignmix(h: torch.Tensor, index: torch.Tensor, lam: float | torch.Tensor, direction: int = 0,
             eps: float = 0.1, iters: int = 100, cost: str = "sqeuclidean") -> torch.Tensor:
    """Aligned mixup of feature maps h [B, C, H, W] (or [B, C, ...positions]) with partners ``h[index]``
    (see the module docstring).

    The transport plan is computed without gradient (it is detached in the official code); gradients reach
    both maps through the interpolation. Returns h's dtype and memory format.
    """
    b, c = h.shape[:2]
    feat = h.reshape(b, c, -1)
    positions = feat.shape[-1]
    partner = feat[index]
    with torch.no_grad():
        plan = sinkhorn_plan(transport_cost(feat.transpose(1, 2), partner.transpose(1, 2), cost), eps, iters)
        assignment = (plan * positions).to(h.dtype)               # rows sum to one: R
    if direction == 0:
        mixed = feat * lam + (partner @ assignment.transpose(1, 2)) * (1.0 - lam)
    else:
        mixed = (feat @ assignment) * lam + partner * (1.0 - lam)
    out = mixed.reshape(h.shape)
    return out.contiguous(memory_format=memory_format_of(h))


class AlignMix(Mixer):
    """AlignMixup; options ``eps``, ``iters`` (Sinkhorn) and ``cost`` ('sqeuclidean' as the official code,
    or 'cosine'). ``mix_layers`` may name other stages; by default: the input and the last stage."""
    name = "alignmix"
    default_alpha = 2.0
    input_mix = "mixup"
    feature_level = True

    def __init__(self, model=None, *, eps: float = 0.1, iters: int = 100, cost: str = "sqeuclidean",
                 **kwargs: Any):
        _check(eps > 0, f"alignmix eps must be > 0, got {eps}")
        _check(int(iters) >= 1, f"alignmix iters must be >= 1, got {iters}")
        _check(cost in COSTS, f"alignmix cost must be one of {', '.join(COSTS)}, got {cost!r}")
        super().__init__(model, **kwargs)
        self.eps, self.iters, self.cost = float(eps), int(iters), cost

    def default_layers(self, model: nn.Module) -> list[int]:
        return [0, len(feature_stages(model)) - 1]          # the input and the last stage

    def feature_plan(self, stage: Stage, index: torch.Tensor) -> MixPlan:
        lam = float(self.rng.beta(self.alpha, self.alpha))
        direction = int(self.rng.integers(2))
        return MixPlan(stage.layer, lam, index, lam, {"lam": torch.tensor(lam), "direction": direction})

    def mix_features(self, h: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        lam = plan.extras["lam"].to(device=h.device, dtype=h.dtype)
        return alignmix(h, plan.index.to(h.device, non_blocking=True), lam, plan.extras["direction"],
                        self.eps, self.iters, self.cost)
