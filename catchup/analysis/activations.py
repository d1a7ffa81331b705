"""Activation maps of the strongest and weakest filters next to a saliency map (the paper's Figure 1a).

For each image: the input, the magnitude of the input gradient of the true-class logit (saliency), then the
k filters of the chosen stage with the largest L2 activation norm for that image and the k with the smallest.
All maps of a row share one colour scale, so weak filters look as faint as they are.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import Dataset

from catchup.errors import CatchupError
from catchup.mix.layout import channels_first
from catchup.stages import declared_format, feature_stages, infer_layout, model_label, stage_channels


def default_stage(model: nn.Module) -> str:
    """The second-to-last feature stage (stage 3 of a ResNet, where the paper draws Figure 1a)."""
    stages = [s.module_name for s in feature_stages(model)[1:]]
    return stages[-2] if len(stages) >= 2 else stages[-1]


def pick_images(dataset: Dataset, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` samples drawn without replacement with a fixed seed (eval sets are often sorted by class)."""
    if n < 1:
        raise CatchupError(f"--images must be >= 1, got {n}")
    if n > len(dataset):
        raise CatchupError(f"--images {n} exceeds the {len(dataset)} images of the eval set")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    samples = [dataset[i] for i in order]
    return torch.stack([torch.as_tensor(s[0]) for s in samples]), torch.tensor([int(s[1]) for s in samples])


def saliency(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """[N, H, W]: max over channels of |d logit_y / d x| (Simonyan et al. 2014), in eval mode."""
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(logits.gather(1, y.view(-1, 1)).sum(), x)
    return grad.abs().amax(dim=1)


def stage_output(model: nn.Module, x: Tensor, stage: str) -> tuple[Tensor, Tensor]:
    """(the stage's feature map as [N, C, h, w], NHWC stages permuted, and the logits) from one no-grad forward."""
    modules = dict(model.named_modules())
    if stage not in modules:
        names = ", ".join(s.module_name for s in feature_stages(model)[1:])
        raise CatchupError(f"the model has no stage {stage!r}; its feature stages are {names}")
    seen: list[Tensor] = []
    handle = modules[stage].register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    if not seen or seen[0].dim() != 4:
        shape = tuple(seen[0].shape) if seen and isinstance(seen[0], Tensor) else None
        raise CatchupError(f"stage {stage!r} outputs {shape or 'no tensor'}, not a spatial feature map "
                           "([N, C, H, W] or [N, H, W, C]); activation maps cannot be drawn from it")
    layout = infer_layout(seen[0].shape, stage_channels(model).get(stage), declared_format(model),
                          f"model {model_label(model)}: {stage!r}")
    return channels_first(seen[0], layout), logits


def denormalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[N, C, H, W] normalised -> [N, H, W, C] (or [N, H, W] for one channel) in [0, 1] for imshow."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    img = (x.cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return img[..., 0] if img.shape[-1] == 1 else img


def activation_figure(model: nn.Module, x: Tensor, y: Tensor, mean: Sequence[float], std: Sequence[float],
                      stage: str, topk: int = 4) -> Figure:
    """The Figure 1a grid for the images ``x`` (normalised) with labels ``y``; the model must be in eval mode."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    feats, logits = stage_output(model, x, stage)
    sal = saliency(model, x, y).cpu().numpy()
    mags = feats.abs().float().cpu()         # |h|: pre-activation ResNets output signed maps
    norms = mags.flatten(2).norm(dim=2)      # [N, C], the filter influence of Catch-up Mix
    k = max(1, min(topk, feats.shape[1] // 2))
    order = norms.argsort(dim=1, descending=True)
    chosen = torch.cat([order[:, :k], order[:, -k:]], dim=1)
    preds = logits.argmax(dim=1).cpu()
    images = denormalize(x.detach(), mean, std)
    n, cols = x.shape[0], 2 + 2 * k
    fig = Figure(figsize=(1.25 * cols, 1.3 * n + 0.4), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, cols, squeeze=False)
    titles = ["input", "saliency"] + [f"top-{j + 1}" for j in range(k)] + [f"bottom-{k - j}" for j in range(k)]
    for i in range(n):
        row_max = float(mags[i, chosen[i]].max()) or 1.0
        axes[i, 0].imshow(images[i], cmap="gray" if images.ndim == 3 else None, vmin=0, vmax=1,
                            interpolation="nearest")
        axes[i, 0].set_ylabel(f"label {int(y[i])}\npred {int(preds[i])}", fontsize=7)
        axes[i, 1].imshow(sal[i], cmap="hot", interpolation="nearest")
        for j, c in enumerate(chosen[i].tolist()):
            ax = axes[i, 2 + j]
            ax.imshow(mags[i, c].numpy(), cmap="viridis", vmin=0.0, vmax=row_max, interpolation="nearest")
            ax.set_xlabel(f"#{c} ‖h‖={norms[i, c]:.2g}", fontsize=6, labelpad=1)
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
    fig.suptitle(f"activation maps at {stage} (shared colour scale per row)", fontsize=9)
    return fig
