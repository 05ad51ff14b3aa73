"""Teacher preprocessing: uint8 frames -> normalised float pixels, on whatever device holds them.

Runs on the model's device so that a GPU teacher reads uint8 (4x less host->device traffic) and
resizes/normalises on the GPU, leaving the CPU free to read the next batch.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from foresight.schemas.base import StrictModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL resample codes used by transformers image processors.
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


class PreprocessSettings(StrictModel):
    """How frames become model input: resize the whole frame (no crop), rescale, normalise."""

    height: int = Field(default=224, gt=0, description="Model input height in pixels.")
    width: int = Field(default=224, gt=0, description="Model input width in pixels.")
    interpolation: Literal["bicubic", "bilinear"] = Field(
        default="bicubic", description="Resize kernel (torch interpolate mode)."
    )
    antialias: bool = Field(default=True, description="Antialias when downsampling (PIL-like).")
    mean: tuple[float, float, float] = Field(default=IMAGENET_MEAN, description="Per-channel mean on [0,1].")
    std: tuple[float, float, float] = Field(default=IMAGENET_STD, description="Per-channel std on [0,1].")


TRAINING_TIME = PreprocessSettings()
"""How the release made the decouplers' training targets: bicubic (antialiased) resize to 224,
ImageNet normalisation (the teachers stage's default and the svam-* presets' setting)."""

POLICY_TIME = PreprocessSettings(interpolation="bilinear", antialias=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
"""How the release's policy feeds its teachers at inference: the CALVIN-normalised [-1, 1] frame
(mean = std = 0.5 on [0, 1] is exactly x / 127.5 - 1) resized bilinearly to 224 (align_corners
False, no antialias), without ImageNet normalisation. A train/test mismatch of the release that a
faithful reproduction of its inference needs (svam_tiny SPEC.md section 7)."""


def settings_from_processor(processor: Any) -> PreprocessSettings:
    """Read size, resample kernel and mean/std from a transformers image processor.

    The whole frame is resized to the processor's final size (its crop size when it crops) instead
    of resize-then-center-crop, so the token grid covers the full generated frame.
    """
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or getattr(processor, "size", None) or {}
    size = dict(size) if not isinstance(size, int) else {"height": size, "width": size}
    if "height" in size and "width" in size:
        height, width = int(size["height"]), int(size["width"])
    elif "shortest_edge" in size:
        height = width = int(size["shortest_edge"])
    else:
        height = width = 224
    resample = getattr(processor, "resample", 3)
    resample = int(getattr(resample, "value", resample))
    mean = tuple(float(v) for v in (getattr(processor, "image_mean", None) or IMAGENET_MEAN))
    std = tuple(float(v) for v in (getattr(processor, "image_std", None) or IMAGENET_STD))
    return PreprocessSettings(height=height, width=width, interpolation=_PIL_RESAMPLE.get(resample, "bicubic"),
                              mean=mean, std=std)


def normalisation(settings: PreprocessSettings, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as (1, 3, 1, 1) float32 tensors on ``device``, on the [0, 255] scale.

    Built once per teacher: creating them per batch would be a synchronous host-to-device copy
    that stalls the GPU queue every batch."""
    mean = torch.tensor(settings.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(settings.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return mean.to(device), std.to(device)


def preprocess_frames(frames_NHWC: torch.Tensor, settings: PreprocessSettings, dtype: torch.dtype = torch.float32,
                      norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) frames -> normalised (N, 3, height, width) pixels in ``dtype``.

    The resize runs in float32 on [0, 255] values (no clamping of bicubic overshoot), then the
    result is scaled to [0, 1] and normalised with the settings' mean and std (``norm``: the
    :func:`normalisation` tensors on the frames' device, built here when not given).
    """
    if frames_NHWC.dim() != 4 or frames_NHWC.shape[-1] != 3:
        raise ValueError(f"teacher preprocess: expected frames (N, H, W, 3), got {tuple(frames_NHWC.shape)}")
    if frames_NHWC.dtype != torch.uint8:
        raise ValueError(f"teacher preprocess: expected uint8 frames, got {frames_NHWC.dtype}")
    pixels_NCHW = frames_NHWC.permute(0, 3, 1, 2).to(torch.float32)
    if tuple(pixels_NCHW.shape[-2:]) != (settings.height, settings.width):
        pixels_NCHW = F.interpolate(pixels_NCHW, size=(settings.height, settings.width),
                                    mode=settings.interpolation, align_corners=False,
                                    antialias=settings.antialias)
    mean, std = norm if norm is not None else normalisation(settings, pixels_NCHW.device)
    return ((pixels_NCHW - mean) / std).to(dtype)
