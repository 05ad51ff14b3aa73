"""Attention backends for the SVD UNet's attention layers, chosen by key length (a speed setting).

The full SVD UNet at 16 x 256 x 256 makes 64 attention calls per forward (16 spatio-temporal
transformers x 4): spatial self-attention over the h*w latent tokens of each frame, spatial
cross-attention from those tokens to the 20 text tokens, temporal self-attention over the 16
frames of each latent position and temporal cross-attention from the frames to the text tokens.
48 of the 64 have at most 20 keys, which fill a flash-attention tile (64-128 keys, 64-128
queries) poorly, so a backend that suits 1,024 tokens need not suit 16.

An attention *setting* names one backend for long and one for short key sequences:
``default`` leaves diffusers' processor (``F.scaled_dot_product_attention`` with PyTorch's own
backend choice) in place; ``LONG/SHORT[@N]`` (e.g. ``sdpa/packed-flex@64``) installs
:class:`PlannedAttnProcessor`, which runs attention with at most ``N`` keys (default
``schemas.svd.SHORT_MAX_KEYS``) through ``SHORT`` and the rest through ``LONG``; the names in
``schemas.svd.NAMED_ATTENTION`` are shorthands (the settings parse in ``schemas.svd``, so
configs validate them without torch). Every backend computes softmax(q k^T / sqrt(d)) v from the
same float16 q, k, v with float32 accumulation, so a setting changes rounding only (like the
compile scope), never the maths: it is recorded in a version's keyed parameters only when it is
not ``default``, and versions built with the default keep their ids.

Backends (q (N, heads, S, d), k and v (N, heads, L, d), as diffusers lays them out: transposed
views of (N, S, heads*d) projections):

- ``sdpa``: PyTorch's dispatch (cuDNN or flash attention on an H100); ``flash``, ``cudnn``,
  ``efficient``, ``math``: that SDPA kernel forced.
- ``explicit``: scores = (q / sqrt(d)) k^T as a float16 batched GEMM, softmax in float32, then
  probabilities (float16) x v.
- ``reduce``: the same as broadcast products summed in float32, so that ``torch.compile`` turns
  short attention into a few fused reduction kernels with the keys read once per query block
  rather than a tile-sized GEMM per (sequence, head); outside a compiled graph it runs
  ``explicit`` (eager it would materialise an (N, heads, S, L, d) product).
- ``flex``: ``torch.nn.attention.flex_attention`` (a generated Triton kernel on CUDA).
- ``packed-flex``: ``flex`` on groups of consecutive sequences packed into one sequence of up to
  ``PACK_QUERIES`` queries with a block-diagonal mask, so one tile holds several short
  sequences (free views of diffusers' layout: no copies).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from foresight.schemas.svd import ATTENTION_BACKENDS, AttentionPlan, parse_attention

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}
PACK_QUERIES = 128
"""``packed-flex`` packs consecutive sequences until a pack holds up to this many queries."""


# ---------------------------------------------------------------- the backends
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, with one SDPA kernel forced when ``kernel`` is given."""
    if kernel is None:
        return F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[kernel])]):
        return F.scaled_dot_product_attention(q, k, v)


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax((q / sqrt(d)) k^T) v as two batched GEMMs around a float32 softmax. Scaling q by
    1/sqrt(d) is exact in float16 when d is a power of 4 (d = 64 here) and keeps the scores in
    range, as SDPA's math backend does."""
    scores_NHSL = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-1, -2))
    probs_NHSL = scores_NHSL.float().softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs_NHSL, v)


def reduce(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v as broadcast products summed in float32 (see the module
    docstring: meant for short key sequences inside a compiled graph)."""
    if not torch.compiler.is_compiling():
        return explicit(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores_NHSL = (q.float().unsqueeze(-2) * k.float().unsqueeze(-3)).sum(-1) * scale
    probs_NHSL = scores_NHSL.softmax(dim=-1)
    return (probs_NHSL.unsqueeze(-1) * v.float().unsqueeze(-3)).sum(-2).to(q.dtype)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod=None) -> torch.Tensor:
    """``flex_attention``: inlined into an enclosing compiled graph, else through its own
    compiled kernel on CUDA; on a CPU outside a compiled graph its unfused reference (tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, score_mod=score_mod)
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, score_mod=score_mod)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": intended off the GPU
        return flex_attention(q, k, v, score_mod=score_mod)


def pack_factor(sequences: int, queries: int, limit: int = PACK_QUERIES) -> int:
    """How many consecutive sequences of ``queries`` queries one pack holds: the largest divisor
    of ``sequences`` with at most ``limit`` queries in a pack (1: no packing)."""
    best = 1
    for factor in range(1, max(1, limit // max(queries, 1)) + 1):
        if sequences % factor == 0:
            best = factor
    return best


@functools.cache
def block_diagonal(queries: int, keys: int):
    """A flex ``score_mod`` keeping the scores of query i and key j only when both belong to the
    same packed sequence (``queries`` and ``keys`` per sequence), -inf elsewhere. One function
    object per shape, so the compiled flex kernel outside a graph is not re-specialised per call."""
    def score_mod(score, batch, head, q_index, kv_index):
        return torch.where(q_index // queries == kv_index // keys, score, -float("inf"))

    return score_mod


def packed_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``flex`` on packs of consecutive sequences with a block-diagonal mask; the packs are views of
    diffusers' (N, S, heads, d) memory, so nothing is copied when q, k and v come from it."""
    sequences, heads, queries, dim = q.shape
    keys = k.shape[2]
    factor = pack_factor(sequences, queries)
    if factor == 1:
        return flex(q, k, v)

    def packed(x: torch.Tensor, length: int) -> torch.Tensor:
        return x.transpose(1, 2).reshape(sequences // factor, factor * length, heads, dim).transpose(1, 2)

    out = flex(packed(q, queries), packed(k, keys), packed(v, keys), score_mod=block_diagonal(queries, keys))
    return out.transpose(1, 2).reshape(sequences, queries, heads, dim).transpose(1, 2)


def attend(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention output (N, heads, S, d) of q (N, heads, S, d), k and v (N, heads, L, d) through
    ``backend`` (one of ``schemas.svd.ATTENTION_BACKENDS``)."""
    if backend == "sdpa":
        return sdpa(q, k, v)
    if backend in SDPA_BACKENDS:
        return sdpa(q, k, v, backend)
    if backend == "explicit":
        return explicit(q, k, v)
    if backend == "reduce":
        return reduce(q, k, v)
    if backend == "flex":
        return flex(q, k, v)
    if backend == "packed-flex":
        return packed_flex(q, k, v)
    raise ValueError(f"attention backend {backend!r}: known are {', '.join(ATTENTION_BACKENDS)}")


# ---------------------------------------------------------------- the processor
class PlannedAttnProcessor(AttnProcessor2_0):
    """diffusers' ``AttnProcessor2_0`` for the SVD UNet's ``Attention`` layers (no masks, norms or
    residual inside the layer; checked by :func:`install_attention`) with the attention itself
    run by the plan's backend for its key length. Projections, head layout and output
    projection are diffusers' own operations in the same order."""

    def __init__(self, plan: AttentionPlan):
        super().__init__()
        self.plan = plan

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if attention_mask is not None or hidden_states.ndim != 3:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        out = attend(self.plan.backend(k.shape[2]), q, k, v)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def check_plain_attention(name: str, attn: Attention) -> None:
    """ValueError naming a layer :class:`PlannedAttnProcessor` does not reproduce."""
    extras = {"spatial_norm": attn.spatial_norm, "group_norm": attn.group_norm, "norm_q": attn.norm_q,
              "norm_k": attn.norm_k, "norm_cross": attn.norm_cross}
    present = [key for key, value in extras.items() if value is not None and value is not False]
    if present or attn.residual_connection:
        raise ValueError(f"attention layer {name}: has {present or ['residual_connection']}, which the planned "
                         "attention processor does not run")


def install_attention(unet: torch.nn.Module, setting: str) -> int:
    """Set every attention layer of ``unet`` to ``setting`` (``default``: diffusers' processor);
    returns how many layers. Install before compiling (a compiled graph keeps its processors)."""
    plan = parse_attention(setting)
    layers = [(name, module) for name, module in unet.named_modules() if isinstance(module, Attention)]
    for name, module in layers:
        if plan is None:
            module.set_processor(AttnProcessor2_0())
        else:
            check_plain_attention(name, module)
            module.set_processor(PlannedAttnProcessor(plan))
    return len(layers)
