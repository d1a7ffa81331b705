"""Input-level baselines: Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), in timm's conventions.

Besides one lambda per batch (mode 'batch'), they offer timm's per-sample modes: 'elem' draws the gate, the
mix (CutMix or Mixup, see ``switch_prob``) and lambda for every sample, 'pair' for every pair of samples that
are each other's partner (and, under CutMix, swap the same box).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from catchup.mix.mixer import Mixer
from catchup.mix.ops import cutmix, mixup, rand_box
from catchup.mix.plan import MixPlan

__all__ = ["InputMixup", "CutMix", "cutmix", "mixup", "rand_box"]


class _InputLevel(Mixer):
    modes = ("batch", "elem", "pair")

    def gate(self) -> bool:
        return super().gate() if self.mode == "batch" else True    # per sample or pair, in input_plan

    def pair(self, batch_size: int, device: torch.device) -> torch.Tensor:
        index = super().pair(batch_size, device)
        if self.mode != "pair":
            return index
        # consecutive entries of the permutation become each other's partner (a lone last sample keeps itself)
        order, swapped = index.clone(), index.clone()
        half = batch_size // 2 * 2
        swapped[order[0:half:2]], swapped[order[1:half:2]] = order[1:half:2], order[0:half:2]
        if half < batch_size:
            swapped[order[-1]] = order[-1]
        return swapped

    def input_plan(self, x: torch.Tensor, index: torch.Tensor) -> MixPlan:
        if self.mode == "batch":
            return super().input_plan(x, index)
        b = x.shape[0]
        # one unit per sample ('elem') or per pair ('pair': a pair's members share the unit of the lower one)
        unit = torch.minimum(torch.arange(b), index.cpu()) if self.mode == "pair" else torch.arange(b)
        use_cutmix = (self.rng.random(b) < self.switch_prob if len(self.input_mixes) > 1
                      else np.full(b, self.input_mixes[0] == "cutmix"))
        # both draws for every unit, as timm does; an alpha of 0 marks a mix that is off (never selected)
        lam = np.where(use_cutmix, self.rng.beta(self.cutmix_alpha or 1.0, self.cutmix_alpha or 1.0, b),
                       self.rng.beta(self.alpha or 1.0, self.alpha or 1.0, b))
        lam = np.where(self.rng.random(b) < self.prob, lam, 1.0)
        unit_boxes = {u: rand_box(self.rng, x.shape[-2], x.shape[-1], float(lam[u]), self.cutmix_minmax)
                      for u in sorted(set(unit.tolist())) if use_cutmix[u] and lam[u] < 1.0}
        lam, use_cutmix = lam[unit.numpy()], use_cutmix[unit.numpy()]
        boxes = [unit_boxes.get(u) for u in unit.tolist()]
        extras = {"lams": torch.from_numpy(lam), "use_cutmix": torch.from_numpy(use_cutmix), "boxes": boxes}
        return MixPlan(0, float(lam.mean()), index, float(lam.mean()), extras)

    def mix_input(self, x: torch.Tensor, target: torch.Tensor, plan: MixPlan) -> tuple[torch.Tensor, MixPlan]:
        if self.mode == "batch":
            return super().mix_input(x, target, plan)
        lam = plan.extras["lams"].to(x.device, torch.float32)
        weight = lam.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        out = torch.where(plan.extras["use_cutmix"].to(x.device).view_as(weight), x, mixup(x, plan.index, weight))
        own = lam.clone()
        area = float(x.shape[-2] * x.shape[-1])
        for i, box in enumerate(plan.extras["boxes"]):
            if box is not None:
                y0, y1, x0, x1 = box
                out[i, ..., y0:y1, x0:x1] = x[int(plan.index[i]), ..., y0:y1, x0:x1]
                if self.correct_lam or self.cutmix_minmax is not None:
                    own[i] = 1.0 - (y1 - y0) * (x1 - x0) / area
        return out, replace(plan, own_weight=own, lam_eff=float(own.mean()))


class InputMixup(_InputLevel):
    """``lam * x + (1 - lam) * x[index]`` with lambda ~ Beta(alpha, alpha); labels mixed with lambda."""
    name = "mixup"
    default_alpha = 1.0
    input_mix = "mixup"


class CutMix(_InputLevel):
    """A partner's box pasted in, lambda ~ Beta(cutmix_alpha, cutmix_alpha), label weight = kept area."""
    name = "cutmix"
    input_mix = "cutmix"
