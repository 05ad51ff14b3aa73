"""VPP conditioning of the SVD UNet: seeds and noise, the image latent, text states, time ids, guidance."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from foresight.pipelines.svd.loading import SVDModel
from foresight.schemas.svd import FpsId

NOISE_THREADS = min(8, os.cpu_count() or 1)


def clip_seed(version_id: str, clip_id: str) -> int:
    """The noise seed of one clip: the first 8 bytes of sha256("<version id>/<clip id>") as a
    non-negative int64, so any shard can be regenerated without knowing the others."""
    digest = hashlib.sha256(f"{version_id}/{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def clip_noise(seeds: np.ndarray | list[int], latent_TCHW: tuple[int, int, int, int],
               image_CHW: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-clip Gaussian noise drawn on the CPU from each clip's own generator, so it does not
    depend on the device, the batch composition or the order clips are processed in.

    Per clip the draws are: the initial latent noise (T, C, h, w), then the noise that augments
    the conditioning image (3, H, W). Returns float32 tensors (B, T, C, h, w) and (B, 3, H, W).
    Clips are drawn on parallel threads (one generator each, so the bytes do not change): a
    single-threaded draw of 260k values per clip is a visible share of a one-step extraction."""
    seeds = [int(seed) for seed in seeds]
    latents = torch.empty((len(seeds), *latent_TCHW), dtype=torch.float32)
    images = torch.empty((len(seeds), *image_CHW), dtype=torch.float32)

    def draw(index: int) -> None:
        generator = torch.Generator(device="cpu").manual_seed(seeds[index])
        torch.randn(latent_TCHW, generator=generator, dtype=torch.float32, out=latents[index])
        torch.randn(image_CHW, generator=generator, dtype=torch.float32, out=images[index])

    workers = min(len(seeds), NOISE_THREADS)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(draw, range(len(seeds))))
    else:
        for index in range(len(seeds)):
            draw(index)
    return latents, images


def preprocess_frames(frames_BHWC: np.ndarray, size: int) -> torch.Tensor:
    """uint8 frames (B, H, W, 3) -> float32 (B, 3, size, size) in [-1, 1].

    Resized with antialiased bilinear filtering (CALVIN's 200x200 static camera goes up,
    larger teleop frames come down); non-square frames are stretched, as VPP's loader does."""
    if frames_BHWC.ndim != 4 or frames_BHWC.shape[-1] != 3 or frames_BHWC.dtype != np.uint8:
        raise ValueError(f"conditioning frames: expected uint8 (B, H, W, 3), "
                         f"got {frames_BHWC.dtype} {frames_BHWC.shape}")
    images_BCHW = torch.from_numpy(np.ascontiguousarray(frames_BHWC)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if images_BCHW.shape[-2:] != (size, size):
        images_BCHW = F.interpolate(images_BCHW, size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False).clamp(-1.0, 1.0)
    return images_BCHW


@torch.no_grad()
def image_latents(model: SVDModel, images_BCHW: torch.Tensor, image_noise_BCHW: torch.Tensor,
                  noise_aug_strength: float, num_frames: int) -> torch.Tensor:
    """The SVD image conditioning: VAE latent (posterior mode, unscaled, as diffusers' SVD) of the
    noise-augmented frame, repeated over the frames: (B, T, C, h, w) in the model dtype."""
    noisy = images_BCHW + noise_aug_strength * image_noise_BCHW
    latent_BCHW = model.vae_encoder(noisy.to(model.device, torch.float32))
    return latent_BCHW.to(model.dtype).unsqueeze(1).repeat(1, num_frames, 1, 1, 1)


def sincos_positions(length: int, dim: int) -> torch.Tensor:
    """1-D sine/cosine position table (length, dim), as VPP's ``get_1d_sincos_pos_embed_from_grid``."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.einsum("m,d->md", np.arange(length, dtype=np.float64), omega)
    return torch.from_numpy(np.concatenate([np.sin(angles), np.cos(angles)], axis=1)).float()


def text_states(model: SVDModel, text_BLD: np.ndarray | torch.Tensor, position_encoding: bool) -> torch.Tensor:
    """CLIP text states (B, L, D) -> UNet cross-attention states (B, L, 2D) in the model dtype:
    optional sine/cosine positions added (VPP's ``encode_text(position_encode=True)``), then the
    states duplicated along the last axis in place of SVD's 1024-wide image embedding."""
    states = torch.as_tensor(np.asarray(text_BLD), dtype=torch.float32)
    if states.ndim != 3:
        raise ValueError(f"text states: expected (B, L, D), got shape {tuple(states.shape)}")
    width = model.unet.config.cross_attention_dim
    if 2 * states.shape[-1] != width:
        raise ValueError(f"text states: width {states.shape[-1]} x 2 != UNet cross_attention_dim {width} "
                         f"(text model and SVD model do not belong together)")
    if position_encoding:
        states = states + sincos_positions(states.shape[1], states.shape[2])
    return torch.cat([states, states], dim=-1).to(model.device, model.dtype)


def added_time_ids(model: SVDModel, fps: int, motion_bucket_id: int, noise_aug_strength: float,
                   batch: int, fps_id: FpsId = "fps-1") -> torch.Tensor:
    """SVD micro-conditioning (B, 3): [fps id, motion bucket, noise augmentation strength]."""
    fps_value = fps - 1 if fps_id == "fps-1" else fps
    ids = torch.tensor([[fps_value, motion_bucket_id, noise_aug_strength]], dtype=model.dtype)
    return ids.repeat(batch, 1).to(model.device)


def guidance_ramp(min_scale: float, max_scale: float, num_frames: int, device: torch.device) -> torch.Tensor:
    """Per-frame classifier-free guidance scales, linear from the first to the last frame,
    shaped (1, T, 1, 1, 1) to broadcast over (B, T, C, h, w)."""
    return torch.linspace(min_scale, max_scale, num_frames, device=device).view(1, num_frames, 1, 1, 1)
