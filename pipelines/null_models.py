"""The ``null`` model of every stage: correctly shaped, deterministic arrays at memory speed.

``null`` is a model spec like ``tiny`` (``--model null``) that loads nothing and computes
nothing: each stage's loader dispatches here and gets an object with the shapes of the stage's
``tiny`` architecture (recorded as the identity's config), whose outputs are a fixed integer
pattern shifted by something of each clip (its seed, its instruction, its first pixel). So a
chain of 10^5-10^6 clips exercises everything but the models -- plans, claims, shard writes,
markers, finalize, manifests, exports, Prefect and Dask -- at the speed of the storage
(bench/bench_scale.py).

Nothing a null model writes can pass for a target: the identity's source is ``null`` (so every
version id differs from a real or tiny one), the manifest says so, and exports and trainers refuse
null-made versions unless explicitly allowed (``allow_null``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from foresight.schemas.model import ModelIdentity

SPEC = "null"
PATTERN_PERIOD = 251
"""Values cycle through 0..250 (a prime, so neighbouring rows of a pattern differ)."""


def null_identity(family: str, config: dict[str, Any]) -> ModelIdentity:
    """Identity of the null model of ``family`` with the (tiny) architecture whose shapes it mimics."""
    return ModelIdentity(spec=SPEC, family=family, source="null", config={"null": True, **config})


def pattern(salt_B: np.ndarray, row_shape: tuple[int, ...], dtype: Any, scale: float = 1.0 / PATTERN_PERIOD) -> np.ndarray:
    """(B, *row_shape) of ``dtype``: row b is ((arange + salt_b) mod 251) * scale; no randomness,
    one pass over memory."""
    salt_B = np.asarray(salt_B, dtype=np.int64).reshape(-1) % PATTERN_PERIOD
    ramp = np.arange(int(np.prod(row_shape, dtype=np.int64)), dtype=np.int64) % PATTERN_PERIOD
    values = (ramp[None, :] + salt_B[:, None]) % PATTERN_PERIOD
    out = values.astype(np.float32) * scale if np.dtype(dtype).kind == "f" else values
    return out.astype(dtype, copy=False).reshape(len(salt_B), *row_shape)


def text_salt(texts: list[str]) -> np.ndarray:
    """One integer per text (crc32 of its bytes): the same instruction gives the same states."""
    return np.array([zlib.crc32(text.encode()) for text in texts], dtype=np.int64)


# ---------------------------------------------------------------- text (CLIP)
def null_text_model(device: str | torch.device = "cpu"):
    """A :class:`pipelines.text.TextModel` whose ``embed_texts`` is a pattern of the tiny width."""
    from foresight.pipelines.text import FAMILY, TINY_TEXT_CONFIG, TextModel

    @dataclass
    class NullTextModel(TextModel):
        """No tokenizer, no encoder: the width is the tiny CLIP text width."""

        @property
        def width(self) -> int:
            return int(TINY_TEXT_CONFIG["hidden_size"])

    identity = null_identity(FAMILY, {"text": dict(TINY_TEXT_CONFIG)})
    return NullTextModel(tokenizer=None, encoder=None, identity=identity, device=torch.device(device))


def null_text_states(texts: list[str], max_length: int, width: int) -> np.ndarray:
    """(N, max_length, width) float32 states, one pattern per distinct text."""
    return pattern(text_salt(texts), (max_length, width), np.float32)


# ---------------------------------------------------------------- SVD generate
def null_svd(desc: Any, device: str | torch.device, dtype: torch.dtype, precision: str):
    """An :class:`pipelines.svd.loading.SVDModel` without UNet or VAE (``generate_clips`` dispatches
    on the identity before touching them); it keeps the tiny configs the feature shape comes from."""
    from foresight.pipelines.svd.loading import SVDModel

    @dataclass
    class NullSVD(SVDModel):
        unet_config: dict | None = None
        vae_config: dict | None = None

    return NullSVD(unet=None, vae=None, vae_encoder=None, scheduler_config=desc.scheduler_config,
                   identity=desc.identity, device=torch.device(device), dtype=dtype, precision=precision,
                   unet_config=desc.unet_config, vae_config=desc.vae_config)


def null_generated(model: Any, params: Any, seeds_B: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """frames (B, T, S, S, 3) uint8 and one-step features (B, T, h, w, C) float16 (None without
    ``params.onestep``) of B clips of a :func:`null_svd` model, shifted by each clip's seed."""
    from foresight.pipelines.svd.features import feature_shape

    size, frames = params.size, params.num_frames
    video = pattern(seeds_B, (frames, size, size, 3), np.uint8)
    if params.onestep is None:
        return video, None
    h, w, channels = feature_shape(model.unet_config, model.vae_config, size, params.feature_blocks)
    return video, pattern(seeds_B, (frames, h, w, channels), np.float16)


# ---------------------------------------------------------------- teachers
def null_teacher_layout(name: str, settings: Any) -> tuple[int, int, dict[str, Any]]:
    """(patch, channels, architecture) of teacher ``name``'s tiny configuration under ``settings``."""
    if name == "dinov2":
        from foresight.pipelines.teachers.dinov2 import TINY

        return TINY["patch_size"], TINY["hidden_size"], dict(TINY)
    if name == "da3":
        from foresight.pipelines.teachers.da3 import PRESETS

        arch = PRESETS["tiny"]
        return arch.patch_size, arch.embed_dim * (2 if settings.cat_token else 1), arch.model_dump(mode="json")
    from foresight.pipelines.teachers.hf import TINY_SIGLIP

    return TINY_SIGLIP["patch_size"], TINY_SIGLIP["hidden_size"], {"model_type": "siglip_vision_model", **TINY_SIGLIP}


def null_teacher(name: str, settings: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A :class:`pipelines.teachers.base.Teacher` of family ``name`` that skips preprocessing and
    the forward: tokens (B, T, h, w, C) are a pattern shifted by each clip's first pixel."""
    from foresight.pipelines.teachers.base import OUTPUT_DTYPE, Teacher
    from foresight.pipelines.teachers.preprocess import PreprocessSettings

    patch, channels, arch = null_teacher_layout(name, settings)
    preprocess = getattr(settings, "preprocess", None) or PreprocessSettings()
    if preprocess.height % patch or preprocess.width % patch:
        raise ValueError(f"{name} teacher: input {preprocess.height}x{preprocess.width} is not a multiple of "
                         f"patch {patch}")
    grid = (preprocess.height // patch, preprocess.width // patch)

    class NullTeacher(Teacher):
        family = name

        def encode_pixels(self, pixels_BTCHW: torch.Tensor) -> torch.Tensor:
            raise AssertionError("the null teacher has no forward")  # encode_frames never calls it

        def encode_frames(self, frames_BTHWC: torch.Tensor) -> torch.Tensor:
            B, T = frames_BTHWC.shape[:2]
            salt_B = frames_BTHWC[:, 0, 0, 0].to("cpu", torch.int64).sum(-1).numpy()
            tokens = pattern(salt_B, (T, *self.grid, self.channels), np.float16)
            return torch.from_numpy(tokens).to(self.device, OUTPUT_DTYPE)

    identity = null_identity(name, {"architecture": arch})
    return NullTeacher(nn.Identity(), identity, settings, preprocess, grid, channels, device, dtype)


# ---------------------------------------------------------------- pi0
class NullPi0:
    """Stands in for a π0 module: only ``config`` (the tiny one); ``compute_targets`` dispatches on it."""

    is_null = True

    def __init__(self, config: Any):
        self.config = config


def null_pi0(tiny_layers: int, family: str):
    """A :class:`pipelines.pi0.LoadedPi0` over a :class:`NullPi0` with the tiny config of ``family``."""
    from foresight.pipelines import pi0

    config = pi0.tiny_config(tiny_layers, family=family)
    architecture = {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"}
    identity = null_identity(family, pi0._json_safe(architecture))
    return pi0.LoadedPi0(model=NullPi0(config), tokenizer=None, identity=identity)


def null_pi0_outputs(seeds_BK: np.ndarray, chunk: int, dim: int, attn_layers: list[int], prefix_len: int,
                     attn_dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """velocity (B, K, chunk, dim) float32 and attention (B, K, L, chunk, P) (None without layers),
    one pattern per (t, noise) pair seed."""
    B, K = seeds_BK.shape
    velocity = pattern(seeds_BK.reshape(-1), (chunk, dim), np.float32).reshape(B, K, chunk, dim)
    if not attn_layers:
        return velocity, None
    shape = (len(attn_layers), chunk, prefix_len)
    attn = pattern(seeds_BK.reshape(-1), shape, np.float32, scale=1.0 / (PATTERN_PERIOD * prefix_len))
    return velocity, attn.reshape(B, K, *shape).astype(attn_dtype)
