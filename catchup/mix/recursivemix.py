"""RecursiveMix (Yang et al. 2022, arXiv:2203.06844): paste the previous (already mixed) batch, shrunk, into
a random box of the current one; labels mix recursively with the previous soft targets, and a consistency
term ties the prediction read from the pasted region back to the previous batch's prediction.

Defaults from the official code (github.com/implus/RecursiveMix-pytorch): pasted area share ~ U(0, alpha)
with alpha 0.5, a CutMix-style box clipped to the image, nearest-neighbour resizing, omega 0.5 (the argparse
default; its CIFAR-10 README example uses 0.1). The consistency term is
``omega * (1 - lam) * KL(softmax(previous logits) || softmax(head(RoIAlign(feature map, box))))``: the official
loss is the soft cross-entropy, which differs from the KL by the (constant) target entropy, so the gradients
are the same and the term is 0 when the predictions agree. The ROI features go through the model's own head
(the official ``--share_fc`` option; its default trains a second classifier, which the optimizer here does
not know). The official code passes (row, col) boxes as RoIAlign's (x, y); here x is the column.

The ROI term needs the last feature map: it is captured with a forward pre-hook on the model's timm
``global_pool`` module (its input is the ``forward_features`` output) and mapped to logits by
``forward_head``. Models without them train without the term (a warning says so). The official loop forgets
the history at each epoch start; here the history runs on (the mixer does not see epochs). When the batch
grows (after a short last batch), history rows are reused cyclically.
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from catchup.mix.mixer import Mixer, _check
from catchup.mix.ops import rand_box
from catchup.mix.plan import MixPlan
from catchup.stages import unwrap_model

__all__ = ["RecursiveMix", "recursive_mix", "recursive_target", "roi_consistency"]


def recursive_mix(x: torch.Tensor, old_x: torch.Tensor, box: tuple[int, int, int, int],
                  mode: str = "nearest") -> tuple[torch.Tensor, float]:
    """Paste ``old_x`` (x's batch size; the caller picks the history rows) resized to ``box`` (y0, y1, x0, x1)
    into x, out of place. Returns the mixed batch and lam = 1 - box area share (the weight of the new labels)."""
    y0, y1, x0, x1 = box
    h, w = x.shape[-2:]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    out = x.clone()
    if lam < 1.0:
        align = False if mode in ("bilinear", "bicubic") else None
        out[..., y0:y1, x0:x1] = F.interpolate(old_x.to(x.dtype), size=(y1 - y0, x1 - x0), mode=mode,
                                               align_corners=align)
    return out, lam


def recursive_target(y: torch.Tensor, old_y: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * y + (1 - lam) * old_y``: the new labels and the previous batch's (already mixed) soft targets."""
    return lam * y + (1.0 - lam) * old_y.to(y.dtype)


def roi_consistency(roi_logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL(softmax(old_logits) || softmax(roi_logits)), in float32."""
    return F.kl_div(roi_logits.float().log_softmax(-1), old_logits.float().log_softmax(-1), reduction="batchmean",
                    log_target=True)


class RecursiveMix(Mixer):
    """RecursiveMix; ``alpha`` is the largest pasted area share (default 0.5), ``omega`` the consistency weight,
    ``mode`` the resize interpolation. The history (previous mixed batch, its soft targets and logits) is part
    of ``state_dict()``. Mix in the training loop (the history lives in this object), not in a collate_fn."""
    name = "recursivemix"
    live_model = True
    default_alpha = 0.5
    input_mix = None

    def __init__(self, model=None, *, omega: float = 0.5, interpolation: str = "nearest", **kwargs: Any):
        _check(omega >= 0, f"recursivemix omega must be >= 0, got {omega}")
        _check(interpolation in ("nearest", "bilinear", "bicubic", "area"), f"recursivemix interpolation "
               f"{interpolation!r} is not one of nearest, bilinear, bicubic, area")
        super().__init__(model, **kwargs)
        self.omega, self.interpolation = float(omega), interpolation
        _check(self.alpha <= 1.0, f"recursivemix alpha (timm's --mixup) is the largest pasted area share, in (0, 1]; "
                                  f"got {self.alpha}")
        self._history: dict[str, torch.Tensor | None] = {"x": None, "target": None, "logits": None}
        self._pending: dict[str, Any] | None = None     # this step's box and the logits the ROI should match
        self._features: torch.Tensor | None = None      # the last feature map of this step's forward
        self._armed = False
        self._handle = None
        self._pool = self._find_pool(model) if self.omega > 0 else None
        if self._pool is not None:
            # A closure, not a bound method: deepcopy (an EMA model) copies functions by reference but would
            # copy a bound method's mixer, history included.
            self._handle = self._pool.register_forward_pre_hook(lambda module, inputs: self._capture(module, inputs))

    # ---- the last feature map ------------------------------------------------------------------------

    @staticmethod
    def _find_pool(model: nn.Module | None) -> nn.Module | None:
        base = unwrap_model(model) if model is not None else None
        pool = getattr(base, "global_pool", None)
        if isinstance(pool, nn.Module) and callable(getattr(base, "forward_head", None)):
            return pool
        warnings.warn(f"recursivemix: {type(base).__name__} has no timm global_pool module and forward_head, "
                      "so the ROI consistency term is skipped", stacklevel=3)
        return None

    def _capture(self, module: nn.Module, inputs: tuple) -> None:
        # Only the armed training forward of this model (an EMA deepcopy carries the hook to other modules).
        if self._armed and module.training and module is self._pool and isinstance(inputs[0], torch.Tensor):
            self._armed = False
            self._features = inputs[0] if inputs[0].dim() == 4 else None

    def arm(self, plan: MixPlan | None) -> None:
        self._features = None
        self._armed = self._pool is not None and self._pending is not None

    # ---- mixing --------------------------------------------------------------------------------------

    def sample_plan(self, x: torch.Tensor) -> MixPlan | None:
        self._pending = None
        return super().sample_plan(x) if self._history["x"] is not None else None

    def pair(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Not partners but the history row each sample is pasted from: cyclic when the history is short."""
        return torch.arange(batch_size, device=device) % self._history["x"].shape[0]

    def input_plan(self, x: torch.Tensor, index: torch.Tensor) -> MixPlan:
        share = float(self.rng.uniform(0.0, self.alpha))
        box = rand_box(self.rng, x.shape[-2], x.shape[-1], 1.0 - share)
        return MixPlan(0, share, index, 1.0, {"box": box})

    def observe(self, x: torch.Tensor, soft: torch.Tensor, plan: MixPlan | None) -> None:
        if plan is None:
            self._pending = None
        self._history = {"x": x.detach().clone(), "target": soft.detach().clone(), "logits": None}

    def mix_input(self, x: torch.Tensor, target: torch.Tensor, plan: MixPlan) -> tuple[torch.Tensor, MixPlan]:
        rows, hist = plan.index, self._history
        x, lam_eff = recursive_mix(x, hist["x"].to(x.device)[rows], plan.extras["box"], self.interpolation)
        # the labels mix recursively: the pasted rows bring the previous batch's soft targets
        plan = replace(plan, lam_eff=lam_eff, partner_target=hist["target"][rows.to(hist["target"].device)])
        if plan.lam_eff < 1.0 and hist["logits"] is not None:
            self._pending = {"box": plan.extras["box"], "lam": plan.lam_eff, "image_size": tuple(x.shape[-2:]),
                             "logits": hist["logits"].to(x.device)[rows]}
        return x, plan

    def auxiliary_loss(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The ROI consistency term of this step (None when nothing was pasted or no history logits exist);
        also records this step's logits as the history the next step's ROI term matches."""
        pending, features = self._pending, self._features
        self._pending, self._features, self._armed = None, None, False
        if self._history["x"] is not None and logits.shape[0] == self._history["x"].shape[0]:
            self._history["logits"] = logits.detach().float().clone()
        if pending is None or features is None:
            return None
        y0, y1, x0, x1 = pending["box"]
        width = pending["image_size"][1]
        b = features.shape[0]
        rois = torch.tensor([[0.0, x0, y0, x1, y1]], device=features.device).repeat(b, 1)
        rois[:, 0] = torch.arange(b, device=features.device)       # (batch index, x0, y0, x1, y1)
        pooled = roi_align(features.float(), rois, output_size=(1, 1), spatial_scale=features.shape[-1] / width,
                           sampling_ratio=-1, aligned=True)
        base = unwrap_model(self.model)
        weight = next(base.parameters())
        roi_logits = base.forward_head(pooled.to(weight.dtype))
        return self.omega * (1.0 - pending["lam"]) * roi_consistency(roi_logits, pending["logits"])

    # ---- checkpointing -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["history"] = {k: (v.detach().cpu() if v is not None else None) for k, v in self._history.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        history = state.get("history") or {}
        self._history = {k: history.get(k) for k in ("x", "target", "logits")}
        self._pending, self._features, self._armed = None, None, False

    def remove(self) -> None:
        super().remove()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
