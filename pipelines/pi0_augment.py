"""Training-time image augmentation of π0 observations (openpi's recipe), batched and seeded.

openpi trains π0 with, per image: a random crop of 95% of each side resized back, a rotation
drawn from ±5°, then colour jitter (brightness 0.3, contrast 0.4, saturation 0.5); wrist cameras
get the colour jitter only (openpi ``src/openpi/models/model.py`` ``preprocess_observation``).
Here the crop, resize and rotation are one affine resampling (bilinear, zeros outside), and the
jitter follows torchvision's ``ColorJitter`` factors (uniform in [1 - x, 1 + x]) in a fixed order.

Every draw comes from the ``generator`` passed in, so the trainer can checkpoint its state and a
resumed run augments exactly as an uninterrupted one. Pure compute: uint8 in, uint8 out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from foresight.schemas.base import StrictModel

GRAY_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R 601 luma weights, as torchvision's rgb_to_grayscale."""


class AugmentConfig(StrictModel):
    """Image augmentation of online Shallow-π training (teacher and student see the same images)."""

    crop_scale: float = Field(0.95, gt=0, le=1, description="Side of the random crop as a fraction of the "
                                                            "image's (resized back to full size); 1 = no crop.")
    rotate_deg: float = Field(5.0, ge=0, le=180, description="Rotation drawn uniformly from ±this many degrees.")
    brightness: float = Field(0.3, ge=0, lt=1, description="Brightness factor drawn from [1 - x, 1 + x].")
    contrast: float = Field(0.4, ge=0, lt=1, description="Contrast factor drawn from [1 - x, 1 + x].")
    saturation: float = Field(0.5, ge=0, lt=1, description="Saturation factor drawn from [1 - x, 1 + x].")
    color_only_match: str = Field("wrist", description="Cameras whose name contains this get the colour jitter "
                                                       "only, no crop or rotation (openpi: wrist cameras); '' = "
                                                       "every camera is cropped and rotated.")

    def geometric_cameras(self, cameras: list[str] | None, num_cameras: int) -> list[bool]:
        """Per camera slot: whether it is cropped and rotated (all, when the names are unknown)."""
        if cameras is None or not self.color_only_match:
            return [True] * num_cameras
        if len(cameras) != num_cameras:
            raise ValueError(f"augmentation: {num_cameras} images per sample but {len(cameras)} camera names "
                             f"{cameras}")
        return [self.color_only_match not in name for name in cameras]


def affine_theta(draws_M4: torch.Tensor, geometric_M: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """(M, 2, 3) sampling matrices (output -> input, normalised coordinates) of crop + resize + rotation.

    ``draws_M4``: uniform [0, 1) draws (crop x, crop y, angle, unused); images without geometric
    augmentation get the identity.
    """
    scale = cfg.crop_scale
    angle = (2 * draws_M4[:, 2] - 1) * math.radians(cfg.rotate_deg)
    # The crop's centre moves within [-(1 - s), 1 - s] of the normalised image.
    shift_x = (2 * draws_M4[:, 0] - 1) * (1 - scale)
    shift_y = (2 * draws_M4[:, 1] - 1) * (1 - scale)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], -1), torch.stack([sin, cos, shift_y], -1)], 1)
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=theta.device).expand_as(theta)
    return torch.where(geometric_M[:, None, None], theta, identity)


def color_jitter(x_M3HW: torch.Tensor, factors_M3: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation (torchvision's formulas, this order) on images in [0, 1]."""
    weights = torch.tensor(GRAY_WEIGHTS, dtype=x_M3HW.dtype, device=x_M3HW.device)[None, :, None, None]
    brightness, contrast, saturation = (factors_M3[:, i, None, None, None] for i in range(3))
    x = (x_M3HW * brightness).clamp(0, 1)
    mean = (x * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    gray = (x * weights).sum(1, keepdim=True)
    return ((x - gray) * saturation + gray).clamp(0, 1)


def augment_images(images_BNHWC: torch.Tensor, cfg: AugmentConfig, geometric_N: list[bool],
                   generator: torch.Generator) -> torch.Tensor:
    """Augmented copies of uint8 camera images (B, N, H, W, 3), every draw from ``generator`` (CPU)."""
    batch, cams, height, width, _ = images_BNHWC.shape
    count = batch * cams
    draws = torch.rand(count, 7, generator=generator).to(images_BNHWC.device)
    x = images_BNHWC.reshape(count, height, width, 3).permute(0, 3, 1, 2).float() / 255.0
    geometric = torch.tensor(geometric_N, device=x.device).repeat(batch)
    theta = affine_theta(draws[:, :4], geometric, cfg)
    grid = F.affine_grid(theta, [count, 3, height, width], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    spreads = torch.tensor([cfg.brightness, cfg.contrast, cfg.saturation], device=x.device)
    x = color_jitter(x, 1 + (2 * draws[:, 4:] - 1) * spreads)
    out = (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
    return out.reshape(batch, cams, height, width, 3)
