"""Transformer building blocks shared by the decoupler, the Uni-Perceiver and the policy.

Attention goes through ``F.scaled_dot_product_attention`` so that bf16 runs on a GPU use the fused
flash/memory-efficient kernels; every block is pre-LayerNorm with a residual connection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention of ``queries_BND`` over ``context_BMD`` (self-attention when context is None)."""

    def __init__(self, dim: int, heads: int, dropout: float, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention: dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.self_attention = context_dim is None
        if self.self_attention:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.out_drop = nn.Dropout(dropout)

    def _split_heads(self, x_BND: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x_BND.shape
        return x_BND.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, x_BND: torch.Tensor, context_BMD: torch.Tensor | None = None) -> torch.Tensor:
        if self.self_attention:
            q_BND, k_BND, v_BND = self.qkv(x_BND).chunk(3, dim=-1)
        else:
            q_BND = self.q(x_BND)
            k_BND, v_BND = self.kv(context_BMD).chunk(2, dim=-1)
        q, k, v = (self._split_heads(t) for t in (q_BND, k_BND, v_BND))
        drop = self.dropout if self.training else 0.0
        out_BHND = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out_BND = out_BHND.transpose(1, 2).reshape(x_BND.shape[0], x_BND.shape[1], -1)
        return self.out_drop(self.proj(out_BND))


class Mlp(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout, hidden width ``ratio * dim``."""

    def __init__(self, dim: int, ratio: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, ratio * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ratio * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        return self.net(x_BND)


class SelfAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio, dropout)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        x_BND = x_BND + self.attn(self.norm_attn(x_BND))
        return x_BND + self.mlp(self.norm_mlp(x_BND))


class CrossAttentionBlock(nn.Module):
    """Pre-LN cross-attention: x + attn(LN(x), LN(context)); the context is not updated."""

    def __init__(self, dim: int, heads: int, dropout: float, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.norm_q = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim)
        self.attn = Attention(dim, heads, dropout, context_dim=context_dim)

    def forward(self, x_BND: torch.Tensor, context_BMD: torch.Tensor) -> torch.Tensor:
        return x_BND + self.attn(self.norm_q(x_BND), self.norm_context(context_BMD))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (all of them, or only those that require grad)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
