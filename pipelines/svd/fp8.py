"""FP8 (e4m3) matrix multiplies for the UNet's transformer Linear layers (the ``fp8`` precision).

Weights are quantised once, per output channel (row-wise scales); activations per row (token) at
every call, so no calibration is needed. The product runs through ``torch._scaled_mm`` (Hopper
FP8 tensor cores on the GPU) with the scales applied in its epilogue; under ``torch.compile`` the
activation quantisation (row max, scale, cast) fuses with the producer of the activation.
Everything else (convolutions, attention, norms, the VAE) stays in float16. FP8 changes the
numbers, so it is a keyed precision of its own (a new version id), never a speed setting.
"""

from __future__ import annotations

import functools

import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# Smallest row maximum used for a scale: an all-zero row (the unconditional branch's zeroed text
# states) quantises to zeros instead of dividing by zero.
MIN_AMAX = 1e-12
# Linear layers of a TransformerSpatioTemporalModel that stay in float16. The frame-position
# embedding runs on T rows only. The feed-forward down projections (``ff.net.2``, ``ff_in.net.2``)
# read the 4C-wide GEGLU output: its row maximum is a two-pass reduction that recomputes the
# GELU, and on an H100 (B=32) those quantisation kernels cost 133 ms per UNet call against about
# 15 ms saved by their FP8 products, which made an all-Linear FP8 UNet 9% slower than fp16.
KEEP_PREFIXES = ("time_pos_embed",)
KEEP_SUFFIXES = ("ff.net.2", "ff_in.net.2")


def quantize_rows(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantisation: (values (M, K) float8, scales (M, 1) float32) with
    ``values * scales ~ x``; each row's largest magnitude maps to the e4m3 maximum."""
    amax_M1 = x_MK.abs().amax(dim=1, keepdim=True).float().clamp(min=MIN_AMAX)
    scale_M1 = amax_M1 / FP8_MAX
    values = (x_MK.float() / scale_M1).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return values, scale_M1


@functools.cache
def product_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The output dtype to ask ``_scaled_mm`` for: ``dtype`` where this device's row-wise kernel
    returns it, else bfloat16 (older cuBLAS builds return only bfloat16 with row-wise scales);
    probed once per device and dtype on a 16x16 product."""
    values = torch.ones(16, 16, device=device).to(FP8)
    scale = torch.ones(16, 1, device=device)
    try:
        torch._scaled_mm(values, values.t(), scale_a=scale, scale_b=scale.t(), out_dtype=dtype)
        return dtype
    except (RuntimeError, ValueError):
        return torch.bfloat16


class Fp8Linear(torch.nn.Module):
    """A ``torch.nn.Linear`` whose product runs in e4m3 with row-wise scales on both operands.

    The quantised weight and its float32 scales are stored as raw integers (uint8, int32) so that
    ``Module.to(dtype)`` leaves them alone; the bias follows the activation dtype and is added
    after the product."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight_NK, scale_N1 = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_bits", weight_NK.view(torch.uint8))
        self.register_buffer("weight_scale_bits", scale_N1.reshape(1, -1).contiguous().view(torch.int32))
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.product_dtype = product_dtype(linear.weight.device, linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_MK = x.reshape(-1, self.in_features)
        values_MK, scale_M1 = quantize_rows(x_MK)
        weight_KN = self.weight_bits.view(FP8).t()  # column-major, as _scaled_mm wants its second operand
        out_MN = torch._scaled_mm(values_MK, weight_KN, scale_a=scale_M1, scale_b=self.weight_scale,
                                  out_dtype=self.product_dtype, use_fast_accum=True).to(x.dtype)
        if self.bias is not None:
            out_MN = out_MN + self.bias
        return out_MN.reshape(*x.shape[:-1], self.out_features)

    @property
    def weight_scale(self) -> torch.Tensor:
        """Per-output-channel weight scales (1, N) float32."""
        return self.weight_scale_bits.view(torch.float32)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise"


def fp8_supported(device: torch.device) -> bool:
    """Whether ``device`` runs e4m3 ``_scaled_mm``: CUDA needs compute capability 8.9 (Ada) or
    newer; the CPU kernel exists in recent PyTorch (slow, used by the tests)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


def quantize_transformer_linears(unet: UNetSpatioTemporalConditionModel) -> int:
    """Replace, in place, the Linear layers of the UNet's spatio-temporal transformers (attention
    projections, feed-forward up projections, proj_in/proj_out) by :class:`Fp8Linear`; returns
    how many. Kept in float16: the layers named in ``KEEP_PREFIXES``/``KEEP_SUFFIXES`` (see
    there), the ResNet time-embedding projections and the UNet's own embeddings (B or B*T rows,
    a negligible share of the FLOPs)."""
    targets = []
    for transformer in unet.modules():
        if not isinstance(transformer, TransformerSpatioTemporalModel):
            continue
        for name, module in transformer.named_modules():
            if (isinstance(module, torch.nn.Linear) and not name.startswith(KEEP_PREFIXES)
                    and not name.endswith(KEEP_SUFFIXES)):
                targets.append((transformer, name))
    for transformer, name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, Fp8Linear(getattr(parent, child)))
    return len(targets)
