"""Manifold Mixup's deformation battery (random rotation, random shear, fixed zoom) on whole batches.

Conventions, taken from the code Manifold Mixup ran (torchsample's Rotation/Shear/Zoom on top of
`scipy.ndimage.affine_transform(order=0)`):

- every matrix maps OUTPUT pixel coordinates to INPUT coordinates, both as (row, col) offsets from the
  image centre; so zoom diag(z, z) with z < 1 samples a smaller input area, i.e. zooms in;
- rotation: angle uniform in [-d, d] degrees per image, matrix [[cos, -sin], [sin, cos]];
- shear: s uniform in [-S, S] RADIANS per image (S = 0.5 and 1.0, the paper's "±28.6°" and "±57.2°"),
  matrix [[1, -sin s], [0, cos s]] acting on (row, col): each column is shifted vertically in proportion
  to its distance from the centre, and the image is stretched horizontally by 1 / cos s. Not
  torchvision's tan-shear;
- nearest-neighbour sampling, fill value 0 outside the input, applied to the NORMALIZED batch.

The centre: torchsample (after Keras' `transform_matrix_offset_center`) turns about size/2 + 0.5 in pixel
indices, one pixel below and right of the true centre (size-1)/2. `centre="true"` (the default) turns about
the true centre; `centre="keras"` reproduces the original, whose off-centre turn also shifts the image (on
8x8 digits the two differ by up to 15 points at zoom 140 %, less on larger images).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from catchup.errors import CatchupError


@dataclass(frozen=True)
class DeformationSpec:
    kind: str  # "rotate" | "shear" | "zoom"
    magnitude: float  # rotate: bound in degrees; shear: bound in radians; zoom: the fixed factor z
    label: str  # for tables and plots, as the paper's Table 2 names it


DEFORMATIONS: dict[str, DeformationSpec] = {
    "rotate_20": DeformationSpec("rotate", 20.0, "Rotate ±20°"),
    "rotate_40": DeformationSpec("rotate", 40.0, "Rotate ±40°"),
    "shear_28.6": DeformationSpec("shear", 0.5, "Shear ±28.6° (0.5 rad)"),
    "shear_57.2": DeformationSpec("shear", 1.0, "Shear ±57.2° (1.0 rad)"),
    "zoom_60": DeformationSpec("zoom", 0.6, "Zoom 60%"),
    "zoom_80": DeformationSpec("zoom", 0.8, "Zoom 80%"),
    "zoom_120": DeformationSpec("zoom", 1.2, "Zoom 120%"),
    "zoom_140": DeformationSpec("zoom", 1.4, "Zoom 140%"),
}


def rotation_matrices(degrees: Tensor) -> Tensor:
    """[N] angles in degrees -> [N, 2, 2] output-to-input (row, col) matrices; +90 equals torch.rot90(k=-1)."""
    t = torch.deg2rad(degrees.double())
    c, s = torch.cos(t), torch.sin(t)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def shear_matrices(radians: Tensor) -> Tensor:
    """[N] shear angles in radians -> [N, 2, 2] output-to-input (row, col) matrices [[1, -sin], [0, cos]]."""
    s = radians.double()
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    return torch.stack([torch.stack([one, -torch.sin(s)], -1), torch.stack([zero, torch.cos(s)], -1)], -2)


def zoom_matrices(zoom: float, n: int) -> Tensor:
    """diag(z, z) for n images; z < 1 zooms in, z > 1 zooms out."""
    if zoom <= 0:
        raise ValueError(f"zoom must be > 0, got {zoom}")
    return (torch.eye(2, dtype=torch.float64) * zoom).expand(n, 2, 2).clone()


def sample_matrices(spec: DeformationSpec, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw the per-image [n, 2, 2] matrices of one deformation (uniform in [-bound, bound] where random)."""
    if spec.kind == "zoom":
        return zoom_matrices(spec.magnitude, n)
    u = torch.rand(n, generator=generator, dtype=torch.float64) * 2.0 - 1.0
    if spec.kind == "rotate":
        return rotation_matrices(u * spec.magnitude)
    if spec.kind == "shear":
        return shear_matrices(u * spec.magnitude)
    raise ValueError(f"unknown deformation kind {spec.kind!r}")


CENTRES = ("true", "keras")


def warp_batch(x: Tensor, matrices: Tensor, centre: str = "true") -> Tensor:
    """Warp [N, C, H, W] with per-image output-to-input (row, col) matrices about the image centre.

    Nearest sampling, zeros outside. align_corners=False puts normalized 0 on the true centre
    (H-1)/2, (W-1)/2 and pixel centres on a lattice that a quarter turn maps onto itself exactly.
    ``centre="keras"`` turns about (H/2 + 0.5, W/2 + 0.5) instead, as torchsample did.
    """
    if centre not in CENTRES:
        raise CatchupError(f"deformation centre must be one of {', '.join(CENTRES)}, got {centre!r}")
    if x.ndim != 4:
        raise ValueError(f"expected an [N, C, H, W] batch, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    if matrices.shape != (n, 2, 2):
        raise ValueError(f"expected matrices of shape ({n}, 2, 2), got {tuple(matrices.shape)}")
    m = matrices.double().cpu()
    # (row, col) -> affine_grid's (x=col, y=row): swap both axes, then rescale pixel offsets to [-1, 1] units
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    half = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64)
    m_xy = swap @ m @ swap
    linear = m_xy * half[None, :] / half[:, None]  # D^-1 M D with D = diag(W/2, H/2)
    shift = torch.zeros(n, 2, 1, dtype=torch.float64)
    if centre == "keras":
        # about c = true centre + d, d = (1, 1) pixels: in = M (out - d) + d = M out + (I - M) d
        d = torch.ones(2, 1, dtype=torch.float64)
        shift = ((torch.eye(2, dtype=torch.float64) - m_xy) @ d) / half[:, None]
    theta = torch.cat([linear, shift], dim=2)
    work_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    theta = theta.to(device=x.device, dtype=work_dtype)
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    out = F.grid_sample(x.to(work_dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.to(x.dtype)


def deform_batch(x: Tensor, name: str, generator: torch.Generator | None = None, centre: str = "true") -> Tensor:
    """Apply the named deformation of DEFORMATIONS to a normalized batch.

    Parameters are drawn per image, in batch order, from `generator` (a seeded CPU generator makes reruns
    identical). Under several processes each rank draws its own stream for its own shard, so the exact
    draws depend on the world size; the distribution does not.
    """
    spec = DEFORMATIONS.get(name)
    if spec is None:
        raise CatchupError(f"unknown deformation {name!r}; choose from {', '.join(DEFORMATIONS)}")
    return warp_batch(x, sample_matrices(spec, x.shape[0], generator), centre)

