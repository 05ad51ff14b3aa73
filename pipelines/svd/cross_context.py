"""The SVD UNet's cross-attention without the repeated text states (the ``cross_context`` speed setting).

diffusers' ``UNetSpatioTemporalConditionModel`` repeats each clip's text states (B, L, D) over its
F frames (``repeat_interleave``: (B*F, L, D)), and its ``TransformerSpatioTemporalModel`` takes the
first frame's copy and materialises it over the h*w latent positions for the temporal blocks:
(B*h*w, L, D), 1.3 GB in float16 at the 32 x 32 level for B=32. The temporal cross-attention
``to_k``/``to_v`` then project every copy: about 7.5 TFLOP per UNet call at B=32, 16 x 256 x 256,
4.7% of the call's FLOPs; the spatial cross-attention projects the F copies per clip (about
0.5 TFLOP).

The keys and values are the same for every query of a clip, so :class:`FoldedTransformer` projects
them once per clip from the unrepeated (B, L, D) states and folds the queries: the B*h*w
temporal sequences of F queries (``temporal``), and with ``folded`` also the B*F spatial
sequences of h*w queries, become B sequences against one copy of the clip's keys. The rows of
one clip are consecutive in diffusers' layouts, so the fold is a free view, and every attention
processor (``pipelines.svd.attention``) and FP8 Linear runs on it unchanged. Attention rows are
independent, so each query's output is the same maths as diffusers'; only the kernels' rounding
differs (a keyed speed setting, like the attention backends). Everything else is diffusers'
operation sequence.

Install with :func:`install_cross_context` before compiling (a compiled graph keeps the forward
it traced). The UNet's own forward (and ``pipelines.svd.unet_split``) still repeats the text
states over frames: (B*F, L, D) is small (21 MB at B=32), and the transformers take the first
frame's copy as diffusers' temporal path does.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock, TemporalBasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_temporal import (TransformerSpatioTemporalModel,
                                                                 TransformerTemporalModelOutput)

from foresight.schemas.svd import CrossContext


def folded_cross_attention(attn: Attention, hidden_NSC: torch.Tensor, context_BLD: torch.Tensor) -> torch.Tensor:
    """``attn(hidden, context)`` with the N = B*G query sequences of S queries (the G sequences of
    one clip consecutive) folded into B sequences of G*S queries against the clip's L keys, then
    unfolded: (N, S, C), each query attending to its clip's keys as in diffusers' repeated layout."""
    clips, channels = context_BLD.shape[0], hidden_NSC.shape[-1]
    out_BQC = attn(hidden_NSC.reshape(clips, -1, channels), encoder_hidden_states=context_BLD)
    return out_BQC.reshape(hidden_NSC.shape)


def temporal_block_forward(block: TemporalBasicTransformerBlock, hidden_states: torch.Tensor, num_frames: int,
                           context_BLD: torch.Tensor) -> torch.Tensor:
    """``TemporalBasicTransformerBlock.forward`` (same operations in the same order, no chunked
    feed-forward) with the cross-attention folded per clip: ``hidden_states`` (B*F, h*w, C),
    ``context_BLD`` the clip's text states (B, L, D)."""
    batch_frames, seq_length, channels = hidden_states.shape
    batch_size = batch_frames // num_frames
    hidden_states = hidden_states[None, :].reshape(batch_size, num_frames, seq_length, channels)
    hidden_states = hidden_states.permute(0, 2, 1, 3).reshape(batch_size * seq_length, num_frames, channels)
    residual = hidden_states
    hidden_states = block.ff_in(block.norm_in(hidden_states))
    if block.is_res:
        hidden_states = hidden_states + residual
    hidden_states = block.attn1(block.norm1(hidden_states), encoder_hidden_states=None) + hidden_states
    if block.attn2 is not None:
        hidden_states = folded_cross_attention(block.attn2, block.norm2(hidden_states), context_BLD) + hidden_states
    ff_output = block.ff(block.norm3(hidden_states))
    hidden_states = ff_output + hidden_states if block.is_res else ff_output
    hidden_states = hidden_states[None, :].reshape(batch_size, seq_length, num_frames, channels)
    return hidden_states.permute(0, 2, 1, 3).reshape(batch_size * num_frames, seq_length, channels)


def spatial_block_forward(block: BasicTransformerBlock, hidden_states: torch.Tensor,
                          context_BLD: torch.Tensor) -> torch.Tensor:
    """``BasicTransformerBlock.forward`` for the SVD configuration (``layer_norm``, no positional
    embedding, self- then cross-attention, no chunked feed-forward; checked by
    :func:`check_foldable`) with the cross-attention folded per clip: ``hidden_states``
    (B*F, h*w, C), ``context_BLD`` (B, L, D)."""
    hidden_states = block.attn1(block.norm1(hidden_states), encoder_hidden_states=None) + hidden_states
    if block.attn2 is not None:
        hidden_states = folded_cross_attention(block.attn2, block.norm2(hidden_states), context_BLD) + hidden_states
    return block.ff(block.norm3(hidden_states)) + hidden_states


class FoldedTransformer(TransformerSpatioTemporalModel):
    """``TransformerSpatioTemporalModel`` whose temporal cross-attention (and with
    ``fold_spatial`` the spatial one) projects the text states once per clip and attends the
    clip's folded queries (see the module docstring). Same parameters and state dict: an
    installed transformer only changes class (:func:`install_cross_context`)."""

    fold_spatial = False

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                image_only_indicator: torch.Tensor | None = None, return_dict: bool = True):
        """diffusers' forward: ``hidden_states`` (B*F, C, h, w), ``encoder_hidden_states`` the text
        states repeated over frames (B*F, L, D), ``image_only_indicator`` (B, F)."""
        batch_frames, _, height, width = hidden_states.shape
        num_frames = image_only_indicator.shape[-1]
        batch_size = batch_frames // num_frames
        context_BLD = encoder_hidden_states.unflatten(0, (batch_size, num_frames))[:, 0]
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        inner_dim = hidden_states.shape[1]
        hidden_states = self.proj_in(hidden_states.permute(0, 2, 3, 1).reshape(batch_frames, height * width, inner_dim))
        emb = self.frame_embedding(batch_size, num_frames, hidden_states)
        for block, temporal_block in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            if self.fold_spatial:
                hidden_states = spatial_block_forward(block, hidden_states, context_BLD)
            else:
                hidden_states = block(hidden_states, encoder_hidden_states=encoder_hidden_states)
            hidden_states_mix = temporal_block_forward(temporal_block, hidden_states + emb, num_frames, context_BLD)
            hidden_states = self.time_mixer(x_spatial=hidden_states, x_temporal=hidden_states_mix,
                                            image_only_indicator=image_only_indicator)
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_frames, height, width, inner_dim).permute(0, 3, 1, 2).contiguous()
        output = hidden_states + residual
        return TransformerTemporalModelOutput(sample=output) if return_dict else (output,)

    def frame_embedding(self, batch_size: int, num_frames: int, like: torch.Tensor) -> torch.Tensor:
        """The frame-position embedding (B*F, 1, C) added before each temporal block, as diffusers
        computes it (``Timesteps`` returns float32; cast to the activations' dtype)."""
        frame_ids = torch.arange(num_frames, device=like.device).repeat(batch_size, 1).reshape(-1)
        t_emb = self.time_proj(frame_ids).to(dtype=like.dtype)
        return self.time_pos_embed(t_emb)[:, None, :]


class FoldedAllTransformer(FoldedTransformer):
    """:class:`FoldedTransformer` with the spatial cross-attention folded per clip too."""

    fold_spatial = True


TRANSFORMER_CLASSES: dict[str, type[TransformerSpatioTemporalModel]] = {
    "repeat": TransformerSpatioTemporalModel, "temporal": FoldedTransformer, "folded": FoldedAllTransformer}
"""The transformer class of each cross-context setting (``repeat``: diffusers' own)."""


def check_foldable(name: str, transformer: TransformerSpatioTemporalModel) -> None:
    """ValueError naming a transformer whose blocks :class:`FoldedTransformer` does not reproduce."""
    if transformer.gradient_checkpointing:
        raise ValueError(f"transformer {name}: gradient checkpointing is not run by the folded cross-attention")
    for index, block in enumerate(transformer.transformer_blocks):
        if (block.norm_type != "layer_norm" or block.pos_embed is not None or block.only_cross_attention
                or block._chunk_size is not None):
            raise ValueError(f"transformer {name}: spatial block {index} is not a plain layer-norm block "
                             f"(norm {block.norm_type}, positional embedding, cross-only or chunked feed-forward)")
    for index, block in enumerate(transformer.temporal_transformer_blocks):
        if block._chunk_size is not None:
            raise ValueError(f"transformer {name}: temporal block {index} has a chunked feed-forward")


def install_cross_context(unet: torch.nn.Module, setting: CrossContext) -> int:
    """Set every spatio-temporal transformer of ``unet`` to ``setting`` (``repeat``: diffusers'
    forward); returns how many. Install before compiling (a compiled graph keeps its forward)."""
    if setting not in TRANSFORMER_CLASSES:
        raise ValueError(f"cross-context setting {setting!r}: known are {', '.join(TRANSFORMER_CLASSES)}")
    transformers = [(name, module) for name, module in unet.named_modules()
                    if isinstance(module, TransformerSpatioTemporalModel)]
    for name, module in transformers:
        if type(module) not in TRANSFORMER_CLASSES.values():
            raise ValueError(f"transformer {name}: class {type(module).__name__} is not diffusers' "
                             "TransformerSpatioTemporalModel")
        if setting != "repeat":
            check_foldable(name, module)
        module.__class__ = TRANSFORMER_CLASSES[setting]
    return len(transformers)
