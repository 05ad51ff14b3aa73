"""Static-shape π0 action-chunk sampler: the same maths as ``PI0ForConditionalGeneration.sample_actions``
(prefix once, then ``num_steps`` Euler steps of the action expert over the prefix's keys/values),
written without a dynamic cache, mask builders or host synchronisation, so one whole chunk can be
captured in a CUDA graph and replayed (:class:`GraphedChunkSampler`). At batch 1 an eager chunk is
bound by kernel launches; a replayed graph is bound by the GPU's work.

It reuses the model's own modules (SigLIP, projector, norms, projections, MLPs, rotary tables);
only the attention of the two Gemma stacks is written out: bidirectional over the valid prefix
tokens, and in the expert the state token sees [prefix, state] while the action tokens see
[prefix, state, actions] (transformers' block mask for π0).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb


def additive_mask(allowed_BQK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (B, Q, K) 'may attend' -> additive (B, 1, Q, K) mask in ``dtype``."""
    blocked = torch.finfo(dtype).min
    return torch.zeros(allowed_BQK.shape, dtype=dtype, device=allowed_BQK.device).masked_fill(
        ~allowed_BQK, blocked)[:, None]


def grouped_attention(q_BHTD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor, mask_B1TS: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Attention with G key/value heads shared by H query heads (π0: one), as two plain matmuls.

    The query heads of a group are folded into the rows of one matrix product against the group's
    keys, so no key/value copy per head is made and no fused kernel with mask support is needed;
    the softmax runs in float32 (as transformers' eager attention). Returns (B, H, T, D).
    """
    batch, heads, length, dim = q_BHTD.shape
    groups, keys = k_BGSD.shape[1], k_BGSD.shape[2]
    q = q_BHTD.reshape(batch, groups, (heads // groups) * length, dim)
    scores = torch.matmul(q, k_BGSD.transpose(-1, -2)) * scale
    scores = scores.view(batch, groups, heads // groups, length, keys) + mask_B1TS[:, :, None]
    probs = torch.softmax(scores.float(), dim=-1).to(q_BHTD.dtype)
    out = torch.matmul(probs.view(batch, groups, (heads // groups) * length, keys), v_BGSD)
    return out.view(batch, heads, length, dim)


ATTENTION = ("matmul", "sdpa")
"""'matmul': grouped_attention; 'sdpa': torch's scaled_dot_product_attention(enable_gqa=True)."""


def gemma_layer(layer: Any, x_BTH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention: str = "matmul") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Gemma decoder layer; returns (output, this layer's keys, values) after rotary embedding.

    ``past``: keys/values of the prefix (the VLM layer's cache) that the expert's queries also see.
    """
    attn = layer.self_attn
    batch, length, _ = x_BTH.shape
    h = layer.input_layernorm(x_BTH)
    q = attn.q_proj(h).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
    if attention == "sdpa":
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
    else:
        out = grouped_attention(q, keys, values, mask, attn.scaling)
    x_BTH = x_BTH + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
    x_BTH = x_BTH + layer.mlp(layer.post_attention_layernorm(x_BTH))
    return x_BTH, k, v


def prefix_kv(model: Any, input_ids: torch.Tensor, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor,
              attention_mask: torch.Tensor, attention: str = "matmul") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys/values of every VLM layer over the prefix (images + instruction)."""
    embeds = model.model.embed_prefix(input_ids, pixel_values, pixel_attention_mask)
    stack = model.model.vlm.language_model
    positions = attention_mask.cumsum(-1) - 1
    cos, sin = stack.rotary_emb(embeds, positions)
    valid = attention_mask.bool()
    mask = additive_mask(valid[:, None, :].expand(-1, valid.shape[1], -1), embeds.dtype)
    x, cache = embeds, []
    for layer in stack.layers:
        x, k, v = gemma_layer(layer, x, cos, sin, mask, None, attention)
        cache.append((k, v))
    return cache


def suffix_mask(attention_mask: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1 + chunk, P + 1 + chunk): valid prefix for all; the state token does not see the actions."""
    batch = attention_mask.shape[0]
    prefix = attention_mask.bool()[:, None, :].expand(-1, 1 + chunk, -1)
    suffix = torch.ones(1 + chunk, 1 + chunk, dtype=torch.bool, device=attention_mask.device)
    suffix[0, 1:] = False
    return additive_mask(torch.cat([prefix, suffix.expand(batch, -1, -1)], dim=2), dtype)


def expert_velocity(model: Any, cache: list[tuple[torch.Tensor, torch.Tensor]], state: torch.Tensor,
                    x_t: torch.Tensor, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    mask: torch.Tensor, attention: str = "matmul") -> torch.Tensor:
    """The action expert's velocity (B, chunk, 32) at (x_t, t) over the prefix cache."""
    x = model.embed_action_time(state, x_t, t)
    expert = model.model.dit
    for layer, past in zip(expert.layers, cache, strict=True):
        x, _, _ = gemma_layer(layer, x, cos, sin, mask, past, attention)
    x = expert.norm(x)
    return model.action_out_proj(x[:, -model.config.chunk_size:])


@torch.no_grad()
def sample_chunk(model: Any, state: torch.Tensor, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                 pixel_attention_mask: torch.Tensor, attention_mask: torch.Tensor, noise: torch.Tensor,
                 num_steps: int = 10, attention: str = "matmul") -> torch.Tensor:
    """One action chunk: prefix once, then ``num_steps`` Euler steps from t = 1 to 0 (as sample_actions)."""
    if attention not in ATTENTION:
        raise ValueError(f"attention {attention!r}: expected one of {ATTENTION}")
    cache = prefix_kv(model, input_ids, pixel_values, pixel_attention_mask, attention_mask, attention)
    chunk = model.config.chunk_size
    positions = attention_mask.sum(-1, keepdim=True) + torch.arange(1 + chunk, device=noise.device)
    cos, sin = model.model.dit.rotary_emb(cache[0][0], positions)
    mask = suffix_mask(attention_mask, chunk, cache[0][0].dtype)
    dt = -1.0 / num_steps
    x = noise
    for step in range(num_steps):
        t = torch.full((noise.shape[0],), 1.0 + step * dt, dtype=torch.float32, device=noise.device)
        x = x + dt * expert_velocity(model, cache, state, x, t, cos, sin, mask, attention)
    return x


class GraphedChunkSampler:
    """:func:`sample_chunk` captured once in a CUDA graph for fixed input shapes; calls copy the
    inputs into the captured buffers and replay. The returned tensor is reused by the next call."""

    NAMES = ("state", "input_ids", "pixel_values", "pixel_attention_mask", "attention_mask", "noise")

    def __init__(self, model: Any, num_steps: int = 10, warmup: int = 2, attention: str = "matmul",
                 **example: torch.Tensor):
        self.model, self.num_steps, self.attention = model, num_steps, attention
        self.inputs = {name: example[name].clone() for name in self.NAMES}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # kernels choose their algorithms outside the capture
                sample_chunk(model, num_steps=num_steps, attention=attention, **self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = sample_chunk(model, num_steps=num_steps, attention=attention, **self.inputs)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        for name in self.NAMES:
            self.inputs[name].copy_(inputs[name])
        self.graph.replay()
        return self.output
