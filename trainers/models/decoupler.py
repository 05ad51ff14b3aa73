"""The S-VAM decoupler: one-step SVD features -> one teacher's feature maps (REFERENCE.md, S-VAM).

LayerNorm(C_in) -> Linear(C_in -> hidden) -> ``depth`` blocks of [spatial self-attention over the
H*W tokens of a frame + MLP, temporal self-attention over the T frames of a location + MLP] ->
LayerNorm -> Linear(hidden -> C_teacher). The reference anchor (the teacher's map of the observed
frame) goes through a 1x1 Conv3d to C_in channels and is added to every frame's input features.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from schemas.base import StrictModel
from trainers.models.layers import SelfAttentionBlock

ModelSize = Literal["full", "tiny"]


class DecouplerConfig(StrictModel):
    """Architecture of one decoupler; the data dimensions come from the export."""

    in_channels: int = Field(2560, description="Channels of the one-step features (C_in).")
    teacher_channels: int = Field(768, description="Channels of the teacher map (768 DINOv2, 2048 DA3).")
    frames: int = Field(16, description="Frames per clip (T).")
    height: int = Field(16, description="Token grid height (h).")
    width: int = Field(16, description="Token grid width (w).")
    hidden: int = Field(1024, description="Transformer width.")
    depth: int = Field(4, description="Number of spatial+temporal block pairs.")
    heads: int = Field(8, description="Attention heads.")
    mlp_ratio: int = Field(4, description="MLP hidden width as a multiple of the transformer width.")
    dropout: float = Field(0.1, description="Dropout in attention and MLPs.")
    use_reference: bool = Field(True, description="Add the 1x1-Conv3d-projected reference map to the input.")

    @classmethod
    def preset(cls, size: ModelSize, **dims: int) -> "DecouplerConfig":
        """The reference architecture (``full``) or a small one for CPU tests (``tiny``) at given data dims."""
        if size == "full":
            return cls(**dims)
        return cls(**({"hidden": 32, "depth": 1, "heads": 2, "mlp_ratio": 2} | dims))


class SpatioTemporalBlock(nn.Module):
    """Spatial attention within each frame, then temporal attention along each token location."""

    def __init__(self, cfg: DecouplerConfig):
        super().__init__()
        self.spatial = SelfAttentionBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio, cfg.dropout)
        self.temporal = SelfAttentionBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio, cfg.dropout)

    def forward(self, x_BTND: torch.Tensor) -> torch.Tensor:
        batch, frames, tokens, dim = x_BTND.shape
        x_BTND = self.spatial(x_BTND.reshape(batch * frames, tokens, dim)).view(batch, frames, tokens, dim)
        x_BNTD = x_BTND.transpose(1, 2).reshape(batch * tokens, frames, dim)
        x_BNTD = self.temporal(x_BNTD).view(batch, tokens, frames, dim)
        return x_BNTD.transpose(1, 2)


class Decoupler(nn.Module):
    """Predicts a teacher's (B, T, h, w, C_teacher) maps from (B, T, h, w, C_in) one-step features."""

    def __init__(self, cfg: DecouplerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.use_reference:
            self.anchor = nn.Conv3d(cfg.teacher_channels, cfg.in_channels, kernel_size=1)
        self.norm_in = nn.LayerNorm(cfg.in_channels)
        self.proj_in = nn.Linear(cfg.in_channels, cfg.hidden)
        # Learned positions: attention alone is permutation invariant over the grid and the frames.
        self.pos_space = nn.Parameter(torch.zeros(cfg.height * cfg.width, cfg.hidden))
        self.pos_time = nn.Parameter(torch.zeros(cfg.frames, cfg.hidden))
        nn.init.trunc_normal_(self.pos_space, std=0.02)
        nn.init.trunc_normal_(self.pos_time, std=0.02)
        self.blocks = nn.ModuleList(SpatioTemporalBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.hidden)
        self.proj_out = nn.Linear(cfg.hidden, cfg.teacher_channels)

    def _check_shapes(self, feats_BTHWC: torch.Tensor, reference_B1HWC: torch.Tensor | None) -> None:
        cfg = self.cfg
        want = (cfg.frames, cfg.height, cfg.width, cfg.in_channels)
        if tuple(feats_BTHWC.shape[1:]) != want:
            raise ValueError(f"decoupler: features of shape {tuple(feats_BTHWC.shape)}, expected (B, {want})")
        if cfg.use_reference:
            ref_want = (1, cfg.height, cfg.width, cfg.teacher_channels)
            if reference_B1HWC is None or tuple(reference_B1HWC.shape[1:]) != ref_want:
                got = None if reference_B1HWC is None else tuple(reference_B1HWC.shape)
                raise ValueError(f"decoupler: reference of shape {got}, expected (B, {ref_want})")

    def anchored_input(self, feats_BTHWC: torch.Tensor, reference_B1HWC: torch.Tensor | None) -> torch.Tensor:
        """The input features plus the projected reference map, broadcast over time."""
        if not self.cfg.use_reference:
            return feats_BTHWC
        ref_BC1HW = reference_B1HWC.permute(0, 4, 1, 2, 3).to(self.anchor.weight.dtype)
        anchor_B1HWC = self.anchor(ref_BC1HW).permute(0, 2, 3, 4, 1)
        return feats_BTHWC + anchor_B1HWC

    def forward(self, feats_BTHWC: torch.Tensor, reference_B1HWC: torch.Tensor | None = None) -> torch.Tensor:
        self._check_shapes(feats_BTHWC, reference_B1HWC)
        batch, frames, height, width, _ = feats_BTHWC.shape
        x = self.anchored_input(feats_BTHWC.float(), reference_B1HWC)
        x_BTND = self.proj_in(self.norm_in(x)).reshape(batch, frames, height * width, self.cfg.hidden)
        x_BTND = x_BTND + self.pos_space[None, None] + self.pos_time[None, :, None]
        for block in self.blocks:
            x_BTND = block(x_BTND)
        out_BTNC = self.proj_out(self.norm_out(x_BTND))
        return out_BTNC.reshape(batch, frames, height, width, self.cfg.teacher_channels)
