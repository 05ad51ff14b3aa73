"""Uni-Perceiver: aggregates per-frame token maps into a fixed set of latent tokens (docs/REFERENCE.md,
S-VAM / VPP model settings).

Per-token input concat[one-step | semantic prediction | geometric prediction] -> MLP (C -> 768 -> 384)
+ a learned per-frame embedding. ``queries_per_frame`` learned latents per frame (14 x 16 = 224) pass
``depth`` layers of: cross-attention from each frame's latents to that frame's tokens, self-attention
over all latents of the clip (this is where information moves across frames), and an FFN (x4).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from foresight.schemas.base import StrictModel
from foresight.trainers.models.decoupler import ModelSize
from foresight.trainers.models.layers import CrossAttentionBlock, SelfAttentionBlock


class UniPerceiverConfig(StrictModel):
    """Architecture of the Uni-Perceiver; ``in_channels`` is the concatenated per-token width."""

    in_channels: int = Field(5376, description="Per-token input channels: 2560 + 768 + 2048 at full size.")
    mlp_hidden: int = Field(768, description="Hidden width of the input MLP.")
    dim: int = Field(384, description="Latent width.")
    frames: int = Field(16, description="Frames per clip.")
    queries_per_frame: int = Field(14, description="Latent queries per frame (224 latents for 16 frames).")
    depth: int = Field(6, description="Number of cross-attention + self-attention + FFN layers.")
    heads: int = Field(8, description="Attention heads.")
    mlp_ratio: int = Field(4, description="FFN width multiple.")
    dropout: float = Field(0.0, description="Dropout in attention and FFNs.")

    @classmethod
    def preset(cls, size: ModelSize, **dims: int) -> "UniPerceiverConfig":
        """The reference architecture (``full``) or a small one for CPU tests (``tiny``)."""
        if size == "full":
            return cls(**dims)
        return cls(**({"mlp_hidden": 32, "dim": 32, "queries_per_frame": 2, "depth": 1, "heads": 2, "mlp_ratio": 2}
                      | dims))

    @property
    def num_latents(self) -> int:
        return self.frames * self.queries_per_frame


class PerceiverLayer(nn.Module):
    """Per-frame cross-attention, clip-wide latent self-attention, FFN (each pre-LN, residual)."""

    def __init__(self, cfg: UniPerceiverConfig):
        super().__init__()
        self.cross = CrossAttentionBlock(cfg.dim, cfg.heads, cfg.dropout)
        self.self_block = SelfAttentionBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout)

    def forward(self, latents_BTQD: torch.Tensor, tokens_BTND: torch.Tensor) -> torch.Tensor:
        batch, frames, queries, dim = latents_BTQD.shape
        flat_tokens = tokens_BTND.reshape(batch * frames, -1, dim)
        latents = self.cross(latents_BTQD.reshape(batch * frames, queries, dim), flat_tokens)
        latents = self.self_block(latents.view(batch, frames * queries, dim))
        return latents.view(batch, frames, queries, dim)


class UniPerceiver(nn.Module):
    """(B, T, N, C) per-frame tokens -> (B, T * queries_per_frame, dim) latent tokens."""

    def __init__(self, cfg: UniPerceiverConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Sequential(
            nn.Linear(cfg.in_channels, cfg.mlp_hidden), nn.GELU(), nn.Linear(cfg.mlp_hidden, cfg.dim)
        )
        self.frame_embed = nn.Parameter(torch.zeros(cfg.frames, cfg.dim))
        self.latents = nn.Parameter(torch.zeros(cfg.frames, cfg.queries_per_frame, cfg.dim))
        nn.init.trunc_normal_(self.frame_embed, std=0.02)
        nn.init.trunc_normal_(self.latents, std=0.02)
        self.layers = nn.ModuleList(PerceiverLayer(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, tokens_BTNC: torch.Tensor) -> torch.Tensor:
        batch, frames, _, channels = tokens_BTNC.shape
        if frames != self.cfg.frames or channels != self.cfg.in_channels:
            raise ValueError(
                f"uni-perceiver: tokens of shape {tuple(tokens_BTNC.shape)}, expected "
                f"(B, {self.cfg.frames}, N, {self.cfg.in_channels})"
            )
        tokens_BTND = self.embed(tokens_BTNC) + self.frame_embed[None, :, None]
        latents_BTQD = (self.latents + self.frame_embed[:, None]).expand(batch, -1, -1, -1)
        for layer in self.layers:
            latents_BTQD = layer(latents_BTQD, tokens_BTND)
        return self.norm(latents_BTQD.reshape(batch, self.cfg.num_latents, self.cfg.dim))
