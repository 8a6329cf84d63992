"""Input normalisation and batched on-device augmentation: rotation, translation, optional elastic distortion
and erasing; never flips or crops (a mirrored or cropped kana is another glyph or none)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.config import AugmentSettings

PIXEL_MAX = 255.0  # uint8 ink intensity; the stored mean/std are in 0..1 units
# Random erasing box, as in torchvision.transforms.RandomErasing (Zhong et al., arXiv:1708.04896).
ERASE_AREA = (0.02, 0.33)  # fraction of the image area
ERASE_ASPECT = (0.3, 3.3)  # height / width
ERASE_VALUE = 0.0  # black = background, so an erased box looks like missing ink, not a new stroke
# Elastic distortion (after Simard et al., ICDAR 2003) as a random displacement on a coarse grid of control
# points, upsampled bicubically: one smooth bend over a few strokes, drawn as 2 x 4 x 4 numbers an image.
ELASTIC_GRID = 4


def normalize(x: torch.Tensor, mean: torch.Tensor | float, std: torch.Tensor | float) -> torch.Tensor:
    """Raw 0..255 pixels -> standardised input: ``(x / 255 - mean) / std`` (mean/std in 0..1 units)."""
    return (x / PIXEL_MAX - mean) / std


def affine_warp(images: torch.Tensor, theta: torch.Tensor, displacement: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Warp ``images`` (N, C, H, W) by per-sample matrices ``theta`` (N, 2, 3) in normalised coordinates,
    plus an optional per-pixel ``displacement`` (N, H, W, 2) of the sampling grid in the same units.

    Pixels that come from outside the frame are 0 (black background).
    """
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    if displacement is not None:
        grid = grid + displacement.to(grid.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotation_matrices(angle_rad: torch.Tensor, tx: torch.Tensor | float = 0.0, ty: torch.Tensor | float = 0.0
                      ) -> torch.Tensor:
    """(N, 2, 3) rotation + translation matrices (output -> input coordinates, range [-1, 1])."""
    cos, sin = torch.cos(angle_rad), torch.sin(angle_rad)
    tx, ty = torch.as_tensor(tx).expand_as(cos), torch.as_tensor(ty).expand_as(cos)
    return torch.stack([torch.stack([cos, -sin, tx], dim=1), torch.stack([sin, cos, ty], dim=1)], dim=1)


def rotation_grids(degrees: Sequence[float], side: int) -> torch.Tensor:
    """(V, side, side, 2) sampling grids of a square image rotated by each angle about its centre: the
    fixed views that test-time augmentation averages (pipeline.model), computed once."""
    angles = torch.deg2rad(torch.tensor([float(d) for d in degrees], dtype=torch.float32))
    return F.affine_grid(rotation_matrices(angles), [len(angles), 1, side, side], align_corners=False)


def sample_views(images: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """(V * N, C, H, W): every image of ``images`` (N, C, H, W) through each of ``grids`` (V, H, W, 2),
    view-major (all images in view 0, then view 1, ...). Black fill, as ``affine_warp``."""
    views, count = grids.shape[0], images.shape[0]
    tiled = grids.to(images.dtype).unsqueeze(1).expand(-1, count, -1, -1, -1).flatten(0, 1)
    return F.grid_sample(images.repeat(views, 1, 1, 1), tiled, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


class BatchAugment:
    """Random rotation + translation (+ optional elastic distortion and erasing) of a float batch (N, 1, H, W)
    of raw pixels.

    All random numbers come from ``generator`` (a CPU ``torch.Generator``) so a run is reproducible and
    its state can be checkpointed; only the small per-sample parameters travel to the device.
    """

    def __init__(self, settings: AugmentSettings, generator: torch.Generator | None = None) -> None:
        self.rotation_deg = settings.rotation_deg
        self.translate_frac = settings.translate_frac
        self.erasing_prob = settings.erasing_prob
        self.elastic_px = settings.elastic_px
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    @property
    def warps(self) -> bool:
        return self.rotation_deg > 0 or self.translate_frac > 0 or self.elastic_px > 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"BatchAugment expects a float batch (N, 1, H, W); got shape "
                             f"{tuple(images.shape)}")
        if self.warps:
            # Bilinear weights can overshoot 255 by float rounding; keep the 0..255 input contract exact.
            count, _, height, width = images.shape
            matrices = self.random_matrices(count).to(images.device)
            displacement = (self.random_displacements(count, height, width, images.device)
                            if self.elastic_px > 0 else None)
            images = affine_warp(images, matrices, displacement).clamp_(0.0, PIXEL_MAX)
        if self.erasing_prob > 0:
            images = images.masked_fill(self.random_erase_masks(images.shape, images.device), ERASE_VALUE)
        return images

    def _uniform(self, count: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=self.generator)

    def random_matrices(self, count: int) -> torch.Tensor:
        """(count, 2, 3) rotation + translation matrices (output -> input coordinates, range [-1, 1])."""
        angle = torch.deg2rad(self._uniform(count, -self.rotation_deg, self.rotation_deg))
        # The normalised frame spans 2 units per side, so a shift of f * side is 2 * f units.
        shift = 2.0 * self.translate_frac
        tx = self._uniform(count, -shift, shift)
        ty = self._uniform(count, -shift, shift)
        return rotation_matrices(angle, tx, ty)

    def random_displacements(self, count: int, height: int, width: int,
                             device: torch.device | str = "cpu") -> torch.Tensor:
        """(count, H, W, 2) smooth random grid displacements on ``device``, up to about elastic_px pixels
        (the control points are drawn on the CPU generator, the field upsampled on device)."""
        side = ELASTIC_GRID
        coarse = self._uniform(count * 2 * side * side, -1.0, 1.0).view(count, 2, side, side)
        field = F.interpolate(coarse.to(device), size=(height, width), mode="bicubic", align_corners=True)
        # A pixel is 2 / side normalised units; grid channels are (x, y).
        scale = torch.tensor([2.0 * self.elastic_px / width, 2.0 * self.elastic_px / height], device=device)
        return field.permute(0, 2, 3, 1) * scale

    def random_erase_masks(self, shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean masks (N, 1, H, W) on ``device``: True inside one random box per image picked with
        probability erasing_prob (box parameters are drawn on the CPU generator, the mask built on device)."""
        count, _, height, width = shape
        picked = torch.rand(count, generator=self.generator) < self.erasing_prob
        area = self._uniform(count, *ERASE_AREA) * height * width
        log_aspect = self._uniform(count, math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1]))
        aspect = torch.exp(log_aspect)
        box_h = torch.sqrt(area * aspect).round().clamp(1, height).long()
        box_w = torch.sqrt(area / aspect).round().clamp(1, width).long()
        top = (torch.rand(count, generator=self.generator) * (height - box_h + 1)).long()
        left = (torch.rand(count, generator=self.generator) * (width - box_w + 1)).long()
        picked, top, left, box_h, box_w = (t.to(device) for t in (picked, top, left, box_h, box_w))
        rows = torch.arange(height, device=device)[None, :, None]
        cols = torch.arange(width, device=device)[None, None, :]
        inside = (
            (rows >= top[:, None, None])
            & (rows < (top + box_h)[:, None, None])
            & (cols >= left[:, None, None])
            & (cols < (left + box_w)[:, None, None])
        )
        return (inside & picked[:, None, None])[:, None]
