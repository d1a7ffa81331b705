"""Puzzle Mix (Kim, Choo and Song, ICML 2020): a saliency-aware block mask by graph cut, then transport.

Each step: the input-gradient saliency of the clean batch (an extra forward/backward of the model in eval
mode, gradient w.r.t. the input only); the image is split into ``block_num`` x ``block_num`` blocks
(block_num uniform over {2, 4, 8, 16}); a multi-label graph cut (alpha-beta swap, ``gco-wrapper``, the
library the official code calls) picks for every block how much of the sample vs its partner to keep,
trading the saliency each loses, a prior from lambda and a smoothness term from local image statistics;
then, inside each image, salient blocks are moved (a greedy transport) to where the mask shows that image.
Label weight of the sample = mean of the mask.

Defaults from the official CIFAR-100 command (github.com/snu-mllab/PuzzleMix README, 1200 epochs):
alpha 1, n_labels 3, beta 1.2, gamma 0.5, eta 0.2, neigh_size 4, transport with t_size 4, t_eps 0.8. That
command uses no clean-loss term and no adversarial noise (clean_lam 0, adv_p 0), which are not offered here.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import replace
from math import comb
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from catchup.errors import CatchupError
from catchup.mix.mixer import Mixer, _check
from catchup.mix.plan import MixPlan
from catchup.stages import unwrap_model

__all__ = ["PuzzleMix", "input_saliency", "graphcut_mask", "mask_transport", "transport_image", "puzzlemix"]


def input_saliency(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, H, W]: the channel-RMS of d CE / d x, from an eval-mode forward of the unwrapped model.

    Only the input gradient is taken (torch.autograd.grad), so no parameter gradient is left behind.
    """
    base = unwrap_model(model)
    was_training = base.training
    x_var = x.detach().float().requires_grad_(True)
    try:
        base.eval()
        with torch.enable_grad():
            loss = F.cross_entropy(base(x_var).float(), target)
            (grad,) = torch.autograd.grad(loss, x_var)
    finally:
        base.train(was_training)
    return grad.pow(2).mean(1).sqrt()


def _neigh_penalty(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean |a - b| across each block boundary (rows: [B, n-1, n], columns: [B, n, n-1])."""
    dx = (a[:, :, :-1, :] - b[:, :, 1:, :])[:, :, k - 1::k, :]
    dy = (a[:, :, :, :-1] - b[:, :, :, 1:])[:, :, :, k - 1::k]
    return F.avg_pool2d(dx.abs().mean(1), kernel_size=(1, k)), F.avg_pool2d(dy.abs().mean(1), kernel_size=(k, 1))


def _graphcut(own: np.ndarray, partner: np.ndarray, pw_x: np.ndarray, pw_y: np.ndarray, lam: float, beta: float,
              eta: float, n_labels: int) -> np.ndarray:
    """One sample's mask [n, n] in {0, 1/(L-1), ..., 1} (share of the sample's own pixels), as the official
    ``graphcut_multi``: integer energies scaled by 1000 n^2, label l keeps a share 1 - l/(L-1) of the sample."""
    import gco   # gco-wrapper: the graph-cut library of the official code

    n = own.shape[0]
    large = 1000 * n ** 2
    partner_shares = np.linspace(0, 1, n_labels)     # label l shows the partner at l/(L-1)
    # prior: -log of the binomial probability of each share under lambda
    prior = np.array([-np.log(comb(n_labels - 1, l) * lam ** (n_labels - 1 - l) * (1 - lam) ** l + 1e-8)
                      for l in range(n_labels)])
    prior = eta * prior / n ** 2
    # the saliency each label loses: the partner's where it is hidden, the sample's own where it is covered
    unary = np.stack([(1 - s) * partner + s * own + prior[l] for l, s in enumerate(partner_shares)], axis=-1)
    pairwise = np.array([[(i - j) ** 2 / (n_labels - 1) ** 2 for j in range(n_labels)] for i in range(n_labels)],
                        dtype=np.float32)
    labels = gco.cut_grid_graph((large * unary).astype(np.int32), pairwise, (large * (pw_x + beta)).astype(np.int32),
                                (large * (pw_y + beta)).astype(np.int32), algorithm="swap")
    return 1.0 - labels.reshape(n, n) / (n_labels - 1)


def graphcut_mask(x: torch.Tensor, saliency: torch.Tensor, index: torch.Tensor, block_num: int, lam: float,
                  beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2, neigh_size: int = 4, n_labels: int = 3,
                  mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """The official ``mixup_graph`` mask: [B, 1, n, n] share of each sample's own block (n = block_num)."""
    b, c, _, width = x.shape
    block = width // block_num
    neigh = min(neigh_size, block)
    beta = beta / block_num / 16
    pooled = F.avg_pool2d(saliency, block)
    unary_own = pooled / pooled.reshape(b, -1).sum(1).reshape(b, 1, 1)
    unary_partner = unary_own[index]
    pixels = x.float() * x.new_tensor(std).view(1, c, 1, 1) + x.new_tensor(mean).view(1, c, 1, 1)
    own_pool = F.avg_pool2d(pixels, neigh)
    partner_pool = own_pool[index]
    k = block // neigh
    # pw[:, a, b]: boundary differences between the image on one side (a: 0 partner, 1 own) and the other (b)
    pairs = {(0, 0): (partner_pool, partner_pool), (0, 1): (partner_pool, own_pool),
             (1, 0): (own_pool, partner_pool), (1, 1): (own_pool, own_pool)}
    pw_x, pw_y = {}, {}
    for key, (p, q) in pairs.items():
        dx, dy = _neigh_penalty(p, q, k)
        pw_x[key], pw_y[key] = beta * gamma * dx, beta * gamma * dy
    # Fold the label-dependent part of the smoothness into the unaries, leaving a symmetric pairwise weight.
    u_own, u_partner = unary_own.clone(), unary_partner.clone()
    u_partner[:, :-1, :] += (pw_x[1, 0] + pw_x[1, 1]) / 2
    u_own[:, :-1, :] += (pw_x[0, 1] + pw_x[0, 0]) / 2
    u_partner[:, 1:, :] += (pw_x[0, 1] + pw_x[1, 1]) / 2
    u_own[:, 1:, :] += (pw_x[1, 0] + pw_x[0, 0]) / 2
    u_partner[:, :, :-1] += (pw_y[1, 0] + pw_y[1, 1]) / 2
    u_own[:, :, :-1] += (pw_y[0, 1] + pw_y[0, 0]) / 2
    u_partner[:, :, 1:] += (pw_y[0, 1] + pw_y[1, 1]) / 2
    u_own[:, :, 1:] += (pw_y[1, 0] + pw_y[0, 0]) / 2
    edge_x = (pw_x[1, 0] + pw_x[0, 1] - pw_x[1, 1] - pw_x[0, 0]) / 2
    edge_y = (pw_y[1, 0] + pw_y[0, 1] - pw_y[1, 1] - pw_y[0, 0]) / 2
    arrays = [t.detach().cpu().numpy() for t in (u_own, u_partner, edge_x, edge_y)]
    masks = [_graphcut(arrays[0][i], arrays[1][i], arrays[2][i], arrays[3][i], lam, beta, eta, n_labels)
             for i in range(b)]
    return torch.tensor(np.stack(masks), dtype=torch.float32, device=x.device)[:, None]


@functools.lru_cache(maxsize=8)
def _block_distance(n: int, device: str) -> torch.Tensor:
    """[n^2, n^2] squared distances between block positions, divided by (n - 1)^2."""
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], 1).float()
    return (torch.cdist(pos, pos) ** 2 / (n - 1) ** 2).to(device)


def mask_transport(mask: torch.Tensor, saliency_pool: torch.Tensor, eps: float = 0.8) -> torch.Tensor:
    """The official greedy transport plan [B, n^2, n^2] (row = source block, column = destination).

    cost = eps * distance - saliency(source) * [destination visible]; every source takes its cheapest
    destination, each contested destination keeps its cheapest source, the losers pay 1 more for it and
    retry; n rounds. Destinations nobody wins stay empty (zero), as in the official code.
    """
    b, n = mask.shape[0], mask.shape[-1]
    visible = (mask > 0).float().reshape(b, 1, n * n)
    cost = eps * _block_distance(n, str(mask.device)) - saliency_pool.reshape(b, n * n, 1) * visible
    win = torch.zeros_like(cost)
    for _ in range(n):
        plan = torch.zeros_like(cost).scatter_(-1, cost.argmin(-1, keepdim=True), 1)
        best_source = (plan * cost).argmin(-2, keepdim=True)
        win = torch.zeros_like(cost).scatter_(-2, best_source, 1) * plan
        cost = cost + (1 - win) * plan
    return win


def transport_image(img: torch.Tensor, plan: torch.Tensor, block_num: int) -> torch.Tensor:
    """Move blocks: destination block j of the result = sum_i plan[i, j] * source block i of img."""
    b, c, h, w = img.shape
    bs = h // block_num
    blocks = img.reshape(b, c, block_num, bs, block_num, bs).permute(0, 1, 2, 4, 3, 5)
    blocks = blocks.reshape(b, c, block_num ** 2, bs * bs)
    moved = torch.einsum("bij,bcik->bcjk", plan.to(img.dtype), blocks)
    return moved.reshape(b, c, block_num, block_num, bs, bs).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def puzzlemix(x: torch.Tensor, saliency: torch.Tensor, index: torch.Tensor, lam: float, block_num: int,
              transport: bool = True, t_size: int = 4, t_eps: float = 0.8, fill: Sequence[float] | None = None,
              **mask_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Puzzle Mix of x with ``x[index]``: (mixed batch, label weight of each sample's own image [B]).

    A side that is not a multiple of 16 (28 px Fashion-MNIST) is padded with ``fill`` (per channel, default 0)
    to the next multiple, mixed there and cropped back; the label weight counts only the visible pixels.
    """
    side = x.shape[-1]
    extra = -side % 16
    if extra:
        before = extra // 2
        pad = (before, extra - before) * 2
        shift = x.new_tensor(fill if fill is not None else (0.0,) * x.shape[1]).view(1, -1, 1, 1)
        x = F.pad(x - shift, pad) + shift
        saliency = F.pad(saliency, pad)
    b, _, _, width = x.shape
    block = width // block_num
    mask = graphcut_mask(x, saliency, index, block_num, lam, **mask_kwargs)
    own, partner = x, x[index]
    if transport:
        t_size = block if t_size == -1 else min(t_size, block)
        t_blocks = width // t_size
        if t_blocks != block_num:
            mask = F.interpolate(mask, size=t_blocks)
        pooled = F.avg_pool2d(saliency, t_size)
        unary = pooled / pooled.reshape(b, -1).sum(1).reshape(b, 1, 1)
        own = transport_image(own, mask_transport(mask, unary, t_eps), t_blocks)
        partner = transport_image(partner, mask_transport(1 - mask, unary[index], t_eps), t_blocks)
    mask = F.interpolate(mask, size=width).to(x.dtype)
    mixed = mask * own + (1 - mask) * partner
    if extra:
        visible = (..., slice(before, before + side), slice(before, before + side))
        mixed, mask = mixed[visible], mask[visible]
    return mixed, mask.reshape(b, -1).float().mean(-1)


class PuzzleMix(Mixer):
    """Puzzle Mix; options ``beta``, ``gamma``, ``eta``, ``neigh_size``, ``n_labels``, ``transport``, ``t_size``,
    ``t_eps`` (the official names) and ``mean``/``std`` (the input normalisation, for the smoothness term; by
    default the model's timm ``pretrained_cfg``). Needs square inputs (sides that are not a multiple of 16 are
    padded with black and cropped back, see ``puzzlemix``) and the ``gco-wrapper`` package. Reads the live
    model: mix in the training loop, not in a collate_fn."""
    name = "puzzlemix"
    live_model = True
    default_alpha = 1.0
    input_mix = None

    def __init__(self, model=None, *, beta: float = 1.2, gamma: float = 0.5, eta: float = 0.2, neigh_size: int = 4,
                 n_labels: int = 3, transport: bool = True, t_size: int = 4, t_eps: float = 0.8,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **kwargs: Any):
        _check(n_labels in (2, 3, 4), f"puzzlemix n_labels must be 2, 3 or 4, got {n_labels}")
        _check(neigh_size >= 1 and (t_size >= 1 or t_size == -1),
               f"puzzlemix neigh_size must be >= 1 and t_size >= 1 or -1, got {neigh_size} and {t_size}")
        _check(min(beta, gamma, eta, t_eps) >= 0, "puzzlemix beta, gamma, eta and t_eps must be >= 0")
        super().__init__(model, **kwargs)
        if model is None:
            raise CatchupError("puzzlemix needs input-gradient saliency: build it with the model")
        if importlib.util.find_spec("gco") is None:     # fail at build time, not at the first mixed batch
            raise CatchupError("puzzlemix needs the graph-cut package gco-wrapper: pip install gco-wrapper")
        cfg = getattr(unwrap_model(model), "pretrained_cfg", None) or {}
        self.mean = tuple(mean if mean is not None else cfg.get("mean", (0.0, 0.0, 0.0)))
        self.std = tuple(std if std is not None else cfg.get("std", (1.0, 1.0, 1.0)))
        self.mask_kwargs = dict(beta=float(beta), gamma=float(gamma), eta=float(eta), neigh_size=int(neigh_size),
                                n_labels=int(n_labels), mean=self.mean, std=self.std)
        self.transport, self.t_size, self.t_eps = bool(transport), int(t_size), float(t_eps)

    def input_plan(self, x: torch.Tensor, index: torch.Tensor) -> MixPlan:
        block_num = int(2 ** self.rng.integers(1, 5))
        lam = float(self.rng.beta(self.alpha, self.alpha))
        return MixPlan(0, lam, index, lam, {"block_num": block_num})

    def mix_input(self, x: torch.Tensor, target: torch.Tensor, plan: MixPlan) -> tuple[torch.Tensor, MixPlan]:
        if x.shape[-1] != x.shape[-2]:
            raise CatchupError(f"puzzlemix needs square images, got {tuple(x.shape[-2:])}")
        saliency = input_saliency(self.model, x, target)
        # padding, where the side needs it, is black: pixel value 0 after normalisation
        fill = [-m / s for m, s in zip(self.mean, self.std)]
        with torch.no_grad():
            x, own = puzzlemix(x, saliency, plan.index, plan.lam, plan.extras["block_num"], self.transport,
                               self.t_size, self.t_eps, fill=fill, **self.mask_kwargs)
        return x, replace(plan, own_weight=own, lam_eff=float(own.mean()))
