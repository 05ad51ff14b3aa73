"""Generic teacher: any transformers vision backbone (SigLIP, CLIP vision, DINOv3, ViT, ConvNeXt...).

Patch tokens come out at the model's own grid: ViT-style outputs (B, L, C) drop their leading
special tokens (CLS, registers), conv-style outputs (B, C, h, w) are moved to channels-last. The
grid and width are found by one probe forward at load time, so no per-model code is needed.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from pydantic import Field
from torch import nn

from foresight.pipelines.teachers.base import Teacher
from foresight.pipelines.teachers.preprocess import PreprocessSettings, settings_from_processor
from foresight.pipelines.teachers.weights import checkpoint_dir, random_identity, real_identity
from foresight.schemas.base import StrictModel
from foresight.schemas.model import ModelIdentity, ModelSpec

SEED = 0
TINY_SIGLIP: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, image_size=224, patch_size=14)


class HFSettings(StrictModel):
    """Generic teacher settings."""

    preprocess: PreprocessSettings | None = Field(
        default=None, description="None: the checkpoint's image-processor size and mean/std "
                                  "(ImageNet at 224, bicubic, when it has none).")


def _as_pair(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def vision_module(model: nn.Module, where: str) -> nn.Module:
    """The image tower of ``model``; ValueError when it is not a vision backbone."""
    module = getattr(model, "vision_model", None) or model
    config = getattr(model.config, "vision_config", None) or model.config
    takes_pixels = "pixel_values" in inspect.signature(module.forward).parameters
    if not takes_pixels or not hasattr(config, "num_channels") and not hasattr(config, "patch_size"):
        raise ValueError(f"hf teacher: {where} (model_type {model.config.model_type!r}, "
                         f"{type(model).__name__}) is not a vision backbone: its forward takes no pixel_values "
                         "or its config has no image/patch settings")
    return module


def _load_pretrained(spec: ModelSpec) -> tuple[nn.Module, ModelIdentity, PreprocessSettings]:
    from transformers import AutoImageProcessor, AutoModel

    folder = checkpoint_dir(spec, "hf")
    try:
        model = AutoModel.from_pretrained(folder)
    except (ValueError, OSError, KeyError) as err:
        raise ValueError(f"hf teacher: {spec} cannot be loaded with transformers AutoModel: {err}") from None
    module = vision_module(model, str(spec))
    preprocess = PreprocessSettings()
    if (folder / "preprocessor_config.json").exists():
        preprocess = settings_from_processor(AutoImageProcessor.from_pretrained(folder))
    return module, real_identity(spec, "hf", folder), preprocess


def load_model(spec: ModelSpec) -> tuple[nn.Module, ModelIdentity, PreprocessSettings]:
    """Vision module, identity and the checkpoint's own preprocessing for a spec."""
    if spec.source == "random":
        raise ValueError("hf teacher: 'random' names no architecture; use hf:<repo>, dir:<path> or tiny")
    if spec.source == "tiny":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP))
        return model, random_identity(spec, "hf", SEED, {"model_type": "siglip_vision_model", **TINY_SIGLIP}), \
            PreprocessSettings()
    return _load_pretrained(spec)


class HFTeacher(Teacher):
    """Patch tokens of the last hidden state of any transformers vision backbone."""

    family = "hf"

    def __init__(self, module: nn.Module, identity: ModelIdentity, settings: HFSettings,
                 preprocess: PreprocessSettings, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        config = getattr(module.config, "vision_config", None) or module.config
        self.model_type = module.config.model_type
        self.patch = _as_pair(getattr(config, "patch_size", None))
        native = _as_pair(getattr(config, "image_size", None))
        pre = settings.preprocess or preprocess
        accepts = inspect.signature(module.forward).parameters
        self.extra_kwargs = {"interpolate_pos_encoding": True} if (
            "interpolate_pos_encoding" in accepts and native not in (None, (pre.height, pre.width))) else {}
        super().__init__(module, identity, settings, pre, (0, 0), 0, device, dtype)
        self.num_prefix = 0
        self.grid, self.channels, self.num_prefix = self._probe()

    def params(self) -> dict:
        return {**super().params(), "model_type": self.model_type}

    def _hidden(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        out = self.module(pixel_values=pixels_NCHW, **self.extra_kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if hidden.dim() == 4:  # conv backbones: (N, C, h, w)
            return hidden.permute(0, 2, 3, 1)
        return hidden

    @torch.inference_mode()
    def _probe(self) -> tuple[tuple[int, int], int, int]:
        """Grid, width and number of leading special tokens, from one forward of a blank frame."""
        pre = self.preprocess
        hidden = self._hidden(torch.zeros(1, 3, pre.height, pre.width, device=self.device, dtype=self.dtype))
        if hidden.dim() == 4:
            return (hidden.shape[1], hidden.shape[2]), hidden.shape[3], 0
        if self.patch is None:
            raise ValueError(f"hf teacher: {self.identity.spec} returns tokens but its config has no patch_size")
        grid = (pre.height // self.patch[0], pre.width // self.patch[1])
        prefix = hidden.shape[1] - grid[0] * grid[1]
        if prefix < 0:
            raise ValueError(f"hf teacher: {self.identity.spec} returned {hidden.shape[1]} tokens, fewer than "
                             f"its {grid[0]}x{grid[1]} patch grid")
        return grid, hidden.shape[-1], prefix

    def encode_pixels(self, pixels_BTCHW: torch.Tensor) -> torch.Tensor:
        B, T = pixels_BTCHW.shape[:2]
        hidden = self._hidden(pixels_BTCHW.flatten(0, 1))
        if hidden.dim() == 3:
            hidden = hidden[:, self.num_prefix:]
        return hidden.reshape(B, T, *self.grid, self.channels)


def load_hf(spec: ModelSpec, settings: HFSettings, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> HFTeacher:
    """A ready generic teacher for a spec."""
    module, identity, preprocess = load_model(spec)
    return HFTeacher(module, identity, settings, preprocess, device, dtype)
