"""DINOv2 teacher (S-VAM's semantic teacher): final-LayerNorm patch tokens, no CLS, no registers.

Default architecture: ViT-B/14 with 4 registers -> (T, 16, 16, 768) per clip at 224x224.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from foresight.pipelines.teachers.base import Teacher
from foresight.pipelines.teachers.preprocess import PreprocessSettings
from foresight.pipelines.teachers.weights import checkpoint_dir, random_identity, real_identity
from foresight.schemas.base import StrictModel
from foresight.schemas.model import ModelIdentity, ModelSpec

SEED = 0
SUPPORTED_TYPES = ("dinov2", "dinov2_with_registers")

# facebook/dinov2-with-registers-base; ``tiny`` keeps its layout at a toy width.
VIT_B14_REG: dict[str, Any] = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                   patch_size=14, image_size=518, num_register_tokens=4, layerscale_value=1.0,
                                   layer_norm_eps=1e-6)
TINY: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                            patch_size=14, image_size=518, num_register_tokens=4, layerscale_value=1.0,
                            layer_norm_eps=1e-6)


class DinoV2Settings(StrictModel):
    """DINOv2 teacher settings."""

    preprocess: PreprocessSettings = Field(default_factory=PreprocessSettings,
                                           description="Resize/normalisation of the frames.")


def _random_model(config_kwargs: dict[str, Any], seed: int) -> nn.Module:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**config_kwargs))


def _pretrained_model(spec: ModelSpec) -> tuple[nn.Module, ModelIdentity]:
    from transformers import AutoConfig, AutoModel

    folder = checkpoint_dir(spec, "dinov2")
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in SUPPORTED_TYPES:
        raise ValueError(f"dinov2 teacher: {spec} is a {config.model_type!r} model, expected one of "
                         f"{list(SUPPORTED_TYPES)}; use --teacher hf for other vision backbones")
    return AutoModel.from_pretrained(folder), real_identity(spec, "dinov2", folder)


def load_model(spec: ModelSpec) -> tuple[nn.Module, ModelIdentity]:
    """transformers Dinov2(WithRegisters)Model + identity for a spec."""
    if spec.source in ("tiny", "random"):
        kwargs = TINY if spec.source == "tiny" else VIT_B14_REG
        return _random_model(kwargs, SEED), random_identity(spec, "dinov2", SEED, kwargs)
    return _pretrained_model(spec)


class DinoV2Teacher(Teacher):
    """Per-frame DINOv2 patch tokens after the final LayerNorm: (B, T, h, w, hidden)."""

    family = "dinov2"

    def __init__(self, model: nn.Module, identity: ModelIdentity, settings: DinoV2Settings,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        config = model.config
        patch = config.patch_size
        pre = settings.preprocess
        if pre.height % patch or pre.width % patch:
            raise ValueError(f"dinov2 teacher: input {pre.height}x{pre.width} is not a multiple of patch {patch}")
        self.num_prefix = 1 + getattr(config, "num_register_tokens", 0)
        super().__init__(model, identity, settings, pre, (pre.height // patch, pre.width // patch),
                         config.hidden_size, device, dtype)

    def encode_pixels(self, pixels_BTCHW: torch.Tensor) -> torch.Tensor:
        B, T = pixels_BTCHW.shape[:2]
        hidden_NLC = self.module(pixel_values=pixels_BTCHW.flatten(0, 1)).last_hidden_state
        return hidden_NLC[:, self.num_prefix:].reshape(B, T, *self.grid, self.channels)


def load_dinov2(spec: ModelSpec, settings: DinoV2Settings, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> DinoV2Teacher:
    """A ready DINOv2 teacher for a spec."""
    model, identity = load_model(spec)
    return DinoV2Teacher(model, identity, settings, device, dtype)
