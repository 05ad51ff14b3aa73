"""The S-VAM action expert: aggregator tokens + CLIP text -> a diffusion policy over action chunks.

Two architectures, keyed by ``arch`` in the run config:

- ``release``: the released code's ``Video_Former_3D`` aggregator (``trainers.models.video_former``)
  and ``GCDenoiser`` (``trainers.models.denoiser``), with the release's parameter names;
- ``foresight``: foresight's Uni-Perceiver (``trainers.models.uniperceiver``) and the
  :class:`DiffusionPolicy` below: an encoder over text + perception tokens (learned positions) and
  a decoder over the noisy action tokens that adds the noise-level embedding and cross-attends to
  the encoder output.

Both denoisers expose ``encode(tokens, text) -> memory`` (once per observation) and
``network(c_in x, sigma, memory) -> F``; the objective (``trainers.models.objectives``: ``release-edm``
or ``edm``) supplies the preconditioning, the training noise levels, the loss and the sampler.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from foresight.schemas.base import StrictModel
from foresight.trainers.models import objectives
from foresight.trainers.models.decoupler import ModelSize
from foresight.trainers.models.denoiser import DenoiserConfig, GCDenoiser
from foresight.trainers.models.layers import Attention, CrossAttentionBlock, Mlp, SelfAttentionBlock
from foresight.trainers.models.objectives import ObjectiveConfig
from foresight.trainers.models.uniperceiver import UniPerceiver, UniPerceiverConfig
from foresight.trainers.models.video_former import VideoFormer3D, VideoFormerConfig

NormMode = Literal["quantile", "minmax", "meanstd", "none"]


class PolicyConfig(StrictModel):
    """Architecture of foresight's diffusion-policy network (the objective is separate)."""

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

    @classmethod
    def preset(cls, size: ModelSize, **dims: int) -> "PolicyConfig":
        """The reference architecture (``full``) or a small one for CPU tests (``tiny``)."""
        if size == "full":
            return cls(**dims)
        return cls(**({"dim": 32, "heads": 2, "encoder_layers": 1, "decoder_layers": 1, "mlp_ratio": 2} | dims))


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
    """foresight's denoiser network over (B, chunk, action_dim) normalised action chunks."""

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

    def encode(self, cond_BLD: torch.Tensor, text_BE: torch.Tensor) -> torch.Tensor:
        """Memory tokens from perception tokens (B, L, cond_dim) and text (B, text_dim) or (B, S, text_dim)."""
        text_BSE = text_BE[:, None] if text_BE.dim() == 2 else text_BE
        text_BSD = self.text_proj(text_BSE.float()) + self.text_type
        cond_BLD = self.cond_proj(cond_BLD) + self.cond_pos[None]
        memory_BMD = torch.cat([text_BSD, cond_BLD], dim=1)
        for block in self.encoder:
            memory_BMD = block(memory_BMD)
        return self.encoder_norm(memory_BMD)

    def network(self, scaled_BKA: torch.Tensor, sigma_B: torch.Tensor, memory_BMD: torch.Tensor) -> torch.Tensor:
        """F(c_in x, sigma): the raw network output before the EDM output preconditioning."""
        noise_BD = self.noise_embed(objectives.c_noise(sigma_B.float()))
        x_BKD = self.action_in(scaled_BKA) + self.action_pos[None] + noise_BD[:, None]
        for layer in self.decoder:
            x_BKD = layer(x_BKD, memory_BMD)
        return self.action_out(self.out_norm(x_BKD)).float()


class ActionNormalizer(nn.Module):
    """Affine map of raw actions to the policy's space: (a - offset) / scale, stored with the model."""

    def __init__(self, action_dim: int):
        super().__init__()
        self.register_buffer("offset", torch.zeros(action_dim))
        self.register_buffer("scale", torch.ones(action_dim))

    def set_stats(self, mode: NormMode, stats: dict[str, list[float]]) -> None:
        """Set from dataset statistics (keys mean/std/min/max/q01/q99, one value per action element).

        ``none`` keeps the identity: the policy sees the actions as exported (the release's CALVIN
        policy takes its relative actions, already in [-1, 1], as loaded).
        """
        if mode == "none":
            return
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


AggregatorConfig = UniPerceiverConfig | VideoFormerConfig
DenoiserNetConfig = PolicyConfig | DenoiserConfig


def _aggregator(cfg: AggregatorConfig) -> nn.Module:
    return UniPerceiver(cfg) if isinstance(cfg, UniPerceiverConfig) else VideoFormer3D(cfg)


def _denoiser(cfg: DenoiserNetConfig) -> nn.Module:
    return DiffusionPolicy(cfg) if isinstance(cfg, PolicyConfig) else GCDenoiser(cfg)


def _check_widths(perceiver_cfg: AggregatorConfig, policy_cfg: DenoiserNetConfig) -> None:
    tokens, width = (policy_cfg.cond_tokens, policy_cfg.cond_dim if isinstance(policy_cfg, PolicyConfig)
                     else policy_cfg.obs_dim)
    if tokens != perceiver_cfg.num_latents or width != perceiver_cfg.dim:
        raise ValueError(f"action expert: policy expects {tokens}x{width} tokens, the aggregator gives "
                         f"{perceiver_cfg.num_latents}x{perceiver_cfg.dim}")


class ActionExpert(nn.Module):
    """Aggregator + denoiser + action normaliser + objective: tokens and text -> raw action chunks.

    ``perceiver`` is a :class:`UniPerceiver` or :class:`VideoFormer3D` and ``policy`` a
    :class:`DiffusionPolicy` or :class:`GCDenoiser`, chosen by the type of their config. A released
    policy checkpoint's ``Video_Former.*`` keys are ``perceiver.*`` here and its ``model.*`` keys
    ``policy.*``.
    """

    def __init__(self, perceiver_cfg: AggregatorConfig, policy_cfg: DenoiserNetConfig,
                 objective: ObjectiveConfig | None = None):
        super().__init__()
        _check_widths(perceiver_cfg, policy_cfg)
        self.perceiver = _aggregator(perceiver_cfg)
        self.policy = _denoiser(policy_cfg)
        self.normalizer = ActionNormalizer(policy_cfg.action_dim)
        if self.reads_proprio:
            self.proprio_normalizer = ActionNormalizer(policy_cfg.proprio_dim)
        self.objective = objective or ObjectiveConfig()

    @property
    def reads_proprio(self) -> bool:
        """True when the denoiser takes the robot state as a context token (``proprio = "token"``)."""
        return isinstance(self.policy, GCDenoiser) and self.policy.cfg.proprio == "token"

    def memory(self, tokens_BTNC: torch.Tensor, text: torch.Tensor, proprio_BP: torch.Tensor | None = None
               ) -> torch.Tensor:
        """The denoiser's memory for one observation (aggregator, then the context encoder)."""
        latents = self.perceiver(tokens_BTNC)
        if not self.reads_proprio:
            return self.policy.encode(latents, text)
        if proprio_BP is None:
            raise ValueError("action expert: this policy reads proprioception (denoiser.proprio = 'token'); "
                             "pass the robot state")
        return self.policy.encode(latents, text, self.proprio_normalizer.normalize(proprio_BP))

    def forward(self, tokens_BTNC: torch.Tensor, text: torch.Tensor, actions_BKA: torch.Tensor,
                mask_BK: torch.Tensor | None = None, proprio_BP: torch.Tensor | None = None) -> torch.Tensor:
        """Diffusion loss on normalised actions for one batch of raw action chunks (what DDP runs)."""
        return objectives.diffusion_loss(self.policy.network, self.objective, self.normalizer.normalize(actions_BKA),
                                         self.memory(tokens_BTNC, text, proprio_BP), mask_BK)

    @torch.no_grad()
    def predict(self, tokens_BTNC: torch.Tensor, text: torch.Tensor, generator: torch.Generator | None = None,
                proprio_BP: torch.Tensor | None = None) -> torch.Tensor:
        """Raw (denormalised) action chunks (B, chunk, action_dim) from the objective's sampler."""
        memory = self.memory(tokens_BTNC, text, proprio_BP)
        cfg = self.policy.cfg
        shape = (memory.shape[0], cfg.chunk, cfg.action_dim)
        return self.normalizer.denormalize(objectives.sample_actions(self.policy.network, self.objective, memory,
                                                                     shape, generator))
