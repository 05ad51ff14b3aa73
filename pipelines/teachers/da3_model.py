"""Depth Anything 3 any-view ViT backbone (DA3's ``DinoV2.pretrained``), written for foresight.

Follows /work/shared/fixtures/da3_tiny/SPEC.md (sections 4-6): local blocks per view, from
``alt_start`` on odd blocks attend globally over all views of a clip, a camera token replaces the
special token, and from 3 views on a reference view is picked by the "saddle_balanced" rule.
Parameter names match the official module tree so official state dicts load unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from foresight.schemas.base import StrictModel

THRESH_FOR_REF_SELECTION = 3
RefStrategy = Literal["saddle_balanced", "first", "middle"]


class DA3ArchConfig(StrictModel):
    """Architecture of the any-view ViT (the ``net`` section of an official DA3 preset)."""

    embed_dim: int = Field(description="Token width C.")
    depth: int = Field(description="Number of transformer blocks.")
    num_heads: int = Field(description="Attention heads (head dim = C / heads).")
    mlp_ratio: float = Field(default=4.0, description="MLP hidden width / C.")
    patch_size: int = Field(default=14, description="Patch size of the conv embedding.")
    img_size: int = Field(default=518, description="Image size the pos-embed grid was trained at.")
    out_layers: list[int] = Field(description="Block indices whose outputs form stages 0, 1, ...")
    alt_start: int = Field(description="First block with camera token / global attention on odd blocks.")
    qknorm_start: int = Field(description="First block with q/k LayerNorm.")
    rope_start: int = Field(description="First block with 2D RoPE.")
    rope_freq: float = Field(default=100.0, description="RoPE base frequency.")
    interpolate_offset: float = Field(default=0.1, description="Pos-embed resampling scale offset.")

    @property
    def pos_grid(self) -> int:
        return self.img_size // self.patch_size


def _positions_local(h0: int, w0: int, device: torch.device) -> torch.Tensor:
    """(1 + h0*w0, 2) integer (y, x): special token (0, 0), patch (r, q) -> (r + 1, q + 1)."""
    ys, xs = torch.meshgrid(torch.arange(h0, device=device), torch.arange(w0, device=device), indexing="ij")
    patches = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=-1) + 1
    return torch.cat([torch.zeros(1, 2, dtype=patches.dtype, device=device), patches], dim=0)


def _positions_global(h0: int, w0: int, device: torch.device) -> torch.Tensor:
    """(1 + h0*w0, 2): special token (0, 0), every patch (1, 1) (no spatial signal, by design)."""
    pos = torch.ones(1 + h0 * w0, 2, dtype=torch.long, device=device)
    pos[0] = 0
    return pos


class Rope2D:
    """2D rotary embedding, rotate-half convention; vertical half uses y, horizontal half uses x."""

    def __init__(self, base: float):
        self.base = base

    def tables(self, positions_N2: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos/sin tables for y and x, each (N, head_dim/2), built in float32 as upstream."""
        half = head_dim // 2
        inv_freq = 1.0 / (self.base ** (torch.arange(0, half, 2, device=positions_N2.device).float() / half))
        out = []
        for axis in (0, 1):
            angles = positions_N2[:, axis].float()[:, None] * inv_freq[None, :]
            angles = torch.cat([angles, angles], dim=-1)
            out += [angles.cos().to(dtype), angles.sin().to(dtype)]
        return tuple(out)

    @staticmethod
    def apply(x_BHND: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
        cos_y, sin_y, cos_x, sin_x = tables
        vert, horiz = x_BHND.chunk(2, dim=-1)
        return torch.cat([Rope2D._rotate(vert, cos_y, sin_y), Rope2D._rotate(horiz, cos_x, sin_x)], dim=-1)

    @staticmethod
    def _rotate(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        u1, u2 = u.chunk(2, dim=-1)
        return u * cos + torch.cat([-u2, u1], dim=-1) * sin


class Attention(nn.Module):
    """Multi-head self-attention with optional per-head q/k LayerNorm (eps 1e-5) and 2D RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if qk_norm:
            self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-5)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-5)
        self.qk_norm = qk_norm
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x_BNC: torch.Tensor, rope: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        B, N, C = x_BNC.shape
        qkv = self.qkv(x_BNC).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q_BHND, k_BHND, v_BHND = qkv.unbind(0)
        if self.qk_norm:
            q_BHND, k_BHND = self.q_norm(q_BHND), self.k_norm(k_BHND)
        if rope is not None:
            q_BHND, k_BHND = Rope2D.apply(q_BHND, rope), Rope2D.apply(k_BHND, rope)
        out_BHND = F.scaled_dot_product_attention(q_BHND, k_BHND, v_BHND)
        return self.proj(out_BHND.transpose(1, 2).reshape(B, N, C))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale (block LayerNorms use eps 1e-6)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x_BNC: torch.Tensor, rope: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        x_BNC = x_BNC + self.ls1(self.attn(self.norm1(x_BNC), rope))
        return x_BNC + self.ls2(self.mlp(self.norm2(x_BNC)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels_NCHW).flatten(2).transpose(1, 2)


def saddle_balanced_scores(cls_BSC: torch.Tensor) -> torch.Tensor:
    """Per-view "saddle_balanced" scores (B, S) of the slot-0 tokens; the reference is the argmin.

    Three per-view metrics (mean cosine similarity to the other views, token norm, variance of
    the unit token), each min-max normalised over the views; a view scores low when it sits in
    the middle of all three. Computed in float32 whatever the model dtype, to keep the choice
    stable under bf16.
    """
    tokens = cls_BSC.float()
    S = tokens.shape[1]
    norm_BS = tokens.norm(dim=-1)
    unit_BSC = tokens / norm_BS.clamp_min(1e-12)[..., None]
    sim_BSS = unit_BSC @ unit_BSC.transpose(1, 2)
    sim_BS = (sim_BSS.sum(dim=-1) - 1.0) / (S - 1)
    var_BS = unit_BSC.var(dim=-1, unbiased=True)

    def minmax(m_BS: torch.Tensor) -> torch.Tensor:
        low, high = m_BS.min(dim=1, keepdim=True).values, m_BS.max(dim=1, keepdim=True).values
        return (m_BS - low) / (high - low + 1e-8)

    return sum((minmax(m) - 0.5).abs() for m in (sim_BS, norm_BS, var_BS))


def select_reference_view(cls_BSC: torch.Tensor, strategy: RefStrategy) -> torch.Tensor:
    """Index (B,) of the reference view of every sample."""
    B, S = cls_BSC.shape[:2]
    if strategy == "first":
        return torch.zeros(B, dtype=torch.long, device=cls_BSC.device)
    if strategy == "middle":
        return torch.full((B,), S // 2, dtype=torch.long, device=cls_BSC.device)
    return saddle_balanced_scores(cls_BSC).argmin(dim=1)


def reference_view_order(ref_B: torch.Tensor, S: int) -> torch.Tensor:
    """Permutation (B, S): slot 0 holds the reference view, then the others in original order."""
    views_S = torch.arange(S, device=ref_B.device)
    others_BS = views_S[None, :].expand(ref_B.shape[0], S)
    # Stable sort of "is not the reference" puts the reference first and keeps the rest in order.
    key_BS = (others_BS != ref_B[:, None]).to(torch.int64)
    return torch.sort(key_BS, dim=1, stable=True).indices


def _gather_views(x_BS_: torch.Tensor, order_BS: torch.Tensor) -> torch.Tensor:
    index = order_BS.view(*order_BS.shape, *([1] * (x_BS_.dim() - 2))).expand_as(x_BS_)
    return torch.gather(x_BS_, 1, index)


class DA3Backbone(nn.Module):
    """The any-view ViT; parameter names match the official ``DinoV2.pretrained`` module."""

    def __init__(self, cfg: DA3ArchConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.camera_token = nn.Parameter(torch.zeros(1, 2, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_grid**2 + 1, C))
        hidden = int(C * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            [Block(C, cfg.num_heads, hidden, qk_norm=i >= cfg.qknorm_start) for i in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(C, eps=1e-5)
        self.rope = Rope2D(cfg.rope_freq)

    def init_random(self, seed: int) -> None:
        """Deterministic random weights for the ``tiny`` / ``random`` specs (not a trained model)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "_norm.weight")):
                    param.fill_(1.0)
                elif name.endswith("gamma"):
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.zero_()
                else:
                    std = 1.0 if name == "camera_token" else 0.02
                    param.copy_(torch.randn(param.shape, generator=generator) * std)

    def pos_embed_for(self, h0: int, w0: int) -> torch.Tensor:
        """(1, 1 + h0*w0, C) position embedding, bicubically resampled from the trained grid."""
        M = self.cfg.pos_grid
        if h0 == M and w0 == M:
            return self.pos_embed
        pos = self.pos_embed.float()
        grid_1CMM = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        offset = self.cfg.interpolate_offset
        scale = ((h0 + offset) / M, (w0 + offset) / M)
        grid_1Chw = F.interpolate(grid_1CMM, scale_factor=scale, mode="bicubic", antialias=False)
        if tuple(grid_1Chw.shape[-2:]) != (h0, w0):
            raise ValueError(f"da3: pos-embed resampling gave {tuple(grid_1Chw.shape[-2:])}, expected {(h0, w0)}")
        patches = grid_1Chw.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat([pos[:, :1], patches], dim=1).to(self.pos_embed.dtype)

    def embed(self, pixels_BSCHW: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the special (cls) token and position embedding: (B, S, 1 + Np, C)."""
        B, S, _, H, W = pixels_BSCHW.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"da3: input size {H}x{W} is not a multiple of the patch size {p}")
        tokens = self.patch_embed(pixels_BSCHW.reshape(B * S, 3, H, W))
        tokens = torch.cat([self.cls_token.expand(B * S, -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.pos_embed_for(H // p, W // p).to(tokens.dtype)
        return tokens.reshape(B, S, tokens.shape[1], -1)

    def _rope_tables(self, S: int, h0: int, w0: int, dtype: torch.dtype, device: torch.device):
        """RoPE tables for local blocks (per view) and global blocks (all views, view-major)."""
        head_dim = self.cfg.embed_dim // self.cfg.num_heads
        local = self.rope.tables(_positions_local(h0, w0, device), head_dim, dtype)
        glob = self.rope.tables(_positions_global(h0, w0, device).repeat(S, 1), head_dim, dtype)
        return local, glob

    def _camera_tokens(self, B: int, S: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, S, C): the "reference" camera token in slot 0, the "source" token elsewhere."""
        ref = self.camera_token[:, :1].expand(B, 1, -1)
        src = self.camera_token[:, 1:].expand(B, S - 1, -1)
        return torch.cat([ref, src], dim=1).to(dtype)

    def forward_layers(self, pixels_BSCHW: torch.Tensor, layers: list[int],
                       ref_strategy: RefStrategy = "saddle_balanced") -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """Run blocks 0..max(layers); return {layer: concat(last local, current) (B, S, N, 2C)}
        in the original view order, and the reference view per sample (None below 3 views).

        Blocks after the last requested layer are skipped: their output is never needed.
        """
        cfg = self.cfg
        bad = [i for i in layers if not 0 <= i < cfg.depth]
        if bad:
            raise ValueError(f"da3: layers {bad} out of range for a {cfg.depth}-block backbone")
        B, S, _, H, W = pixels_BSCHW.shape
        h0, w0 = H // cfg.patch_size, W // cfg.patch_size
        x_BSNC = self.embed(pixels_BSCHW)
        N, C = x_BSNC.shape[2:]
        rope_local, rope_global = self._rope_tables(S, h0, w0, x_BSNC.dtype, x_BSNC.device)
        local_BSNC, order_BS, ref_B, outputs = x_BSNC, None, None, {}
        for i in range(max(layers) + 1):
            if i == cfg.alt_start - 1 and S >= THRESH_FOR_REF_SELECTION:
                ref_B = select_reference_view(x_BSNC[:, :, 0], ref_strategy)
                order_BS = reference_view_order(ref_B, S)
                x_BSNC, local_BSNC = _gather_views(x_BSNC, order_BS), _gather_views(local_BSNC, order_BS)
            if i == cfg.alt_start:
                cam_BS1C = self._camera_tokens(B, S, x_BSNC.dtype)[:, :, None]
                # Upstream writes in place into the tensor that is also the last local output.
                x_BSNC = local_BSNC = torch.cat([cam_BS1C, x_BSNC[:, :, 1:]], dim=2)
            is_global = i >= cfg.alt_start and i % 2 == 1
            rope = None if i < cfg.rope_start else (rope_global if is_global else rope_local)
            if is_global:
                x_BSNC = self.blocks[i](x_BSNC.reshape(B, S * N, C), rope).reshape(B, S, N, C)
            else:
                x_BSNC = local_BSNC = self.blocks[i](x_BSNC.reshape(B * S, N, C), rope).reshape(B, S, N, C)
            if i in layers:
                out = torch.cat([local_BSNC, x_BSNC], dim=-1)
                outputs[i] = out if order_BS is None else _gather_views(out, order_BS.argsort(dim=1))
        return outputs, ref_B

    def intermediate_layers(self, pixels_BSCHW: torch.Tensor, layers: list[int], cat_token: bool = True,
                            ref_strategy: RefStrategy = "saddle_balanced") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Official ``get_intermediate_layers`` output, in increasing block order: per layer
        (patch tokens (B, S, Np, 2C or C), camera output (B, S, 2C or C)).

        With ``cat_token`` the local half stays raw and only the global half gets the final norm;
        without it the current tokens alone are normalised.
        """
        outputs, _ = self.forward_layers(pixels_BSCHW, sorted(set(layers)), ref_strategy)
        C = self.cfg.embed_dim
        result = []
        for i in sorted(outputs):
            out = outputs[i] if cat_token else outputs[i][..., C:]
            if cat_token:
                tokens = torch.cat([out[..., :C], self.norm(out[..., C:])], dim=-1)
            else:
                tokens = self.norm(out)
            result.append((tokens[:, :, 1:], out[:, :, 0]))
        return result
