"""The SVD UNet forward split in two after the last feature block, so the one-step features are
ordinary outputs rather than hook side effects.

``UNetHead`` runs the time embedding, ``conv_in``, the down and mid blocks and ``up_blocks[0..k]``
and returns every up block output it produced (the features) plus what the rest of the UNet
needs; ``UNetTail`` runs ``up_blocks[k+1..]`` and the output layers. Head then tail is the
operation sequence of diffusers' ``UNetSpatioTemporalConditionModel.forward`` (same numbers in
eager mode). Why split rather than hook: a ``torch.compile``'d whole UNet does not run hooks
registered after compilation, and a features-only call must not pay for the high-resolution up
blocks. With the two halves compiled as two graphs, the generation's first conditional call and
the standalone extraction run the very same compiled head, so their features are bit-identical
by construction, and the tail is skipped when only features are wanted.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import UNetSpatioTemporalConditionModel

# (sample, emb, encoder_hidden_states, image_only_indicator, skip connections left for the tail,
#  outputs of up_blocks[0..k]) as returned by UNetHead: a plain tuple so a compiled graph can return it.
HeadState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...],
                  tuple[torch.Tensor, ...]]


def check_feature_blocks(unet: UNetSpatioTemporalConditionModel, blocks: list[int]) -> int:
    """The last (deepest-in-order) feature block; ValueError naming a block the UNet does not have."""
    if not blocks:
        raise ValueError("feature blocks: at least one up block is needed")
    for index in blocks:
        if not 0 <= index < len(unet.up_blocks):
            raise ValueError(f"feature block {index}: the UNet has up_blocks 0..{len(unet.up_blocks) - 1}")
    return max(blocks)


def _call_block(block: torch.nn.Module, **kwargs) -> Any:
    """Call a down/mid/up block, passing text states only to blocks with cross-attention (as diffusers)."""
    if not getattr(block, "has_cross_attention", False):
        kwargs.pop("encoder_hidden_states", None)
    return block(**kwargs)


class UNetHead(torch.nn.Module):
    """UNet forward up to and including ``up_blocks[last_block]`` (see the module docstring)."""

    def __init__(self, unet: UNetSpatioTemporalConditionModel, last_block: int):
        super().__init__()
        self.unet = unet
        self.last_block = last_block

    def time_embedding(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Embedding of the (continuous) timestep, (B, C_emb) in the sample dtype."""
        unet = self.unet
        timesteps = timestep[None] if timestep.ndim == 0 else timestep
        t_emb = unet.time_proj(timesteps.to(sample.device).expand(sample.shape[0])).to(dtype=sample.dtype)
        return unet.time_embedding(t_emb)

    def aug_embedding(self, added_time_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Embedding of the micro-conditioning ids (B, 3) -> (B, C_emb)."""
        unet = self.unet
        time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape((added_time_ids.shape[0], -1))
        return unet.add_embedding(time_embeds.to(dtype))

    def embed(self, sample: torch.Tensor, timestep: torch.Tensor, added_time_ids: torch.Tensor) -> torch.Tensor:
        """Time + micro-conditioning embedding (B, C_emb), as diffusers computes it."""
        emb = self.time_embedding(sample, timestep)
        return emb + self.aug_embedding(added_time_ids, emb.dtype)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_time_ids: torch.Tensor) -> HeadState:
        """``sample`` (B, T, C, h, w), ``timestep`` 0-d or (B,), text states (B, L, D), ids (B, 3)."""
        unet = self.unet
        batch, frames = sample.shape[:2]
        emb = self.embed(sample, timestep, added_time_ids)
        emb = emb.repeat_interleave(frames, dim=0, output_size=batch * frames)
        states = encoder_hidden_states.repeat_interleave(frames, dim=0, output_size=batch * frames)
        hidden = unet.conv_in(sample.flatten(0, 1))
        indicator = torch.zeros(batch, frames, dtype=hidden.dtype, device=hidden.device)
        common = dict(temb=emb, encoder_hidden_states=states, image_only_indicator=indicator)
        skips: tuple[torch.Tensor, ...] = (hidden,)
        for block in unet.down_blocks:
            hidden, res = _call_block(block, hidden_states=hidden, **common)
            skips += res
        hidden = unet.mid_block(hidden_states=hidden, **common)
        features = []
        for index in range(self.last_block + 1):
            hidden, skips = _up_block(unet, index, hidden, skips, common)
            features.append(hidden)
        return hidden, emb, states, indicator, skips, tuple(features)


class UNetTail(torch.nn.Module):
    """UNet forward after ``up_blocks[last_block]``: the remaining up blocks and the output layers."""

    def __init__(self, unet: UNetSpatioTemporalConditionModel, last_block: int):
        super().__init__()
        self.unet = unet
        self.last_block = last_block

    def forward(self, hidden: torch.Tensor, emb: torch.Tensor, states: torch.Tensor, indicator: torch.Tensor,
                skips: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The UNet prediction (B, T, C_out, h, w) from a head's state."""
        unet = self.unet
        common = dict(temb=emb, encoder_hidden_states=states, image_only_indicator=indicator)
        for index in range(self.last_block + 1, len(unet.up_blocks)):
            hidden, skips = _up_block(unet, index, hidden, skips, common)
        hidden = unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))
        return hidden.reshape(indicator.shape[0], indicator.shape[1], *hidden.shape[1:])


def _up_block(unet: UNetSpatioTemporalConditionModel, index: int, hidden: torch.Tensor,
              skips: tuple[torch.Tensor, ...], common: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Run ``up_blocks[index]`` on its skip connections (the last ``len(resnets)`` of ``skips``);
    returns its output and the skips left. The interpolation size is forwarded, as diffusers does,
    only when the latent side is not a multiple of the overall upsampling factor."""
    block = unet.up_blocks[index]
    count = len(block.resnets)
    res, skips = skips[-count:], skips[:-count]
    upsample_size = None
    if index < len(unet.up_blocks) - 1 and any(s % 2 ** unet.num_upsamplers for s in skips[0].shape[-2:]):
        upsample_size = skips[-1].shape[2:]
    hidden = _call_block(block, hidden_states=hidden, res_hidden_states_tuple=res, upsample_size=upsample_size,
                         **common)
    return hidden, skips


class UNetSplit:
    """Head and tail of one UNet for one feature split point, each optionally compiled.

    ``compile_kwargs`` (None = eager) are passed to ``torch.compile`` for each half."""

    def __init__(self, unet: UNetSpatioTemporalConditionModel, last_block: int,
                 compile_kwargs: dict | None = None):
        self.last_block = last_block
        head, tail = UNetHead(unet, last_block), UNetTail(unet, last_block)
        self.head: Callable[..., HeadState] = torch.compile(head, **compile_kwargs) if compile_kwargs else head
        self.tail: Callable[..., torch.Tensor] = torch.compile(tail, **compile_kwargs) if compile_kwargs else tail

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 added_time_ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Full UNet call: (prediction (B, T, C, h, w), {up block index: output (B*T, C_i, h_i, w_i)})."""
        hidden, emb, states, indicator, skips, features = self.head(sample, timestep, encoder_hidden_states,
                                                                    added_time_ids)
        return self.tail(hidden, emb, states, indicator, skips), dict(enumerate(features))

    def features(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 added_time_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Only the head: {up block index: output} without running the rest of the UNet."""
        return dict(enumerate(self.head(sample, timestep, encoder_hidden_states, added_time_ids)[-1]))
