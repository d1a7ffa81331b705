"""SaliencyMix (Uddin et al., ICLR 2021): a CutMix box centred on the peak of the partner's saliency map.

Defaults from the official code (github.com/afm-shahab-uddin/SaliencyMix, ``--beta 1.0 --cutmix_prob 0.5``):
lambda ~ Beta(1, 1), mixing probability 0.5, one box per batch located from the saliency of the first partner
image, label weight corrected to the box area.

The saliency detectors are OpenCV contrib's static detectors (``cv2.saliency``), which the project's
requirements do not include (and which run per image on the host); both are written here in torch, batched,
on the batch's device, and agree with OpenCV 5 on well-posed inputs. ``spectral_residual`` (Hou & Zhang 2007)
is the default: it finds an isolated salient object reliably. ``fine_grained`` (Montabone & Soto 2010) is the
detector the official code calls; it responds to every local contrast, and the official code hands it the
normalised float tensor, which OpenCV's 8-bit implementation reads as raw bytes, so the official boxes are
close to random.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from catchup.mix.mixer import Mixer, _check
from catchup.mix.plan import MixPlan

__all__ = ["SaliencyMix", "fine_grained_saliency", "spectral_residual_saliency", "saliency_map", "saliency_peak",
           "centered_box", "box_mask", "saliencymix"]

DETECTORS = ("spectral_residual", "fine_grained")
_SCALES = (12, 24, 48, 28, 56, 112)   # OpenCV StaticSaliencyFineGrained's centre-surround neighbourhoods
_SPECTRAL_SIZE = 64                   # OpenCV StaticSaliencySpectralResidual works on a 64 x 64 image
_AMPLITUDE_FLOOR = 1e-4               # smallest spectral amplitude kept, relative to the largest


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H, W] float32: ITU-R 601 luma for RGB images, the channel mean otherwise."""
    x = x.float()
    if x.shape[1] == 3:
        return torch.einsum("bchw,c->bhw", x, x.new_tensor([0.299, 0.587, 0.114]))
    return x.mean(1)


def _filter2d(img: torch.Tensor, kernel_1d: torch.Tensor) -> torch.Tensor:
    """Separable 'same' filter with reflect-101 borders (OpenCV's BORDER_DEFAULT), [B, H, W]."""
    r = kernel_1d.numel() // 2
    x = img[:, None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), kernel_1d.view(1, 1, 1, -1).to(x))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), kernel_1d.view(1, 1, -1, 1).to(x))
    return x[:, 0]


def fine_grained_saliency(gray: torch.Tensor) -> torch.Tensor:
    """Montabone & Soto's centre-surround saliency, OpenCV's StaticSaliencyFineGrained in float arithmetic.

    The grey image is smoothed twice with a 3x3 Gaussian; at six neighbourhood sizes the mean of the
    surround (box minus centre, clipped to the image) is compared with the centre: 'on' = centre brighter,
    'off' = centre darker. On and off maps are summed over scales, each normalised by its maximum, and added.
    OpenCV does the same in 8-bit integers (truncating at every step); floats keep the ordering of the map.
    gray: [B, H, W] -> [B, H, W] in [0, 1].
    """
    g = gray.double()
    smooth = g.new_tensor([0.25, 0.5, 0.25])   # OpenCV's fixed 3-tap kernel for ksize 3, sigma 0
    g = _filter2d(_filter2d(g, smooth), smooth)
    b, h, w = g.shape
    integral = F.pad(g.cumsum(1).cumsum(2), (1, 0, 1, 0))            # [B, H + 1, W + 1]
    rows, cols = torch.arange(h, device=g.device), torch.arange(w, device=g.device)
    on, off = torch.zeros_like(g), torch.zeros_like(g)
    for n in _SCALES:
        y1, y2 = (rows - n + 1).clamp(0, h), (rows + n + 1).clamp(0, h)
        x1, x2 = (cols - n + 1).clamp(0, w), (cols + n + 1).clamp(0, w)
        total = (integral[:, y2][:, :, x2] + integral[:, y1][:, :, x1]
                 - integral[:, y2][:, :, x1] - integral[:, y1][:, :, x2])
        count = (y2 - y1)[:, None] * (x2 - x1)[None, :] - 1
        surround = (total - g) / count.clamp_min(1)
        on += (g - surround).clamp_min(0)
        off += (surround - g).clamp_min(0)
    tiny = torch.finfo(g.dtype).tiny
    on = on / on.amax((1, 2), keepdim=True).clamp_min(tiny)
    off = off / off.amax((1, 2), keepdim=True).clamp_min(tiny)
    sal = on + off
    return (sal / sal.amax((1, 2), keepdim=True).clamp_min(tiny)).float()


def spectral_residual_saliency(gray: torch.Tensor) -> torch.Tensor:
    """Hou & Zhang's spectral residual, step for step as OpenCV's StaticSaliencySpectralResidual.

    Resize to 64 x 64; log amplitude spectrum minus its 3x3 mean; back to the image domain with the original
    phase; magnitude, 5x5 Gaussian blur (sigma 8), squared (OpenCV blurs before squaring); normalised to a
    maximum of 1 and resized back. gray: [B, H, W] -> [B, H, W] in [0, 1].
    """
    b, h, w = gray.shape
    g = F.interpolate(gray[:, None].float(), size=(_SPECTRAL_SIZE, _SPECTRAL_SIZE), mode="bilinear",
                      align_corners=False)[:, 0].double()
    spectrum = torch.fft.fft2(g)
    # Upsampling (CIFAR's 32 px to 64) zeroes the Nyquist row and column of the spectrum; their log amplitude
    # would be rounding noise that swamps the map (OpenCV has this flaw), so amplitudes get a relative floor.
    amplitude = spectrum.abs()
    amplitude = torch.maximum(amplitude, amplitude.amax((1, 2), keepdim=True) * _AMPLITUDE_FLOOR)
    amplitude = amplitude.clamp_min(torch.finfo(torch.float64).tiny)
    log_amp = amplitude.log()
    residual = log_amp - _filter2d(log_amp, log_amp.new_full((3,), 1.0 / 3.0))
    # exp(residual + i * phase) = exp(residual) * spectrum / |spectrum|
    sal = torch.fft.ifft2(spectrum / amplitude * residual.exp()).abs()
    taps = torch.arange(-2, 3, dtype=torch.float64, device=g.device)
    gauss = torch.exp(-taps ** 2 / (2 * 8.0 ** 2))
    sal = _filter2d(sal, gauss / gauss.sum()) ** 2
    sal = sal / sal.amax((1, 2), keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return F.interpolate(sal[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0]


def saliency_map(x: torch.Tensor, detector: str = "spectral_residual") -> torch.Tensor:
    """[B, C, H, W] images -> [B, H, W] saliency in [0, 1] (no gradient)."""
    fn = spectral_residual_saliency if detector == "spectral_residual" else fine_grained_saliency
    with torch.no_grad():
        return fn(to_gray(x))


def saliency_peak(saliency: torch.Tensor) -> torch.Tensor:
    """LongTensor [B, 2]: (row, col) of each map's maximum, the first one in raster order on ties."""
    w = saliency.shape[-1]
    flat = saliency.flatten(1).argmax(1)
    return torch.stack([flat // w, flat % w], 1)


def centered_box(cy: int, cx: int, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """The CutMix box (y0, y1, x0, x1) of side sqrt(1 - lam) centred on (cy, cx), clipped to the image.

    Same rounding as the project's CutMix (timm's rand_bbox), so a box of side >= 1 always holds its centre.
    """
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    return y0, y1, x0, x1


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bool [B, 1, H, W]: True inside each row's box (y0, y1, x0, x1) of ``boxes`` [B, 4]."""
    rows = torch.arange(height, device=boxes.device).view(1, -1, 1)
    cols = torch.arange(width, device=boxes.device).view(1, 1, -1)
    y0, y1, x0, x1 = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    return ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[:, None]


def saliencymix(x: torch.Tensor, index: torch.Tensor, lam: float, detector: str = "spectral_residual",
                per_sample: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste each partner's box, centred on the partner's saliency peak, at the same place in the sample.

    Batch mode (the official code): one box for the whole batch, from the saliency of the partner of sample 0.
    ``per_sample``: every pair gets the box around its own partner's peak. Returns the mixed batch (out of
    place), the boxes [B, 4] (y0, y1, x0, x1) and the label weight of each sample's own image,
    1 - box area / image area.
    """
    b, _, h, w = x.shape
    sources = index if per_sample else index[:1]
    peaks = saliency_peak(saliency_map(x[sources], detector)).tolist()
    boxes = torch.tensor([centered_box(cy, cx, h, w, lam) for cy, cx in peaks], device=x.device)
    boxes = boxes.expand(b, 4)
    mixed = torch.where(box_mask(boxes, h, w), x[index], x)
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])
    return mixed, boxes, 1.0 - area.float() / (h * w)


class SaliencyMix(Mixer):
    """CutMix whose box sits on the partner image's most salient pixel; lambda ~ Beta(alpha, alpha).

    Options: ``detector`` ('spectral_residual', or 'fine_grained' as the official code), ``per_sample``
    (one box per pair instead of the official one box per batch). Official defaults: alpha 1, prob 0.5.
    """
    name = "saliencymix"
    default_alpha = 1.0
    default_prob = 0.5
    input_mix = None

    def __init__(self, model=None, *, detector: str = "spectral_residual", per_sample: bool = False, **kwargs: Any):
        _check(detector in DETECTORS, f"saliencymix detector must be one of {', '.join(DETECTORS)}, got {detector!r}")
        super().__init__(model, **kwargs)
        self.detector, self.per_sample = detector, bool(per_sample)

    def input_plan(self, x: torch.Tensor, index: torch.Tensor) -> MixPlan:
        lam = float(self.rng.beta(self.alpha, self.alpha))
        return MixPlan(0, lam, index, lam)

    def mix_input(self, x: torch.Tensor, target: torch.Tensor, plan: MixPlan) -> tuple[torch.Tensor, MixPlan]:
        mixed, boxes, own = saliencymix(x, plan.index, plan.lam, self.detector, self.per_sample)
        # one label weight per pair
        return mixed, replace(plan, own_weight=own, lam_eff=float(own.mean()), extras={**plan.extras, "boxes": boxes})
