"""Runtime speed settings of a loaded SVD model (not part of a version: they do not change the maths).

- ``channels_last``: NHWC activations and weights for the UNet's convolutions.
- ``compile="blocks"``: ``torch.compile`` each ResNet/transformer/resampling layer inside the
  UNet blocks and the VAE decoder blocks (static shapes); identical layers share compiled code.
- ``compile="unet"``: ``torch.compile`` the UNet as two whole graphs, the head up to the last
  feature block (which returns the features) and the tail (``pipelines.svd.unet_split``), the
  whole VAE decoder and the (float32) VAE encoder each as one graph: fewer graph boundaries, so
  more fusion than per layer, at a longer first call. With ``freeze`` (the default) inductor
  treats the weights as constants (folded layouts): H100, B=32: 480 -> 467-475 ms per UNet call.

- ``attention``: the backend of each attention layer by key length (``pipelines.svd.attention``):
  ``default`` keeps diffusers' processor; another setting installs the planned processor before
  any compilation, so compiled graphs trace it.
- ``cross_context``: ``repeat`` keeps diffusers' transformers; ``temporal``/``folded`` project the
  cross-attention keys once per clip (``pipelines.svd.cross_context``), installed before compiling.

Compiled kernels and attention backends round differently from the eager default: outputs are
reproducible for the same settings on the same hardware, not across settings.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, field_validator

from foresight.pipelines.svd.attention import install_attention
from foresight.pipelines.svd.cross_context import install_cross_context
from foresight.pipelines.svd.loading import SVDModel
from foresight.schemas.base import StrictModel
from foresight.schemas.svd import ATTENTION_HELP, CROSS_CONTEXT_HELP, DEFAULT_CROSS_CONTEXT, CrossContext, check_attention

log = logging.getLogger(__name__)

LAYER_GROUPS = ("resnets", "attentions", "downsamplers", "upsamplers")


class SpeedOptions(StrictModel):
    """How to run the UNet fast on a given device."""

    channels_last: bool = Field(default=False, description="NHWC memory format for the UNet.")
    compile: Literal["none", "blocks", "unet"] = Field(default="none", description="torch.compile scope.")
    compile_mode: str | None = Field(default=None, description="torch.compile mode (None = default).")
    freeze: bool = Field(default=True, description="compile='unet' with the inductor backend: weights as "
                                                    "constants (inductor freezing; inference only).")
    compile_backend: str = Field(default="inductor",
                                 description="torch.compile backend ('aot_eager' checks the graph capture "
                                             "without generating kernels, as the CPU tests do).")
    attention: str = Field(default="default", description=f"Attention backends of the UNet: {ATTENTION_HELP}.")
    cross_context: CrossContext = Field(default=DEFAULT_CROSS_CONTEXT, description=f"Text states of cross-attention: "
                                                                      f"{CROSS_CONTEXT_HELP}.")

    _check_attention = field_validator("attention")(check_attention)


def compiled_layers(model: SVDModel) -> list[torch.nn.Module]:
    """The layers ``compile="blocks"`` compiles: every ResNet, transformer and resampler of every
    UNet block and VAE decoder block."""
    unet, decoder = model.unet, model.vae.decoder
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks, decoder.mid_block, *decoder.up_blocks]
    layers = []
    for block in blocks:
        for group in LAYER_GROUPS:
            layers.extend(getattr(block, group, None) or [])
    return layers


def set_channels_last(unet: torch.nn.Module, enabled: bool) -> None:
    """NHWC (NDHWC for the temporal 3-D convolutions) weights, or back to contiguous. Per module,
    because ``Module.to(memory_format=...)`` refuses a model that mixes 4-D and 5-D weights."""
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            fmt = torch.channels_last if enabled else torch.contiguous_format
        elif isinstance(module, torch.nn.Conv3d):
            fmt = torch.channels_last_3d if enabled else torch.contiguous_format
        else:
            continue
        module.weight.data = module.weight.data.contiguous(memory_format=fmt)


def apply_speedups(model: SVDModel, options: SpeedOptions) -> SVDModel:
    """Apply ``options`` to ``model`` in place (and return it). A ``null`` model (no UNet, see
    pipelines/null_models.py) has nothing to speed up and is returned as it is."""
    if model.unet is None:
        return model
    if options.channels_last:
        set_channels_last(model.unet, True)
    if options.attention != "default":
        install_attention(model.unet, options.attention)
    if options.cross_context != "repeat":
        install_cross_context(model.unet, options.cross_context)
    if options.compile == "none":
        return model
    # Many distinct layer shapes share a few code objects; lift the per-code recompile limits so
    # none of them silently falls back to eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 4096)
    kwargs = {"dynamic": False, "backend": options.compile_backend,
              **({"mode": options.compile_mode} if options.compile_mode else {})}
    if options.compile == "unet":
        if options.freeze and options.compile_backend == "inductor" and not options.compile_mode:
            kwargs["options"] = {"freezing": True}
        model.compile_unet(kwargs)
        model.vae.decoder.compile(**kwargs)
        model.vae_encoder.compile(**kwargs)
    else:
        for layer in compiled_layers(model):
            layer.compile(**kwargs)
    log.info("SVD model compiled (%s, mode %s, backend %s, %s)", options.compile, options.compile_mode,
             options.compile_backend, kwargs.get("options"))
    return model
