"""VPP multi-step SVD generation with one-step feature capture, and standalone one-step extraction.

One trajectory per clip: the clip's seed fixes its initial latent noise and the noise that
augments its conditioning frame. Every denoising step runs the conditional and the
unconditional branch as two UNet calls of the same batch B (rather than one call of 2B). The
UNet runs as a head (up to the last feature block, returning the block outputs) and a tail
(``pipelines.svd.unet_split``). The one-step features come, by default, from one more head call
with the release extractor's conditioning (``SVDParams.onestep``: fps as is, no noise
augmentation) from the same initial noise; with ``onestep=None`` the first step's conditional
call keeps its head's features. Either way they are bit-identical to :func:`one_step_features`
at the same batch, which runs exactly that head call; and one batch shape throughout keeps a
compiled UNet to a single specialisation. As in
diffusers' SVD pipeline, the unconditional branch sees zeroed text states and a zeroed image
latent; latents and the scheduler arithmetic stay in float32, the networks run in the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler

from foresight.pipelines.svd import conditioning as cond
from foresight.pipelines.svd.features import merge_features, to_host
from foresight.pipelines.svd.loading import SVDModel
from foresight.pipelines.svd.solvers import SOLVERS
from foresight.pipelines.svd.unet_split import UNetSplit
from foresight.schemas.svd import FpsId, SVDParams


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


@dataclass
class BatchInputs:
    """Host-side inputs of one batch before conditioning: the clips' noise draws, the observed
    frames as [-1, 1] pixels and the CLIP text states."""

    noise_BTCHW: torch.Tensor  # float32 standard normal: the initial latent noise
    image_noise_BCHW: torch.Tensor  # float32 standard normal: the conditioning frame's augmentation noise
    images_BCHW: torch.Tensor  # float32 in [-1, 1], (B, 3, size, size)
    text_BLD: np.ndarray | torch.Tensor

    @property
    def batch(self) -> int:
        return self.noise_BTCHW.shape[0]


def batch_inputs(model: SVDModel, params: SVDParams, frames_BHWC: np.ndarray, text_BLD: np.ndarray,
                 seeds: np.ndarray) -> BatchInputs:
    """Noise from the clips' seeds and the observed frames resized to ``params.size``."""
    _check_batch(frames_BHWC, text_BLD, seeds)
    latent_side = params.size // model.vae_scale_factor
    latent_TCHW = (params.num_frames, model.unet.config.out_channels, latent_side, latent_side)
    noise_BTCHW, image_noise_BCHW = cond.clip_noise(seeds, latent_TCHW, (3, params.size, params.size))
    return BatchInputs(noise_BTCHW, image_noise_BCHW, cond.preprocess_frames(frames_BHWC, params.size), text_BLD)


def condition(model: SVDModel, params: SVDParams, inputs: BatchInputs, init_sigma: torch.Tensor | float,
              fps_id: FpsId, noise_aug_strength: float) -> Conditioning:
    """Conditioning tensors of a batch: initial latents (noise x the scheduler's init sigma), the
    noise-augmented image latent repeated over T, the text states and the micro-conditioning ids."""
    return Conditioning(
        latents=inputs.noise_BTCHW.to(model.device) * init_sigma,
        image_latents=cond.image_latents(model, inputs.images_BCHW, inputs.image_noise_BCHW, noise_aug_strength,
                                         params.num_frames),
        text_states=cond.text_states(model, inputs.text_BLD, params.text_position_encoding),
        time_ids=cond.added_time_ids(model, params.fps, params.motion_bucket_id, noise_aug_strength,
                                     inputs.batch, fps_id),
    )


def unet_sample(model: SVDModel, scaled_BTCHW: torch.Tensor, image_latents: torch.Tensor) -> torch.Tensor:
    """UNet input (B, T, 2C, h, w): scheduler-scaled latents and the image latents on channels."""
    return torch.cat([scaled_BTCHW.to(model.dtype), image_latents], dim=2)


def first_step_features(model: SVDModel, params: SVDParams, c: Conditioning, scheduler: EulerDiscreteScheduler,
                        dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Merged features (B, T, h, w, C) of the UNet head at the scheduler's first timestep."""
    t = scheduler.timesteps[0]
    sample = unet_sample(model, scheduler.scale_model_input(c.latents, t), c.image_latents)
    captured = model.split(params.feature_blocks).features(sample, t, c.text_states, c.time_ids)
    return merge_features(captured, params.feature_blocks, c.batch, dtype)


def extractor_features(model: SVDModel, params: SVDParams, inputs: BatchInputs,
                       dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """One-step features (B, T, h, w, C) in ``dtype`` with ``params.onestep``'s conditioning (the
    release extractor's: its own scheduler, time ids and un-augmented image latent)."""
    onestep = params.onestep
    assert onestep is not None, "extractor_features needs params.onestep"
    scheduler = model.new_scheduler()
    scheduler.set_timesteps(onestep.schedule_steps, device=model.device)
    c = condition(model, params, inputs, scheduler.init_noise_sigma, onestep.fps_id, onestep.noise_aug_strength)
    return first_step_features(model, params, c, scheduler, dtype)


def _unet(model: SVDModel, split: UNetSplit, scaled_BTCHW: torch.Tensor, t: torch.Tensor,
          image_latents: torch.Tensor, text_states: torch.Tensor,
          time_ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One UNet call on scheduler-scaled latents: (prediction in float32, up block outputs)."""
    out, features = split(unet_sample(model, scaled_BTCHW, image_latents), t, text_states, time_ids)
    return out.float(), features


def denoise(model: SVDModel, params: SVDParams, c: Conditioning, scheduler: EulerDiscreteScheduler,
            features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided Euler loop from ``c.latents``: (final latents (B, T, C, h, w) float32, merged
    features (B, T, h, w, C) float16), both on the device. The features are ``features`` when
    given, else those of the first step's conditional call.

    Apart from the scheduler's lookup of its first step index, nothing here waits for the device,
    so the host queues the next UNet call while the device runs the current one."""
    split = model.split(params.feature_blocks)
    guidance = cond.guidance_ramp(params.min_guidance, params.max_guidance, params.num_frames, model.device)
    null_image, null_text = c.unconditional()
    latents = c.latents
    for t in scheduler.timesteps:
        scaled = scheduler.scale_model_input(latents, t)
        pred_cond, captured = _unet(model, split, scaled, t, c.image_latents, c.text_states, c.time_ids)
        if features is None:
            features = merge_features(captured, params.feature_blocks, c.batch)
        del captured
        pred_uncond, _ = _unet(model, split, scaled, t, null_image, null_text, c.time_ids)
        guided = pred_uncond + guidance * (pred_cond - pred_uncond)
        latents = scheduler.step(guided, t, latents, return_dict=False)[0]
    return latents, features


def denoise_with_sampler(model: SVDModel, params: SVDParams, c: Conditioning, scheduler: EulerDiscreteScheduler,
                         features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`denoise` with ``params.sampler``'s solver on the scheduler's sigmas and guidance only
    where sigma >= ``guidance_sigma_min`` (elsewhere the conditional call alone). The input scaling,
    timesteps and v-prediction -> clean-latent conversion are the scheduler's own arithmetic, so
    the first call is the reference's first conditional call and its captured features equal it."""
    sampler = params.sampler
    assert sampler is not None, "denoise_with_sampler needs params.sampler"
    split = model.split(params.feature_blocks)
    guidance = cond.guidance_ramp(params.min_guidance, params.max_guidance, params.num_frames, model.device)
    null_image, null_text = c.unconditional()
    sigma_grid = scheduler.sigmas  # (steps + 1,) float32 on the host, the last 0
    captured_features = [features]

    def denoised(latents: torch.Tensor, index: int) -> torch.Tensor:
        sigma, t = sigma_grid[index], scheduler.timesteps[index]
        scaled = latents / ((sigma**2 + 1) ** 0.5)
        prediction, captured = _unet(model, split, scaled, t, c.image_latents, c.text_states, c.time_ids)
        if captured_features[0] is None:
            captured_features[0] = merge_features(captured, params.feature_blocks, c.batch)
        del captured
        if float(sigma) >= sampler.guidance_sigma_min:
            pred_uncond, _ = _unet(model, split, scaled, t, null_image, null_text, c.time_ids)
            prediction = pred_uncond + guidance * (prediction - pred_uncond)
        return prediction * (-sigma / (sigma**2 + 1) ** 0.5) + latents / (sigma**2 + 1)

    latents = SOLVERS[sampler.solver](denoised, c.latents, sigma_grid.tolist())
    return latents, captured_features[0]


@torch.no_grad()
def generate_clips(model: SVDModel, params: SVDParams, frames_BHWC: np.ndarray, text_BLD: np.ndarray,
                   seeds: np.ndarray, keep_latents: bool = False) -> GeneratedBatch:
    """Generate B clips of ``params.num_frames`` frames from their observed frames (B, H, W, 3)
    uint8, CLIP text states (B, L, D) and seeds (B,), with the one-step features of the same
    initial noise (see the module docstring). ``keep_latents`` also returns the final
    latents (for comparing the numbers of two settings)."""
    if model.identity.is_null:
        from foresight.pipelines.null_models import null_generated

        frames, onestep = null_generated(model, params, seeds)
        return GeneratedBatch(frames=frames, onestep=onestep)
    inputs = batch_inputs(model, params, frames_BHWC, text_BLD, seeds)
    features = extractor_features(model, params, inputs) if params.onestep is not None else None
    scheduler = model.new_scheduler()
    scheduler.set_timesteps(params.steps, device=model.device)
    c = condition(model, params, inputs, scheduler.init_noise_sigma, params.fps_id, params.noise_aug_strength)
    loop = denoise if params.sampler is None else denoise_with_sampler
    latents, features = loop(model, params, c, scheduler, features)
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
def one_step_on_device(model: SVDModel, params: SVDParams, frames_BHWC: np.ndarray, text_BLD: np.ndarray,
                       seeds: np.ndarray) -> torch.Tensor:
    """One-step features (B, T, h, w, C) float16 left on the model's device: one UNet head call at
    the first timestep from the clips' seeds, with ``params.onestep``'s conditioning (or, when it
    is None, that of the generation's first conditional call)."""
    inputs = batch_inputs(model, params, frames_BHWC, text_BLD, seeds)
    if params.onestep is not None:
        return extractor_features(model, params, inputs)
    scheduler = model.new_scheduler()
    scheduler.set_timesteps(params.steps, device=model.device)
    c = condition(model, params, inputs, scheduler.init_noise_sigma, params.fps_id, params.noise_aug_strength)
    return first_step_features(model, params, c, scheduler)


def one_step_features(model: SVDModel, params: SVDParams, frame: np.ndarray, text: np.ndarray,
                      seed: np.ndarray | int) -> np.ndarray:
    """Standalone one-step features on the host (what inference uses, see :func:`one_step_on_device`).
    Gives the same numbers as :func:`generate_clips` stores for the same clips, batch, device and
    speed settings.

    ``frame`` (H, W, 3) uint8 with ``text`` (L, D) and an int seed returns (T, h, w, C) float16;
    batched inputs (B, H, W, 3), (B, L, D), (B,) return (B, T, h, w, C)."""
    single = np.ndim(frame) == 3
    frames_BHWC = np.asarray(frame)[None] if single else np.asarray(frame)
    text_BLD = np.asarray(text)[None] if single else np.asarray(text)
    seeds = np.atleast_1d(np.asarray(seed, dtype=np.int64))
    features = to_host(one_step_on_device(model, params, frames_BHWC, text_BLD, seeds))
    return features[0] if single else features
