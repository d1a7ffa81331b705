"""FGSM robustness, PuzzleMix protocol: one signed-gradient step in [0, 1] pixel space, model in eval mode."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Gather = Callable[[Tensor], Tensor]


def _channel_stats(values: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    stats = torch.as_tensor(values, dtype=like.dtype, device=like.device).flatten()
    if stats.numel() not in (1, like.shape[1]):
        raise ValueError(f"mean/std have {stats.numel()} values for {like.shape[1]} channels")
    return stats.view(1, -1, 1, 1)


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    # A gradient w.r.t. the input only through a DDP wrapper leaves its reducer waiting for parameter
    # gradients and breaks the next forward; the inner module computes the same function.
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def fgsm_perturb(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
) -> Tensor:
    """Return the normalized FGSM image of the normalized batch `x` with true labels `y`.

    x01 = x * std + mean; x01_adv = clamp(x01 + eps * sign(d CE_sum / d x01), 0, 1); re-normalized.
    The summed loss makes each sample's gradient exactly its own (eval-mode batchnorm couples nothing).
    Only the input gradient is computed: parameter `.grad`s are left untouched. The model runs in eval
    mode and gets its previous train/eval flag back.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    net = _unwrap_ddp(model)
    mean_t, std_t = _channel_stats(mean, x), _channel_stats(std, x)
    x01 = (x.detach() * std_t + mean_t).requires_grad_(True)
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            logits = net((x01 - mean_t) / std_t)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x01)
    finally:
        net.train(was_training)
    x01_adv = (x01.detach() + eps * grad.sign()).clamp_(0.0, 1.0)
    return (x01_adv - mean_t) / std_t


def fgsm_error(
    model: nn.Module,
    loader: Iterable,
    *,
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
    device: torch.device | str,
    eps_list: Sequence[float] = (4 / 255,),
    gather: Gather | None = None,
) -> dict[float, float]:
    """FGSM top-1 error (percent, 100 - accuracy over all test images) for each eps in [0, 1] pixel units.

    `gather` (e.g. `accelerator.gather_for_metrics`) is applied to each batch's [B, len(eps_list)]
    correctness flags so multi-process runs count every test image once.
    """
    if not eps_list:
        raise ValueError("eps_list is empty")
    eps_values = [float(e) for e in eps_list]
    correct = torch.zeros(len(eps_values), dtype=torch.float64)
    total = 0
    was_training = model.training
    model.eval()
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            flags = []
            for eps in eps_values:
                x_adv = fgsm_perturb(model, x, y, eps, mean, std)
                with torch.no_grad():
                    flags.append(model(x_adv).argmax(dim=1) == y)
            batch_flags = torch.stack(flags, dim=1).long()
            if gather is not None:
                batch_flags = gather(batch_flags)
            correct += batch_flags.sum(dim=0).double().cpu()
            total += batch_flags.shape[0]
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("the loader yielded no batches")
    return {eps: float(100.0 - 100.0 * c / total) for eps, c in zip(eps_values, correct.tolist())}
