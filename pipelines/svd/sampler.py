"""VPP multi-step SVD generation with one-step feature capture, and standalone one-step extraction.

One trajectory per clip: the clip's seed fixes its initial latent noise and the noise that
augments its conditioning frame. Every denoising step runs the conditional and the
unconditional branch as two UNet calls of the same batch B (rather than one call of 2B). The
UNet runs as a head (up to the last feature block, returning the block outputs) and a tail
(``pipelines.svd.unet_split``): the first step's conditional call keeps the head's features, so
they are bit-identical to :func:`one_step_features` at the same batch, which runs exactly that
head; and one batch shape throughout keeps a compiled UNet to a single specialisation. As in
diffusers' SVD pipeline, the unconditional branch sees zeroed text states and a zeroed image
latent; latents and the scheduler arithmetic stay in float32, the networks run in the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from pydantic import Field

from pipelines.svd import conditioning as cond
from pipelines.svd.features import merge_features, to_host
from pipelines.svd.loading import SVDModel
from pipelines.svd.unet_split import UNetSplit
from schemas.base import StrictModel


class SVDParams(StrictModel):
    """Every setting that changes generated frames or features (all enter the version id)."""

    num_frames: int = Field(default=16, ge=1, description="Frames per generated clip (T).")
    size: int = Field(default=256, ge=8, description="Square frame size in pixels (VPP: 256).")
    steps: int = Field(default=30, ge=1, description="Euler denoising steps.")
    fps: int = Field(default=4, ge=1, description="Frame rate micro-conditioning (the UNet sees fps - 1).")
    motion_bucket_id: int = Field(default=127, description="SVD motion bucket micro-conditioning.")
    noise_aug_strength: float = Field(default=0.02, ge=0.0, description="Noise added to the conditioning frame.")
    min_guidance: float = Field(default=1.0, description="Guidance scale of the first frame.")
    max_guidance: float = Field(default=3.0, description="Guidance scale of the last frame (linear ramp).")
    feature_blocks: list[int] = Field(default=[0, 1], min_length=1,
                                      description="UNet up_blocks whose first-step outputs form the features.")
    text_position_encoding: bool = Field(default=True,
                                         description="Add VPP's sine/cosine positions to the text states.")


@dataclass
class Conditioning:
    """Device tensors of one batch of clips, ready for the UNet."""

    latents: torch.Tensor  # (B, T, C, h, w) float32: initial noise x the scheduler's init sigma
    image_latents: torch.Tensor  # (B, T, C, h, w) model dtype
    text_states: torch.Tensor  # (B, L, 2D) model dtype
    time_ids: torch.Tensor  # (B, 3) model dtype

    @property
    def batch(self) -> int:
        return self.latents.shape[0]

    def unconditional(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed (image latents, text states) of the unconditional branch."""
        return torch.zeros_like(self.image_latents), torch.zeros_like(self.text_states)


@dataclass
class GeneratedBatch:
    """Output of :func:`generate_clips` for B clips."""

    frames: np.ndarray  # (B, T, size, size, 3) uint8
    onestep: np.ndarray  # (B, T, h, w, C) float16
    latents: np.ndarray | None = None  # (B, T, C, h, w) float32 final latents, when asked for


def _check_batch(frames_BHWC: np.ndarray, text_BLD: np.ndarray, seeds: np.ndarray) -> None:
    if not (len(frames_BHWC) == len(text_BLD) == len(seeds)):
        raise ValueError(f"svd batch: {len(frames_BHWC)} frames, {len(text_BLD)} text states and "
                         f"{len(seeds)} seeds must be the same count")


def prepare(model: SVDModel, params: SVDParams, frames_BHWC: np.ndarray, text_BLD: np.ndarray,
            seeds: np.ndarray, init_sigma: torch.Tensor | float) -> Conditioning:
    """Conditioning tensors for a batch: noise from the clips' seeds, the noise-augmented image
    latent repeated over T, the text states and the micro-conditioning ids."""
    _check_batch(frames_BHWC, text_BLD, seeds)
    latent_side = params.size // model.vae_scale_factor
    latent_TCHW = (params.num_frames, model.unet.config.out_channels, latent_side, latent_side)
    noise_BTCHW, image_noise_BCHW = cond.clip_noise(seeds, latent_TCHW, (3, params.size, params.size))
    images_BCHW = cond.preprocess_frames(frames_BHWC, params.size)
    return Conditioning(
        latents=noise_BTCHW.to(model.device) * init_sigma,
        image_latents=cond.image_latents(model, images_BCHW, image_noise_BCHW, params.noise_aug_strength,
                                         params.num_frames),
        text_states=cond.text_states(model, text_BLD, params.text_position_encoding),
        time_ids=cond.added_time_ids(model, params.fps, params.motion_bucket_id, params.noise_aug_strength,
                                     len(seeds)),
    )


def _unet(split: UNetSplit, dtype: torch.dtype, scaled_BTCHW: torch.Tensor, t: torch.Tensor,
          image_latents: torch.Tensor, text_states: torch.Tensor,
          time_ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One UNet call on scheduler-scaled latents: (prediction in float32, up block outputs)."""
    sample = torch.cat([scaled_BTCHW.to(dtype), image_latents], dim=2)
    out, features = split(sample, t, text_states, time_ids)
    return out.float(), features


def denoise(model: SVDModel, params: SVDParams, c: Conditioning,
            scheduler: EulerDiscreteScheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided Euler loop from ``c.latents``: (final latents (B, T, C, h, w) float32, merged
    features of the first step's conditional call (B, T, h, w, C) float16), both on the device.

    Apart from the scheduler's lookup of its first step index, nothing here waits for the device,
    so the host queues the next UNet call while the device runs the current one."""
    split = model.split(params.feature_blocks)
    guidance = cond.guidance_ramp(params.min_guidance, params.max_guidance, params.num_frames, model.device)
    null_image, null_text = c.unconditional()
    latents, features = c.latents, None
    for t in scheduler.timesteps:
        scaled = scheduler.scale_model_input(latents, t)
        pred_cond, captured = _unet(split, model.dtype, scaled, t, c.image_latents, c.text_states, c.time_ids)
        if features is None:
            features = merge_features(captured, params.feature_blocks, c.batch)
        del captured
        pred_uncond, _ = _unet(split, model.dtype, scaled, t, null_image, null_text, c.time_ids)
        guided = pred_uncond + guidance * (pred_cond - pred_uncond)
        latents = scheduler.step(guided, t, latents, return_dict=False)[0]
    return latents, features


@torch.no_grad()
def generate_clips(model: SVDModel, params: SVDParams, frames_BHWC: np.ndarray, text_BLD: np.ndarray,
                   seeds: np.ndarray, keep_latents: bool = False) -> GeneratedBatch:
    """Generate B clips of ``params.num_frames`` frames from their observed frames (B, H, W, 3)
    uint8, CLIP text states (B, L, D) and seeds (B,), capturing the one-step features of the
    first denoising step of the same trajectories. ``keep_latents`` also returns the final
    latents (for comparing the numbers of two settings)."""
    scheduler = model.new_scheduler()
    scheduler.set_timesteps(params.steps, device=model.device)
    c = prepare(model, params, frames_BHWC, text_BLD, seeds, scheduler.init_noise_sigma)
    latents, features = denoise(model, params, c, scheduler)
    frames = decode_frames(model, latents)
    return GeneratedBatch(frames=frames, onestep=to_host(features),
                          latents=to_host(latents) if keep_latents else None)


DECODE_CLIPS = 4
"""Clips per VAE decoder call: bounds decoder memory (a 256x256 decoder activation of 64 frames is
about 1 GB) and keeps the decoded bytes independent of the generation batch size."""


@torch.no_grad()
def decode_frames(model: SVDModel, latents_BTCHW: torch.Tensor) -> np.ndarray:
    """Final latents -> uint8 frames (B, T, H, W, 3); the temporal decoder sees each clip's T
    frames together, as diffusers' SVD does with a decode chunk of T."""
    batch, frames = latents_BTCHW.shape[:2]
    chunks = []
    for first in range(0, batch, DECODE_CLIPS):
        z = latents_BTCHW[first:first + DECODE_CLIPS].flatten(0, 1) / model.vae.config.scaling_factor
        images_NCHW = model.vae.decode(z.to(model.dtype), num_frames=frames).sample.float()
        chunks.append(((images_NCHW / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8))
    images_NCHW = torch.cat(chunks)
    return to_host(images_NCHW.reshape(batch, frames, *images_NCHW.shape[1:]).permute(0, 1, 3, 4, 2).contiguous())


@torch.no_grad()
def one_step_features(model: SVDModel, params: SVDParams, frame: np.ndarray, text: np.ndarray,
                      seed: np.ndarray | int) -> np.ndarray:
    """Standalone one-step features (what inference uses): the head of the conditional UNet call
    of the first denoising step from the clip's seed, nothing more. Gives the same numbers as the
    capture in :func:`generate_clips` for the same clips, batch, device and speed settings.

    ``frame`` (H, W, 3) uint8 with ``text`` (L, D) and an int seed returns (T, h, w, C) float16;
    batched inputs (B, H, W, 3), (B, L, D), (B,) return (B, T, h, w, C)."""
    single = np.ndim(frame) == 3
    frames_BHWC = np.asarray(frame)[None] if single else np.asarray(frame)
    text_BLD = np.asarray(text)[None] if single else np.asarray(text)
    seeds = np.atleast_1d(np.asarray(seed, dtype=np.int64))
    scheduler = model.new_scheduler()
    scheduler.set_timesteps(params.steps, device=model.device)
    c = prepare(model, params, frames_BHWC, text_BLD, seeds, scheduler.init_noise_sigma)
    t = scheduler.timesteps[0]
    scaled = scheduler.scale_model_input(c.latents, t)
    sample = torch.cat([scaled.to(model.dtype), c.image_latents], dim=2)
    captured = model.split(params.feature_blocks).features(sample, t, c.text_states, c.time_ids)
    features = to_host(merge_features(captured, params.feature_blocks, c.batch))
    return features[0] if single else features
