"""One-step features: outputs of the UNet's first up blocks, captured with forward hooks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers import UNetSpatioTemporalConditionModel


class FeaturesCaptured(Exception):
    """Raised by the last feature hook to end a features-only forward early (see ``stop``)."""


@contextmanager
def capture_up_blocks(unet: UNetSpatioTemporalConditionModel, blocks: list[int],
                      stop: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Record the output of ``unet.up_blocks[i]`` for each i in ``blocks`` while the context is
    open: a dict i -> (B*T, C_i, h_i, w_i), overwritten by each forward call.

    With ``stop`` the hook of the deepest-in-order block raises :class:`FeaturesCaptured`, so a
    caller that only wants features skips the rest of the UNet (the high-resolution up blocks,
    a large share of its cost); the captured values are the same either way."""
    for index in blocks:
        if not 0 <= index < len(unet.up_blocks):
            raise ValueError(f"feature block {index}: the UNet has up_blocks 0..{len(unet.up_blocks) - 1}")
    captured: dict[int, torch.Tensor] = {}
    last = max(blocks)
    handles = [
        unet.up_blocks[index].register_forward_hook(_recorder(captured, index, stop and index == last))
        for index in set(blocks)
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _recorder(captured: dict[int, torch.Tensor], index: int, raise_after: bool):
    def hook(_module, _inputs, output):
        captured[index] = output[0] if isinstance(output, tuple) else output
        if raise_after:
            raise FeaturesCaptured
    return hook


def run_until_captured(call) -> None:
    """Run ``call()`` (a UNet forward inside ``capture_up_blocks(..., stop=True)``) to the point
    where the features are recorded."""
    try:
        call()
    except FeaturesCaptured:
        return
    raise RuntimeError("feature capture: the UNet forward finished without reaching the last feature block")


def merge_features(captured: dict[int, torch.Tensor], blocks: list[int], batch: int) -> torch.Tensor:
    """Captured block outputs -> (B, T, h, w, C) float16: each map upsampled (nearest) to the
    finest captured resolution and concatenated on channels in ``blocks`` order."""
    missing = [i for i in blocks if i not in captured]
    if missing:
        raise RuntimeError(f"feature capture: up_blocks {missing} did not run")
    height = max(captured[i].shape[-2] for i in blocks)
    width = max(captured[i].shape[-1] for i in blocks)
    maps = []
    for index in blocks:
        feats_NCHW = captured[index]
        if feats_NCHW.shape[-2:] != (height, width):
            feats_NCHW = F.interpolate(feats_NCHW, size=(height, width), mode="nearest")
        maps.append(feats_NCHW)
    feats_NCHW = torch.cat(maps, dim=1)
    frames = feats_NCHW.shape[0] // batch
    feats_BTHWC = feats_NCHW.reshape(batch, frames, *feats_NCHW.shape[1:]).permute(0, 1, 3, 4, 2)
    # Transposed on the device: a strided device-to-host copy of this size is far slower.
    return feats_BTHWC.to(torch.float16).contiguous()


def feature_shape(unet_config: dict, vae_config: dict, size: int, blocks: list[int]) -> tuple[int, int, int]:
    """(h, w, C) of the merged features for square frames of ``size`` pixels, from the configs
    alone (a flow declares its arrays before any worker loads the model).

    ``up_blocks[i]`` ends with an x2 upsampler except the last one, so its output side is
    bottom x 2^(i+1) where bottom = latent side / 2^(levels-1); channels follow the reversed
    ``block_out_channels``."""
    levels = len(unet_config["block_out_channels"])
    latent = size // 2 ** (len(vae_config["block_out_channels"]) - 1)
    if latent % 2 ** (levels - 1):
        raise ValueError(f"frame size {size}: latent side {latent} is not divisible by 2^{levels - 1} "
                         f"(the UNet's downsampling); choose a multiple of {size // latent * 2 ** (levels - 1)}")
    bottom = latent // 2 ** (levels - 1)
    channels = list(reversed(unet_config["block_out_channels"]))
    side = max(latent if i == levels - 1 else bottom * 2 ** (i + 1) for i in blocks)
    return side, side, sum(channels[i] for i in blocks)
