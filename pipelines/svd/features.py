"""One-step features: outputs of the UNet's first up blocks (returned by the split UNet's head,
see ``pipelines.svd.unet_split``), merged into one (B, T, h, w, C) map, and device-to-host copies."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def merge_features(captured: dict[int, torch.Tensor], blocks: list[int], batch: int,
                   dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Up block outputs {index: (B*T, C_i, h_i, w_i)} -> (B, T, h, w, C) in ``dtype`` (float16 is
    what the stores hold): each map upsampled (nearest, torch's default mode, as S-VAM's
    ``step_unet``) to the finest captured resolution and concatenated on channels in ``blocks``
    order."""
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
    return feats_BTHWC.to(dtype).contiguous()


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


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A device tensor as a host numpy array. From a GPU the copy lands in page-locked memory
    (PyTorch's caching host allocator: the block returns to its cache once the array is dropped,
    so steady-state calls neither pin nor page-fault fresh memory, which costs more than the copy
    of 21 MB of features per clip itself)."""
    if tensor.device.type != "cuda":
        return tensor.numpy() if tensor.device.type == "cpu" else tensor.cpu().numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host.numpy()
