"""The release's aggregator ``Video_Former_3D``: per-frame token maps -> a fixed set of latent tokens.

S-VAM-Code ``policy_models/module/Video_Former.py`` (``Video_Former_3D``, ``PerceiverAttentionLayer``,
``Attention``) and ``policy_models/module/transformers/utils.py`` (``feed_forward_layer``), with the
release's parameter names so a released state dict (policy checkpoint prefix ``Video_Former.``) loads
with ``strict=True``:

1. ``goal_emb`` (Linear -> GELU -> Linear) per token, plus ``time_pos_emb`` (the same vector for every
   token of a frame; the only positional embedding);
2. ``latents``: ``queries_per_frame`` learned queries per frame;
3. ``depth`` layers of: a perceiver attention whose keys/values are the frame's tokens AND the
   queries themselves (no biases), a temporal self-attention of each query slot across the frames
   (no pre-norm), a feed-forward (LayerNorm, Linear, GELU, Linear; no biases); each residual;
4. a final LayerNorm over the (frame-major) latents.

foresight's own aggregator (``trainers.models.uniperceiver``) stays available as ``arch = "foresight"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from foresight.schemas.base import StrictModel
from foresight.trainers.models.decoupler import ModelSize
from foresight.trainers.models.layers import Attention


class VideoFormerConfig(StrictModel):
    """Architecture of ``Video_Former_3D``; ``in_channels`` is the concatenated per-token width."""

    in_channels: int = Field(5376, description="Per-token input channels (condition_dim): 2560 + 768 + 2048.")
    dim: int = Field(384, description="Latent width.")
    frames: int = Field(16, description="Frames per clip (num_frame = num_time_embeds).")
    queries_per_frame: int = Field(14, description="Latent queries per frame (num_latents / frames: 224 / 16).")
    depth: int = Field(6, description="Number of perceiver + temporal + feed-forward layers.")
    heads: int = Field(8, description="Attention heads.")
    dim_head: int = Field(64, description="Width of one head of the perceiver attention.")
    ff_mult: int = Field(4, description="Feed-forward width multiple.")
    dropout: float = Field(0.0, description="Dropout of the temporal attention (the release has none).")

    @classmethod
    def preset(cls, size: ModelSize, **dims) -> "VideoFormerConfig":
        """The release's CALVIN architecture (``full``) or a small one for CPU tests (``tiny``)."""
        if size == "full":
            return cls(**dims)
        return cls(**({"dim": 32, "queries_per_frame": 2, "depth": 1, "heads": 2, "dim_head": 16} | dims))

    @classmethod
    def from_release_kwargs(cls, kwargs: dict) -> "VideoFormerConfig":
        """The config of the release's ``Video_Former_3D(**kwargs)`` (num_frame must equal num_time_embeds)."""
        frames, latents = kwargs["num_frame"], kwargs["num_latents"]
        if kwargs.get("num_time_embeds", frames) != frames or latents % frames:
            raise ValueError(f"release Video_Former_3D kwargs {kwargs}: needs num_time_embeds == num_frame and "
                             f"num_latents a multiple of num_frame")
        if not kwargs.get("use_temporal", True):
            raise ValueError("release Video_Former_3D kwargs: use_temporal=False is not implemented")
        return cls(in_channels=kwargs["condition_dim"], dim=kwargs["dim"], frames=frames,
                   queries_per_frame=latents // frames, depth=kwargs["depth"], heads=kwargs["heads"],
                   dim_head=kwargs["dim_head"])

    @property
    def num_latents(self) -> int:
        return self.frames * self.queries_per_frame


class PerceiverAttentionLayer(nn.Module):
    """Queries attend to LayerNorm(tokens) and to themselves; no biases (``layers.i.0``)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split(self, x_BND: torch.Tensor) -> torch.Tensor:
        batch, tokens, inner = x_BND.shape
        return x_BND.view(batch, tokens, self.heads, inner // self.heads).transpose(1, 2)

    def forward(self, media_BND: torch.Tensor, latents_BQD: torch.Tensor) -> torch.Tensor:
        media, latents = self.norm_media(media_BND), self.norm_latents(latents_BQD)
        keys_in = torch.cat([media, latents], dim=1)
        q, k, v = self._split(self.to_q(latents)), self._split(self.to_k(keys_in)), self._split(self.to_v(keys_in))
        out_BHQd = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out_BHQd.transpose(1, 2).flatten(2))


def feed_forward_layer(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim), no biases (``layers.i.2``)."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class VideoFormer3D(nn.Module):
    """(B, T, N, C) per-frame tokens -> (B, T * queries_per_frame, dim) latent tokens."""

    def __init__(self, cfg: VideoFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.goal_emb = nn.Sequential(nn.Linear(cfg.in_channels, 2 * cfg.dim), nn.GELU(),
                                      nn.Linear(2 * cfg.dim, cfg.dim))
        self.time_pos_emb = nn.Parameter(torch.randn(cfg.frames, 1, cfg.dim))
        self.latents = nn.Parameter(torch.randn(cfg.frames, cfg.queries_per_frame, cfg.dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttentionLayer(cfg.dim, cfg.dim_head, cfg.heads),
                           Attention(cfg.dim, cfg.heads, cfg.dropout),
                           feed_forward_layer(cfg.dim, cfg.ff_mult)])
            for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, tokens_BTNC: torch.Tensor) -> torch.Tensor:
        batch, frames, tokens, channels = tokens_BTNC.shape
        cfg = self.cfg
        if frames != cfg.frames or channels != cfg.in_channels:
            raise ValueError(f"video former: tokens of shape {tuple(tokens_BTNC.shape)}, expected "
                             f"(B, {cfg.frames}, N, {cfg.in_channels})")
        media_BTND = self.goal_emb(tokens_BTNC.float()) + self.time_pos_emb[:frames]
        media = media_BTND.reshape(batch * frames, tokens, cfg.dim)
        latents = self.latents.expand(batch, -1, -1, -1).reshape(batch * frames, cfg.queries_per_frame, cfg.dim)
        for perceiver, temporal, feed_forward in self.layers:
            latents = latents + perceiver(media, latents)
            slots = latents.view(batch, frames, -1, cfg.dim).transpose(1, 2).reshape(-1, frames, cfg.dim)
            slots = slots + temporal(slots)
            latents = slots.view(batch, -1, frames, cfg.dim).transpose(1, 2).reshape(batch * frames, -1, cfg.dim)
            latents = latents + feed_forward(latents)
        return self.norm(latents.reshape(batch, cfg.num_latents, cfg.dim))
