"""What every teacher is: preprocessing + a frozen forward giving (T, h, w, C) tokens per clip."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from foresight.pipelines.teachers.preprocess import PreprocessSettings, normalisation, preprocess_frames
from foresight.schemas.base import StrictModel
from foresight.schemas.model import ModelIdentity

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OUTPUT_DTYPE = torch.float16


def parse_dtype(name: str) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' -> torch dtype; ValueError naming the choices otherwise."""
    if name not in DTYPES:
        raise ValueError(f"teacher dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


class Teacher(abc.ABC):
    """A loaded, frozen teacher on one device.

    Subclasses implement :meth:`encode_pixels`; everything else (uint8 -> pixels on the model's
    device, reference map, float16 output) is shared so all teachers behave the same way.
    """

    family: str = ""

    def __init__(self, module: nn.Module, identity: ModelIdentity, settings: StrictModel,
                 preprocess: PreprocessSettings, grid: tuple[int, int], channels: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.identity = identity
        self.settings = settings
        self.preprocess = preprocess
        self.grid = grid
        self.channels = channels
        self.device = torch.device(device)
        self.dtype = dtype
        self.norm = normalisation(preprocess, self.device)

    @abc.abstractmethod
    def encode_pixels(self, pixels_BTCHW: torch.Tensor) -> torch.Tensor:
        """Normalised pixels of B clips of T frames -> tokens (B, T, h, w, C) in the model dtype.

        The T frames of a clip are passed together: a multi-view teacher (DA3) attends across them.
        """

    def params(self) -> dict[str, Any]:
        """Every output-changing setting, for the version recipe (the dtype changes the numbers)."""
        return {"teacher": self.family, "settings": self.settings.model_dump(mode="json", exclude={"preprocess"}),
                "preprocess": self.preprocess.model_dump(mode="json"),
                "dtype": next(k for k, v in DTYPES.items() if v == self.dtype)}

    def pixels(self, frames_BTHWC: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) frames (any device) -> model input (B, T, 3, h, w) on the model device."""
        B, T = frames_BTHWC.shape[:2]
        frames = frames_BTHWC.to(self.device, non_blocking=True).reshape(B * T, *frames_BTHWC.shape[2:])
        pixels_NCHW = preprocess_frames(frames, self.preprocess, self.dtype, self.norm)
        return pixels_NCHW.reshape(B, T, *pixels_NCHW.shape[1:])

    @torch.inference_mode()
    def encode_frames(self, frames_BTHWC: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) clips -> float16 tokens (B, T, h, w, C) on the model device."""
        tokens = self.encode_pixels(self.pixels(frames_BTHWC))
        B, T = frames_BTHWC.shape[:2]
        expected = (B, T, *self.grid, self.channels)
        assert tuple(tokens.shape) == expected, f"{self.family}: tokens {tuple(tokens.shape)} != {expected}"
        return tokens.to(OUTPUT_DTYPE)

    def encode_clips(self, frames_BTHWC: torch.Tensor, observed_BHWC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target tokens of the clips (B, T, h, w, C) and the reference map (B, 1, h, w, C): the
        same teacher applied to the observed (conditioning) frame alone, as a one-view clip."""
        return self.encode_frames(frames_BTHWC), self.encode_frames(observed_BHWC[:, None])
