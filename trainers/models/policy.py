"""The S-VAM action expert: Uni-Perceiver tokens + CLIP text -> a diffusion policy over action chunks.

The denoiser is EDM-preconditioned (Karras et al. 2022): D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)
with the preconditioning and the sampler taken from diffusers' ``EDMEulerScheduler``. Its
deterministic Euler step on the probability-flow ODE is the DDIM update, run for ``sample_steps``
(10) steps. The transformer is an encoder (text + perception tokens, independent of the noise
level, so it runs once per observation at inference) and a decoder over the noisy action tokens
that carries the noise-level embedding and cross-attends to the encoder output.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from diffusers import EDMEulerScheduler
from pydantic import Field
from torch import nn

from schemas.base import StrictModel
from trainers.models.decoupler import ModelSize
from trainers.models.layers import Attention, CrossAttentionBlock, Mlp, SelfAttentionBlock
from trainers.models.uniperceiver import UniPerceiver, UniPerceiverConfig

NormMode = Literal["quantile", "minmax", "meanstd"]


class PolicyConfig(StrictModel):
    """Architecture and noise schedule of the diffusion policy."""

    action_dim: int = Field(7, description="Action dimensions (CALVIN 7, MetaWorld 4, teleop 14).")
    chunk: int = Field(10, description="Actions per predicted chunk.")
    cond_tokens: int = Field(224, description="Perception tokens from the Uni-Perceiver.")
    cond_dim: int = Field(384, description="Width of the perception tokens.")
    text_dim: int = Field(512, description="Width of the CLIP text embedding.")
    dim: int = Field(384, description="Transformer width.")
    heads: int = Field(8, description="Attention heads.")
    encoder_layers: int = Field(4, description="Encoder layers over the conditioning tokens.")
    decoder_layers: int = Field(4, description="Decoder layers over the action tokens.")
    mlp_ratio: int = Field(4, description="MLP width multiple.")
    dropout: float = Field(0.1, description="Dropout in attention and MLPs.")
    sigma_min: float = Field(0.002, description="Smallest noise level of the sampler.")
    sigma_max: float = Field(80.0, description="Largest noise level of the sampler.")
    sigma_data: float = Field(0.5, description="EDM sigma_data (std of the normalised actions).")
    rho: float = Field(7.0, description="Karras schedule exponent.")
    sample_steps: int = Field(10, description="Denoising steps at inference (DDIM-equivalent Euler).")
    p_mean: float = Field(-1.2, description="Mean of log(sigma) for training noise levels (EDM).")
    p_std: float = Field(1.2, description="Std of log(sigma) for training noise levels (EDM).")

    @classmethod
    def preset(cls, size: ModelSize, **dims: int) -> "PolicyConfig":
        """The reference architecture (``full``) or a small one for CPU tests (``tiny``)."""
        if size == "full":
            return cls(**dims)
        return cls(**({"dim": 32, "heads": 2, "encoder_layers": 1, "decoder_layers": 1, "mlp_ratio": 2} | dims))

    def scheduler(self) -> EDMEulerScheduler:
        """A fresh diffusers EDM scheduler with this noise schedule (the sampler mutates its state)."""
        return EDMEulerScheduler(
            sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data,
            sigma_schedule="karras", rho=self.rho, prediction_type="epsilon",
        )


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of c_noise = log(sigma)/4, then an MLP."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise_B: torch.Tensor) -> torch.Tensor:
        angles_BF = c_noise_B.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([angles_BF.sin(), angles_BF.cos()], dim=-1))


class DecoderLayer(nn.Module):
    """Pre-LN: self-attention over action tokens, cross-attention to the memory, MLP."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.norm_self = nn.LayerNorm(cfg.dim)
        self.self_attn = Attention(cfg.dim, cfg.heads, cfg.dropout)
        self.cross = CrossAttentionBlock(cfg.dim, cfg.heads, cfg.dropout)
        self.norm_mlp = nn.LayerNorm(cfg.dim)
        self.mlp = Mlp(cfg.dim, cfg.mlp_ratio, cfg.dropout)

    def forward(self, x_BKD: torch.Tensor, memory_BMD: torch.Tensor) -> torch.Tensor:
        x_BKD = x_BKD + self.self_attn(self.norm_self(x_BKD))
        x_BKD = self.cross(x_BKD, memory_BMD)
        return x_BKD + self.mlp(self.norm_mlp(x_BKD))


class DiffusionPolicy(nn.Module):
    """EDM denoiser over (B, chunk, action_dim) normalised action chunks."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        self.cond_proj = nn.Linear(cfg.cond_dim, cfg.dim)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim)
        self.cond_pos = nn.Parameter(torch.zeros(cfg.cond_tokens, cfg.dim))
        self.text_type = nn.Parameter(torch.zeros(cfg.dim))
        self.encoder = nn.ModuleList(
            SelfAttentionBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.encoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(cfg.dim)
        self.action_in = nn.Linear(cfg.action_dim, cfg.dim)
        self.action_pos = nn.Parameter(torch.zeros(cfg.chunk, cfg.dim))
        self.noise_embed = NoiseEmbedding(cfg.dim)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.out_norm = nn.LayerNorm(cfg.dim)
        self.action_out = nn.Linear(cfg.dim, cfg.action_dim)
        for param in (self.cond_pos, self.text_type, self.action_pos):
            nn.init.trunc_normal_(param, std=0.02)
        self.edm = cfg.scheduler()

    def encode(self, cond_BLD: torch.Tensor, text_BE: torch.Tensor) -> torch.Tensor:
        """Memory tokens from perception tokens (B, L, cond_dim) and text (B, text_dim) or (B, S, text_dim)."""
        text_BSE = text_BE[:, None] if text_BE.dim() == 2 else text_BE
        text_BSD = self.text_proj(text_BSE.float()) + self.text_type
        cond_BLD = self.cond_proj(cond_BLD) + self.cond_pos[None]
        memory_BMD = torch.cat([text_BSD, cond_BLD], dim=1)
        for block in self.encoder:
            memory_BMD = block(memory_BMD)
        return self.encoder_norm(memory_BMD)

    def network(self, scaled_BKA: torch.Tensor, c_noise_B: torch.Tensor, memory_BMD: torch.Tensor) -> torch.Tensor:
        """F(c_in x, c_noise): the raw network output before the EDM output preconditioning."""
        x_BKD = self.action_in(scaled_BKA) + self.action_pos[None] + self.noise_embed(c_noise_B)[:, None]
        for layer in self.decoder:
            x_BKD = layer(x_BKD, memory_BMD)
        return self.action_out(self.out_norm(x_BKD)).float()

    def loss(self, actions_BKA: torch.Tensor, memory_BMD: torch.Tensor,
             mask_BK: torch.Tensor | None = None) -> torch.Tensor:
        """EDM training loss in F-space (equivalent to the lambda(sigma)-weighted denoising MSE).

        ``mask_BK`` (True = real action) leaves out rows padded past an episode's end.
        """
        batch = actions_BKA.shape[0]
        log_sigma = self.cfg.p_mean + self.cfg.p_std * torch.randn(batch, device=actions_BKA.device)
        sigma_B11 = log_sigma.exp()[:, None, None]
        noisy_BKA = actions_BKA + sigma_B11 * torch.randn_like(actions_BKA)
        c_skip = self.cfg.sigma_data**2 / (sigma_B11**2 + self.cfg.sigma_data**2)
        c_out = sigma_B11 * self.cfg.sigma_data / (sigma_B11**2 + self.cfg.sigma_data**2).sqrt()
        target_BKA = (actions_BKA - c_skip * noisy_BKA) / c_out
        scaled = self.edm.precondition_inputs(noisy_BKA, sigma_B11)
        predicted = self.network(scaled, self.edm.precondition_noise(sigma_B11.flatten()), memory_BMD)
        error_BK = ((predicted - target_BKA) ** 2).mean(-1)
        if mask_BK is None:
            return error_BK.mean()
        weight_BK = mask_BK.to(error_BK.dtype)
        return (error_BK * weight_BK).sum() / weight_BK.sum().clamp_min(1.0)

    @torch.no_grad()
    def sample(self, memory_BMD: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised action chunks (B, chunk, action_dim) by ``sample_steps`` Euler (DDIM) steps."""
        scheduler = self.cfg.scheduler()
        scheduler.set_timesteps(self.cfg.sample_steps, device=memory_BMD.device)
        batch, device = memory_BMD.shape[0], memory_BMD.device
        noise = torch.randn(batch, self.cfg.chunk, self.cfg.action_dim, generator=generator, device="cpu")
        sample_BKA = noise.to(device) * scheduler.sigmas[0].item()
        for c_noise in scheduler.timesteps:
            scaled = scheduler.scale_model_input(sample_BKA, c_noise)
            output = self.network(scaled, c_noise.expand(batch), memory_BMD)
            sample_BKA = scheduler.step(output, c_noise, sample_BKA).prev_sample
        return sample_BKA


class ActionNormalizer(nn.Module):
    """Affine map of raw actions to the policy's space: (a - offset) / scale, stored with the model."""

    def __init__(self, action_dim: int):
        super().__init__()
        self.register_buffer("offset", torch.zeros(action_dim))
        self.register_buffer("scale", torch.ones(action_dim))

    def set_stats(self, mode: NormMode, stats: dict[str, list[float]]) -> None:
        """Set from dataset statistics (keys mean/std/min/max/q01/q99, one value per action element)."""
        if mode == "meanstd":
            offset, scale = torch.tensor(stats["mean"]), torch.tensor(stats["std"])
        else:
            low, high = ("q01", "q99") if mode == "quantile" else ("min", "max")
            lo, hi = torch.tensor(stats[low]), torch.tensor(stats[high])
            offset, scale = (hi + lo) / 2, (hi - lo) / 2
        if offset.shape != self.offset.shape:
            raise ValueError(f"action stats have {offset.numel()} elements, the policy has {self.offset.numel()}")
        # A constant action element (e.g. a gripper never used) must not divide by zero.
        scale = torch.where(scale.abs() < 1e-6, torch.ones_like(scale), scale)
        self.offset.copy_(offset)
        self.scale.copy_(scale)

    def normalize(self, actions: torch.Tensor) -> torch.Tensor:
        return (actions.float() - self.offset) / self.scale

    def denormalize(self, actions: torch.Tensor) -> torch.Tensor:
        return actions.float() * self.scale + self.offset


class ActionExpert(nn.Module):
    """Uni-Perceiver + diffusion policy + action normaliser: tokens and text -> raw action chunks."""

    def __init__(self, perceiver_cfg: UniPerceiverConfig, policy_cfg: PolicyConfig):
        super().__init__()
        if policy_cfg.cond_tokens != perceiver_cfg.num_latents or policy_cfg.cond_dim != perceiver_cfg.dim:
            raise ValueError(
                f"action expert: policy expects {policy_cfg.cond_tokens}x{policy_cfg.cond_dim} tokens, the "
                f"Uni-Perceiver gives {perceiver_cfg.num_latents}x{perceiver_cfg.dim}"
            )
        self.perceiver = UniPerceiver(perceiver_cfg)
        self.policy = DiffusionPolicy(policy_cfg)
        self.normalizer = ActionNormalizer(policy_cfg.action_dim)

    def forward(self, tokens_BTNC: torch.Tensor, text: torch.Tensor, actions_BKA: torch.Tensor,
                mask_BK: torch.Tensor | None = None) -> torch.Tensor:
        """Diffusion loss on normalised actions for one batch of raw action chunks (what DDP runs)."""
        memory = self.policy.encode(self.perceiver(tokens_BTNC), text)
        return self.policy.loss(self.normalizer.normalize(actions_BKA), memory, mask_BK)

    @torch.no_grad()
    def predict(self, tokens_BTNC: torch.Tensor, text: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw (denormalised) action chunks (B, chunk, action_dim)."""
        memory = self.policy.encode(self.perceiver(tokens_BTNC), text)
        return self.normalizer.denormalize(self.policy.sample(memory, generator))
