"""The S-VAM decoupler: one-step SVD features -> one teacher's feature maps (docs/REFERENCE.md,
S-VAM / VPP model settings).

The release's spatio-temporal decoupler (S-VAM-Code ``hidden2dino/model_spail_tem_attention.py``,
``HiddenToDinoModelWithRef``; ``hidden2dpa/...`` ``HiddenToDA3ModelWithRef``) with its parameter
names, so a released state dict loads with ``load_state_dict(strict=True)``:

- ``adapter``: the reference map (the teacher's map of the observed frame) through a 1x1x1 Conv3d
  to C_in channels, ADDED to every frame's input features;
- ``base_model``: LayerNorm(C_in) -> Linear(C_in -> hidden) -> ``depth`` blocks of [spatial
  self-attention over the H*W tokens of a frame + MLP, temporal self-attention over the T frames
  of a location + MLP] (pre-LN, ``torch.nn.MultiheadAttention``) -> LayerNorm -> Linear(hidden ->
  C_teacher).

The release has no positional embeddings. foresight's earlier variant (``arch = "foresight"``)
adds learned space and time embeddings after the input projection (``position_embeddings``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from foresight.schemas.base import StrictModel

ModelSize = Literal["full", "tiny"]
DecouplerArchName = Literal["release", "foresight"]


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
    position_embeddings: bool = Field(
        False, description="Learned space and time embeddings after the input projection (foresight's "
                           "variant; the release has none).")

    @classmethod
    def preset(cls, size: ModelSize, **dims) -> "DecouplerConfig":
        """The reference architecture (``full``) or a small one for CPU tests (``tiny``) at given data dims."""
        if size == "full":
            return cls(**dims)
        return cls(**({"hidden": 32, "depth": 1, "heads": 2, "mlp_ratio": 2} | dims))

    @classmethod
    def from_release_kwargs(cls, kwargs: dict) -> "DecouplerConfig":
        """The config of the release's ``HiddenTo*Model(**kwargs)`` (its run config's "model" section).

        ``token_dim`` is the DA3 spelling of ``C_out``; the keys the release's
        ``_sanitize_st_decoupler_kwargs`` drops (``num_stages``, ``camera_pool``, ``use_stage_embed``,
        ``params_*``) are ignored too.
        """
        names = {"C_in": "in_channels", "C_out": "teacher_channels", "token_dim": "teacher_channels",
                 "T": "frames", "H": "height", "W": "width", "hidden_dim": "hidden", "num_layers": "depth",
                 "num_heads": "heads", "dropout": "dropout", "use_ref": "use_reference"}
        dropped = {"num_stages", "camera_pool", "use_stage_embed", "target_stage_idx"}
        unknown = [k for k in kwargs if k not in names and k not in dropped and not k.startswith("params_")]
        if unknown:
            raise ValueError(f"release decoupler kwargs: unknown key(s) {unknown}")
        return cls(**{names[k]: v for k, v in kwargs.items() if k in names})


def _mlp(dim: int, ratio: int, dropout: float) -> nn.Sequential:
    """Linear -> GELU -> dropout -> Linear -> dropout (the release's indices ``.0`` and ``.3``)."""
    return nn.Sequential(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(ratio * dim, dim), nn.Dropout(dropout))


class SpatialTemporalAttentionBlock(nn.Module):
    """Spatial attention within each frame, then temporal attention along each token location."""

    def __init__(self, cfg: DecouplerConfig):
        super().__init__()
        dim = cfg.hidden
        for axis in ("spatial", "temporal"):
            setattr(self, f"{axis}_norm1", nn.LayerNorm(dim))
            setattr(self, f"{axis}_attn", nn.MultiheadAttention(dim, cfg.heads, dropout=cfg.dropout,
                                                                batch_first=True))
            setattr(self, f"{axis}_norm2", nn.LayerNorm(dim))
            setattr(self, f"{axis}_mlp", _mlp(dim, cfg.mlp_ratio, cfg.dropout))

    def _attend(self, axis: str, x_BND: torch.Tensor) -> torch.Tensor:
        """x + Attn(LN1(x)), then x + MLP(LN2(x)) over the tokens of axis ``spatial`` or ``temporal``."""
        norm1, attn, norm2, mlp = (getattr(self, f"{axis}_{part}") for part in ("norm1", "attn", "norm2", "mlp"))
        h_BND = norm1(x_BND)
        x_BND = x_BND + attn(h_BND, h_BND, h_BND, need_weights=False)[0]
        return x_BND + mlp(norm2(x_BND))

    def forward(self, x_BTND: torch.Tensor) -> torch.Tensor:
        batch, frames, tokens, dim = x_BTND.shape
        x = self._attend("spatial", x_BTND.reshape(batch * frames, tokens, dim))
        x = x.view(batch, frames, tokens, dim).transpose(1, 2).reshape(batch * tokens, frames, dim)
        x = self._attend("temporal", x)
        return x.view(batch, tokens, frames, dim).transpose(1, 2)


class DecouplerBase(nn.Module):
    """The release's ``HiddenToDinoModel`` / ``HiddenToDA3Model``: (B, T, N, C_in) -> (B, T, N, C_out)."""

    def __init__(self, cfg: DecouplerConfig):
        super().__init__()
        self.input_norm = nn.LayerNorm(cfg.in_channels)
        self.input_proj = nn.Linear(cfg.in_channels, cfg.hidden)
        if cfg.position_embeddings:
            # foresight's variant: attention alone is permutation invariant over the grid and the frames.
            self.pos_space = nn.Parameter(torch.zeros(cfg.height * cfg.width, cfg.hidden))
            self.pos_time = nn.Parameter(torch.zeros(cfg.frames, cfg.hidden))
            nn.init.trunc_normal_(self.pos_space, std=0.02)
            nn.init.trunc_normal_(self.pos_time, std=0.02)
        self.blocks = nn.ModuleList(SpatialTemporalAttentionBlock(cfg) for _ in range(cfg.depth))
        self.output_norm = nn.LayerNorm(cfg.hidden)
        self.output_proj = nn.Linear(cfg.hidden, cfg.teacher_channels)

    def forward(self, x_BTNC: torch.Tensor) -> torch.Tensor:
        x_BTND = self.input_proj(self.input_norm(x_BTNC))
        if hasattr(self, "pos_space"):
            x_BTND = x_BTND + self.pos_space[None, None] + self.pos_time[None, :, None]
        for block in self.blocks:
            x_BTND = block(x_BTND)
        return self.output_proj(self.output_norm(x_BTND))


class Decoupler(nn.Module):
    """Predicts a teacher's (B, T, h, w, C_teacher) maps from (B, T, h, w, C_in) one-step features.

    Parameter names are the release's ``HiddenTo*ModelWithRef``: ``adapter.*`` (the reference
    Conv3d) and ``base_model.*``.
    """

    def __init__(self, cfg: DecouplerConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.use_reference:
            self.adapter = nn.Conv3d(cfg.teacher_channels, cfg.in_channels, kernel_size=1)
        self.base_model = DecouplerBase(cfg)

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
        ref_BC1HW = reference_B1HWC.permute(0, 4, 1, 2, 3).to(self.adapter.weight.dtype)
        anchor_B1HWC = self.adapter(ref_BC1HW).permute(0, 2, 3, 4, 1)
        return feats_BTHWC + anchor_B1HWC

    def forward(self, feats_BTHWC: torch.Tensor, reference_B1HWC: torch.Tensor | None = None) -> torch.Tensor:
        self._check_shapes(feats_BTHWC, reference_B1HWC)
        batch, frames, height, width, _ = feats_BTHWC.shape
        x = self.anchored_input(feats_BTHWC.float(), reference_B1HWC)
        out_BTNC = self.base_model(x.reshape(batch, frames, height * width, -1))
        return out_BTNC.reshape(batch, frames, height, width, self.cfg.teacher_channels)

    def forward_tokens(self, feats_BTHWC: torch.Tensor, reference_B1NC: torch.Tensor) -> torch.Tensor:
        """The DA3 decoupler's interface: reference tokens (B, 1, H*W, C) in, (B, T, H*W, C) tokens out.

        The tokens are reshaped row-major to the square grid the release assumes.
        """
        reference_B1HWC = tokens_to_grid(reference_B1NC, self.cfg.height, self.cfg.width)
        return self.forward(feats_BTHWC, reference_B1HWC).flatten(2, 3)


def tokens_to_grid(tokens_BTNC: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, T, H*W, C) tokens -> (B, T, H, W, C), row-major; the release requires a square grid."""
    batch, frames, tokens, channels = tokens_BTNC.shape
    if height != width or tokens != height * width:
        raise ValueError(f"decoupler: {tokens} reference tokens do not form the square {height}x{width} grid "
                         f"the release's DA3 decoupler reshapes them to")
    return tokens_BTNC.reshape(batch, frames, height, width, channels)
