"""Co-Mixup (Kim, Choo, Jeong and Song, ICLR 2021): saliency-guided joint mixup with supermodular diversity.

Each step: the input-gradient saliency of the clean batch (sqrt of the channel mean of the squared gradient,
as the official ``main.py``), average-pooled to a ``block_num`` x ``block_num`` grid. The batch is cut into
consecutive partitions of ``part_size`` inputs; each partition of m inputs yields m outputs, every output a
labelling of the grid with input indices, found by minimising the official objective

    sum of -saliency over the blocks each output shows      (unary; minus eta * log of a Dirichlet(alpha) prior)
  + beta / 2 * label changes between neighbouring blocks    (smoothness, a Potts graph cut)
  + gamma * sum over output pairs of <usage_o, usage_o'>    (supermodular diversity of the input-usage vectors)

with the compatibility matrix A = (1 - omega) I + omega * (normalised L1 distance between the inputs' most
salient locations) weighting the diversity penalty. The official procedure: outputs are re-labelled one at a
time by an alpha-beta-swap graph cut (``gco-wrapper``) whose unaries carry the modular approximation of the
diversity term, 2 * gamma * [A u > tau] * A u (u = usage by the other outputs); from the second sweep an output
using two or three inputs may also label a block as a half-half blend of two of them; before the last sweep,
outputs using the same set of inputs are pushed apart (``set_resolve``). Label of an output = the area share of
each input in it.

Defaults from the official CIFAR-100 command (github.com/snu-mllab/Co-Mixup README and ``main.py``):
--m_block_num 4 --m_part 20 --mixup_alpha 2.0 --m_beta 0.32 --m_gamma 1.0 --m_thres 0.83 --m_thres_type hard
--m_eta 0.05 --m_omega 0.001 --m_niter 4 --set_resolve True --clean_lam 1.0. With ``clean_lam`` > 0 the
saliency pass runs in training mode and its loss becomes a clean-input term of the step; the official code adds
2 * clean_lam * CE / num_classes to a class-averaged BCE-on-softmax loss (about CE / num_classes), so against
this project's cross-entropy the same relative weight is 2 * clean_lam * CE.

Cost: the saliency pass is a full forward and backward, and the graph cuts run on the CPU, one per output and
sweep (the paper's Table 1 reports 8.6x the time of plain training).
"""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from catchup.errors import CatchupError
from catchup.mix.mixer import Mixer, _check
from catchup.mix.plan import MixPlan
from catchup.mix.puzzlemix import input_saliency
from catchup.stages import unwrap_model

__all__ = ["CoMixup", "comixup_objective", "comixup_labelling", "graphcut_labels", "compatibility_distance", "comixup"]

_PAIR_BLEND = np.array([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]])  # the official soft labels


def comixup_objective(cost: np.ndarray, mask: np.ndarray, beta: float, gamma: float) -> float:
    """The official ``obj_fn``: cost [m_in, n, n], mask [m_out, n, n, m_in]; beta and gamma already per block."""
    loss = float((cost.transpose(1, 2, 0)[None] * mask).sum())
    edges = ((mask[:, :-1] - mask[:, 1:]) ** 2).sum() + ((mask[:, :, :-1] - mask[:, :, 1:]) ** 2).sum()
    loss += beta / 2 * float(edges)
    usage = mask.reshape(mask.shape[0], -1, mask.shape[-1]).sum(1)
    return loss + gamma * float((usage.sum(0) ** 2).sum() - (usage ** 2).sum())


def graphcut_labels(unary: np.ndarray, count: np.ndarray, beta: float,
                    blend: bool) -> tuple[np.ndarray, np.ndarray]:
    """One output's labelling by graph cut (official ``graphcut_wrapper``/``graphcut_multi``): (labels [n, n],
    table [k, m]); block (r, c) takes input weights ``table[labels[r, c]]``, k = m plus the blend labels.

    With ``blend`` and two or more inputs in use, extra labels stand for half-half blends of two of them (of
    the three most used), cheaper by 5e-4 than their mean cost and 0.25 away from their two constituents.
    """
    import gco   # gco-wrapper: the graph-cut library of the official code

    n, _, m = unary.shape
    used = np.flatnonzero(count > 0)
    if blend and len(used) >= 2:
        members = used if len(used) == 2 else np.sort(np.argsort(-count, kind="stable")[:3])
        soft = np.array([[0.5, 0.5]]) if len(members) == 2 else _PAIR_BLEND
    else:
        members, soft = np.zeros(0, dtype=int), np.zeros((0, 0))
    extra = np.zeros((len(soft), m))
    extra[:, members] = soft
    costs = np.concatenate([unary, unary @ extra.T - 5e-4], axis=-1) if len(soft) else unary
    k = m + len(soft)
    pairwise = 1.0 - np.eye(k)
    pairwise[m:, :m] = np.where(extra > 0, 0.25, 1.0)
    pairwise[:m, m:] = pairwise[m:, :m].T
    edges_v, edges_h = np.full((n - 1, n), beta, np.float32), np.full((n, n - 1), beta, np.float32)
    labels = gco.cut_grid_graph(np.ascontiguousarray(costs, dtype=np.float32), pairwise.astype(np.float32),
                                edges_v, edges_h, algorithm="swap").reshape(n, n)
    return labels, np.concatenate([np.eye(m), extra])


def _resolve_identical(assigned: np.ndarray) -> np.ndarray:
    """Official ``resolve_label``: outputs using the same set of inputs get a unit cost on its first (one
    output) and second (the other) member, so the last sweep separates them."""
    add = np.zeros(assigned.shape)
    for i1 in range(len(assigned)):
        for i2 in range(i1 + 1, len(assigned)):
            members = np.flatnonzero(assigned[i1])
            if np.array_equal(assigned[i1], assigned[i2]) and len(members) > 1:
                add[i1, members[0]] = 1.0
                add[i2, members[1]] = 1.0
    return add


def comixup_labelling(cost: np.ndarray, compat: np.ndarray, rng: np.random.Generator, *, beta: float = 0.32,
                      gamma: float = 1.0, eta: float = 0.05, alpha: float = 2.0, thres: float = 0.83,
                      thres_type: str = "hard", set_resolve: bool = True,
                      n_iter: int = 4) -> tuple[np.ndarray, list[float]]:
    """Official ``get_onehot_matrix`` for one partition: cost [m, n, n] (minus the normalised saliency),
    compat [m, m] (A). Returns (mask [m_out, n, n, m_in], each block's input weights; objective per sweep)."""
    m, n, _ = cost.shape
    area = n * n
    thres, beta, gamma, eta = thres * area, beta / area, gamma / area, eta / area
    cost = cost - eta * np.log(rng.dirichlet(np.full(m, alpha)) + 1e-8)[:, None, None]
    mask = np.eye(m)[rng.integers(0, m, (m, n, n))]
    history = [comixup_objective(cost, mask, beta, gamma)]
    usage = mask.reshape(-1, m).sum(0)
    add_cost = None
    for sweep in range(n_iter):
        for i in range(m):
            count = mask[i].reshape(-1, m).sum(0)
            usage -= count
            pressure = compat @ usage
            over = pressure > thres
            modular = 2 * gamma * over * (pressure if thres_type == "hard" else pressure - thres)
            unary = cost.transpose(1, 2, 0) + modular
            if add_cost is not None:
                unary = unary + gamma * add_cost[i]
            labels, table = graphcut_labels(unary, count, beta, blend=sweep > 0)
            mask[i] = table[labels]
            usage += mask[i].reshape(-1, m).sum(0)
        if sweep == n_iter - 2 and set_resolve:
            add_cost = _resolve_identical(mask.reshape(m, -1, m).sum(1) > 0)
        history.append(comixup_objective(cost, mask, beta, gamma))
        if abs(history[-2] - history[-1]) / max(abs(history[-1]), 1e-12) < 1e-6:
            break
    return mask, history


def compatibility_distance(saliency: torch.Tensor) -> torch.Tensor:
    """[B, B] L1 distance between the inputs' most salient 8 x 8 windows (official ``main.py``)."""
    k = min(8, saliency.shape[-2], saliency.shape[-1])
    z = F.avg_pool2d(saliency[:, None].float(), kernel_size=k, stride=1)[:, 0]
    flat = z.flatten(1).argmax(1)
    pos = torch.stack([flat // z.shape[-1], flat % z.shape[-1]], 1).float()
    return torch.cdist(pos, pos, p=1)


def comixup(x: torch.Tensor, saliency: torch.Tensor, rng: np.random.Generator, block_num: int = 4,
            part_size: int = 20, omega: float = 0.001, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Co-Mixup of a batch: (mixed batch, mask [B_out, n, n, B_in]: the weight of each input in each block).

    Outputs of a partition mix only that partition's inputs, so the mask is block-diagonal in (out, in).
    """
    b, _, _, width = x.shape
    pooled = F.avg_pool2d(saliency[:, None].float(), width // block_num)[:, 0]
    dist = compatibility_distance(saliency).cpu()
    mask = torch.zeros(b, block_num, block_num, b)
    out = torch.empty_like(x)
    for start in range(0, b, part_size):
        stop = min(start + part_size, b)
        m = stop - start
        if m == 1:     # a lone input has nothing to mix with (the official A normalisation would divide by 0)
            part = np.ones((1, block_num, block_num, 1))
        else:
            sc = pooled[start:stop].cpu().double().numpy()
            cost = -sc / np.maximum(sc.reshape(m, -1).sum(1), 1e-12)[:, None, None]
            a_dist = dist[start:stop, start:stop].double().numpy()
            # all peaks at one place: the official normalisation divides by 0; fall back to no compatibility
            a_dist = a_dist / a_dist.sum() * m if a_dist.sum() > 0 else np.eye(m)
            compat = (1 - omega) * np.eye(m) + omega * a_dist
            part, _ = comixup_labelling(cost, compat, rng, **options)
        part_t = torch.from_numpy(part).float()
        mask[start:stop, :, :, start:stop] = part_t
        weights = F.interpolate(part_t.permute(0, 3, 1, 2), size=x.shape[-2:], mode="nearest")
        out[start:stop] = torch.einsum("ojhw,jchw->ochw", weights.to(x.device, x.dtype), x[start:stop])
    return out, mask.to(x.device)


class CoMixup(Mixer):
    """Co-Mixup; options ``beta``, ``gamma``, ``eta``, ``thres``, ``thres_type``, ``omega``, ``block_num``
    (-1: 2, 4, 8 or 16 at random per batch), ``part_size``, ``n_iter``, ``set_resolve``, ``clean_lam`` (the
    official m_* names without the prefix; ``alpha`` is the Dirichlet prior's). Needs square inputs whose side
    is divisible by ``block_num`` and the ``gco-wrapper`` package. Reads the live model: mix in the training
    loop, not in a collate_fn; with ``clean_lam`` > 0 add ``auxiliary_loss`` to the loss (the training engine does).

    The soft target of output o is sum_j w[o, j] * y_j with w the mask-area share of input j in o. Outputs
    have no single partner, so ``plan.index[o]`` is the input with the largest share in output o and
    ``plan.lam``/``plan.lam_eff`` the mean of those largest shares; ``plan.label_matrix`` holds w and
    ``plan.extras["mask"]`` the block mask.
    """
    name = "comixup"
    live_model = True
    default_alpha = 2.0
    input_mix = None

    def __init__(self, model=None, *, beta: float = 0.32, gamma: float = 1.0, eta: float = 0.05, thres: float = 0.83,
                 thres_type: str = "hard", omega: float = 0.001, block_num: int = 4, part_size: int = 20,
                 n_iter: int = 4, set_resolve: bool = True, clean_lam: float = 1.0, **kwargs: Any):
        _check(thres_type in ("hard", "soft"), f"comixup thres_type must be 'hard' or 'soft', got {thres_type!r}")
        _check(block_num in (-1, 1, 2, 4, 8, 16, 32), f"comixup block_num must be -1 or a power of 2 up to 32, "
                                                    f"got {block_num}")
        _check(part_size >= 2 and n_iter >= 1, f"comixup part_size must be >= 2 and n_iter >= 1, got "
                                               f"{part_size} and {n_iter}")
        _check(min(beta, gamma, eta, thres, clean_lam) >= 0 and 0 <= omega <= 1,
               "comixup beta, gamma, eta, thres and clean_lam must be >= 0 and omega in [0, 1]")
        super().__init__(model, **kwargs)
        if model is None:
            raise CatchupError("comixup needs input-gradient saliency: build it with the model")
        if importlib.util.find_spec("gco") is None:     # fail at build time, not at the first mixed batch
            raise CatchupError("comixup needs the graph-cut package gco-wrapper: pip install gco-wrapper")
        self.block_num, self.part_size, self.omega = int(block_num), int(part_size), float(omega)
        self.clean_lam = float(clean_lam)
        self.options = dict(beta=float(beta), gamma=float(gamma), eta=float(eta), alpha=self.alpha,
                            thres=float(thres), thres_type=thres_type, set_resolve=bool(set_resolve),
                            n_iter=int(n_iter))
        self._clean_loss: torch.Tensor | None = None

    def sample_plan(self, x: torch.Tensor) -> MixPlan | None:
        self._clean_loss = None
        return super().sample_plan(x)

    def pair(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.arange(batch_size, device=device)   # outputs get their inputs from the graph cut, not a pairing

    def input_plan(self, x: torch.Tensor, index: torch.Tensor) -> MixPlan:
        block_num = self.block_num if self.block_num > 0 else int(2 ** self.rng.integers(1, 5))
        return MixPlan(0, 1.0, index, 1.0, {"block_num": block_num})

    def mix_input(self, x: torch.Tensor, target: torch.Tensor, plan: MixPlan) -> tuple[torch.Tensor, MixPlan]:
        block_num = plan.extras["block_num"]
        if x.shape[-1] != x.shape[-2] or x.shape[-1] % block_num:
            raise CatchupError(f"comixup needs square images with a side divisible by block_num {block_num}, "
                               f"got {tuple(x.shape[-2:])}")
        saliency = self._saliency(x, target)
        with torch.no_grad():
            x, mask = comixup(x, saliency, self.rng, block_num, self.part_size, self.omega, **self.options)
        weights = mask.float().mean((1, 2))                  # [B_out, B_in] area shares
        top, index = weights.max(1)
        share = float(top.mean())
        return x, replace(plan, index=index, lam=share, lam_eff=share, label_matrix=weights,
                          extras={**plan.extras, "mask": mask})

    def auxiliary_loss(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The clean-input term 2 * clean_lam * CE of this step's saliency pass (None without one)."""
        loss, self._clean_loss = self._clean_loss, None
        return loss

    def _saliency(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.clean_lam == 0:
            return input_saliency(self.model, x, target)
        # As the official clean_lam > 0 path: a training-mode forward whose loss both gives the saliency and,
        # kept with its graph, regularises the step on the clean batch.
        base = unwrap_model(self.model)
        x_var = x.detach().float().requires_grad_(True)
        with torch.enable_grad():
            loss = 2 * self.clean_lam * F.cross_entropy(base(x_var).float(), target)
            (grad,) = torch.autograd.grad(loss, x_var, retain_graph=True)
        self._clean_loss = loss
        return grad.pow(2).mean(1).sqrt()
