"""VPP multi-step SVD generation with one-step feature capture, and standalone one-step extraction.

One trajectory per clip: the clip's seed fixes its initial latent noise and the noise that
augments its conditioning frame. Every denoising step runs the conditional and the
unconditional branch as two UNet calls of the same batch B (rather than one call of 2B): the
first step's conditional call carries the feature hooks, so the captured features are
bit-identical to :func:`one_step_features` at the same batch, which runs exactly that call; and
one batch shape throughout keeps compiled UNet layers to a single specialisation. As in
diffusers' SVD pipeline, the unconditional branch sees zeroed text states and a zeroed image
latent; latents and the scheduler arithmetic stay in float32, the networks run in the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pydantic import Field

from pipelines.svd import conditioning as cond
from pipelines.svd.features import capture_up_blocks, merge_features, run_until_captured
from pipelines.svd.loading import SVDModel
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


@dataclass
class GeneratedBatch:
    """Output of :func:`generate_clips` for B clips."""

    frames: np.ndarray  # (B, T, size, size, 3) uint8
    onestep: np.ndarray  # (B, T, h, w, C) float16


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


def _unet(model: SVDModel, scaled_BTCHW: torch.Tensor, t: torch.Tensor, image_latents: torch.Tensor,
          text_states: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """One UNet call on scheduler-scaled latents; returns the prediction in float32."""
    sample = torch.cat([scaled_BTCHW.to(model.dtype), image_latents], dim=2)
    out = model.unet(sample, t, encoder_hidden_states=text_states, added_time_ids=time_ids, return_dict=False)[0]
    return out.float()


def _branches(model: SVDModel, c: Conditioning, scaled: torch.Tensor, t: torch.Tensor,
              blocks: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(conditional, unconditional) predictions; with ``blocks``, also the conditional call's
    features. The unconditional branch sees zeroed text states and image latents."""
    features = None
    if blocks:
        with capture_up_blocks(model.unet, blocks) as captured:
            pred_cond = _unet(model, scaled, t, c.image_latents, c.text_states, c.time_ids)
            features = merge_features(captured, blocks, c.batch)
    else:
        pred_cond = _unet(model, scaled, t, c.image_latents, c.text_states, c.time_ids)
    pred_uncond = _unet(model, scaled, t, torch.zeros_like(c.image_latents), torch.zeros_like(c.text_states),
                        c.time_ids)
    return pred_cond, pred_uncond, features


@torch.no_grad()
def generate_clips(model: SVDModel, params: SVDParams, frames_BHWC: np.ndarray, text_BLD: np.ndarray,
                   seeds: np.ndarray) -> GeneratedBatch:
    """Generate B clips of ``params.num_frames`` frames from their observed frames (B, H, W, 3)
    uint8, CLIP text states (B, L, D) and seeds (B,), capturing the one-step features of the
    first denoising step of the same trajectories."""
    scheduler = model.new_scheduler()
    scheduler.set_timesteps(params.steps, device=model.device)
    c = prepare(model, params, frames_BHWC, text_BLD, seeds, scheduler.init_noise_sigma)
    guidance = cond.guidance_ramp(params.min_guidance, params.max_guidance, params.num_frames, model.device)
    latents, features = c.latents, None
    for index, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(latents, t)
        pred_cond, pred_uncond, captured = _branches(model, c, scaled, t, params.feature_blocks if index == 0 else None)
        features = captured if index == 0 else features
        guided = pred_uncond + guidance * (pred_cond - pred_uncond)
        latents = scheduler.step(guided, t, latents, return_dict=False)[0]
    frames = decode_frames(model, latents)
    return GeneratedBatch(frames=frames, onestep=features.cpu().numpy())


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
    return images_NCHW.reshape(batch, frames, *images_NCHW.shape[1:]).permute(0, 1, 3, 4, 2).cpu().numpy()


@torch.no_grad()
def one_step_features(model: SVDModel, params: SVDParams, frame: np.ndarray, text: np.ndarray,
                      seed: np.ndarray | int) -> np.ndarray:
    """Standalone one-step features (what inference uses): the conditional UNet call of the first
    denoising step from the clip's seed, nothing more. Gives the same numbers as the capture in
    :func:`generate_clips` for the same clips, batch and device.

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
    with capture_up_blocks(model.unet, params.feature_blocks, stop=True) as captured:
        run_until_captured(lambda: _unet(model, scaled, t, c.image_latents, c.text_states, c.time_ids))
        features = merge_features(captured, params.feature_blocks, c.batch).cpu().numpy()
    return features[0] if single else features
