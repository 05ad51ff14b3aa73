"""Float codecs shared by exports (pipelines/export.py) and the target store's coded arrays
(storage/targets.py): "bf16" (bfloat16 bit patterns) and "fp8" (companded e4m3 with E8M0 per-channel
scales).

"bf16": uint16 bit patterns of the bfloat16 rounding (to nearest even) of each value; decoded
exactly to float32. Relative error <= 2**-8 per element (8 significant bits, round to nearest even),
the range of float32.

The "fp8" codec (companded e4m3, power-of-two per-channel scales). For channel ``c`` let
``S_c = 2**(e_c - 127)`` be the smallest power of two >= max|x[..., c]| (its OCP Microscaling E8M0
byte ``e_c`` is stored), ``p = FP8_POWER = 1.5``. Each value is stored as the e4m3fn number ``q``
nearest to ``y = 448 * sign(x) * (|x| / S_c)**p`` and decoded as ``x' = sign(q) * (|q| / 448)**(1/p)
* S_c``: one 256-entry table (the signed ``(|q| / 448)**(1/p)`` of every code) and one multiply per
value, exact in float16 because ``S_c`` is a power of two. Companding spends e4m3's spare dynamic
range on finer relative steps: a relative error ``d`` of ``q`` becomes about ``d / p`` in ``x'``.

fp8 error bound (documented, tested; ``fp8_error_bound`` computes it per element). Where ``y`` is a
normal e4m3 number (``y >= 2**-6``), round to nearest gives ``|q/y - 1| <= 2**-4``, so
``|x'/x - 1| = |(q/y)**(1/p) - 1| <= 1 - (1 - 2**-4)**(1/p)`` (the lower side is the larger one
for ``p >= 1``): 4.21% at p = 1.5 (6.25% for plain e4m3). Below that, in e4m3's subnormal range,
``|q - y| <= 2**-10`` and, since ``t**(1/p)`` is (1/p)-Hoelder with constant 1,
``|x' - x| <= S_c * (2**-10 / 448)**(1/p)`` (1.68e-4 * S_c at p = 1.5; zero decodes to zero). So

    |x - x'| <= (1 - (1 - 2**-4)**(1/p)) * |x| + (2**-10 / 448)**(1/p) * S_c

plus 2**-11 * |x'| for the float16 output (2**-23 for float32) and float16's subnormal half-step.
So a field's relative L2 error stays below ~4.2% unless much of its energy lies below
``1.07e-3 * S_c`` (the subnormal band at p = 1.5). Measured on Gaussian, Laplace, GELU, Student-t(3)
and tiny-model features: 1.7-1.8% (2.65% for plain e4m3); see bench/RESULTS.md, Issue 7, which
also compares exponents: the error falls like 1/p, but a larger p also narrows the dynamic range,
so p = 1.75 and 2 win on light tails and lose on Student-t(2) features or a few 100x outlier
tokens, whose channel bulk falls into the subnormal band (p = 2: 3.5-3.7%); p = 1.5 has the
lowest worst case of the exponents tried (1.9%).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

FP8_MAX = 448.0
"""Largest finite float8 e4m3fn value: a channel's scale S_c (>= its max |x|) maps onto it."""
FP8_POWER = 1.5
"""Companding exponent p of the fp8 codec. Fixed: every decoder of an "fp8" export or coded store array assumes it."""
FP8_REL_HALF_ULP = 2.0 ** -4
"""Largest relative rounding error of a normal e4m3 number (half an ulp of a 3-bit mantissa)."""
FP8_SUBNORMAL_HALF_STEP = 2.0 ** -10
"""Largest absolute rounding error below e4m3's smallest normal number 2**-6 (half of 2**-9)."""
FP8_ROUNDING_SLACK = 2.0 ** -16
"""Relative slack in the bound for the float32 rounding of the companded value before quantising."""
E8M0_BIAS = 127
"""E8M0 scale byte e stands for 2**(e - 127); 255 is NaN (OCP Microscaling formats)."""


def bf16_bits(values: torch.Tensor) -> torch.Tensor:
    """int16 bit patterns of the bfloat16 rounding (to nearest even) of ``values``, on their device."""
    return values.to(torch.float32).to(torch.bfloat16).view(torch.int16)


def encode_bf16(array: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (round to nearest even) as uint16."""
    return bf16_bits(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))).numpy().view(np.uint16)


def decode_bf16(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# fp8: companded e4m3 with E8M0 per-channel scales (see the module docstring) ---------------------
def fp8_channels(array: np.ndarray) -> np.ndarray:
    """View of ``array`` as (rows, channels): channels = last axis, or one channel for 0-d/1-d arrays."""
    return array.reshape(-1, array.shape[-1]) if array.ndim >= 2 else array.reshape(-1, 1)


def check_fp8_power(power: float) -> float:
    """Companding exponents from 1 (plain e4m3) to 4; the error bound needs p >= 1."""
    if not 1.0 <= power <= 4.0:
        raise ValueError(f"fp8 companding exponent {power}: expected 1 <= p <= 4")
    return float(power)


def e8m0_unbiased(amax: torch.Tensor) -> torch.Tensor:
    """Exponents e of the smallest powers of two 2**e >= each float32 ``amax`` (0 where amax is 0), on
    its device; meaningless for NaN/inf, which callers flag."""
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.where(amax > 0, exponent, torch.zeros_like(exponent))


def e8m0_exponents(amax_C: np.ndarray, where: str = "array") -> np.ndarray:
    """E8M0 bytes of the smallest powers of two >= each channel's max |x| (2**0 for all-zero channels)."""
    amax_C = np.asarray(amax_C, dtype=np.float32)
    exponent_C = e8m0_unbiased(torch.from_numpy(amax_C.copy())).numpy()
    if exponent_C.size and exponent_C.max() > E8M0_BIAS:
        raise ValueError(f"{where}: values of magnitude above 2**127 do not fit the fp8 codec's E8M0 scales")
    return (np.maximum(exponent_C, -E8M0_BIAS) + E8M0_BIAS).astype(np.uint8)


def _e8m0_table() -> np.ndarray:
    """float32 value 2**(e - 127) of every E8M0 byte e (exact; 2**-127 is a float32 subnormal), 255 -> NaN."""
    powers = np.ldexp(np.float32(1.0), np.arange(255, dtype=np.int32) - E8M0_BIAS).astype(np.float32)
    table = np.append(powers, np.float32(np.nan))
    table.flags.writeable = False
    return table


E8M0_TABLE = _e8m0_table()
E8M0_NAN = 255
"""The E8M0 byte that stands for NaN: no value has that scale; decoders refuse it."""


def fp8_scales(scale_bits_C: np.ndarray, where: str = "fp8 field") -> np.ndarray:
    """float32 per-channel scales S_c of stored E8M0 bytes; refuses other dtypes and the NaN byte."""
    bits = np.asarray(scale_bits_C)
    if bits.dtype != np.uint8:
        raise ValueError(f"{where}: per-channel scales are {bits.dtype}, expected uint8 E8M0 exponents; float "
                         "scales come from the earlier linear fp8 format (export stage version 1): re-export it")
    if (bits == 255).any():
        raise ValueError(f"{where}: per-channel scale byte 255 (E8M0 NaN); the field is corrupt")
    return np.take(E8M0_TABLE, bits)


@functools.lru_cache(maxsize=16)
def fp8_table(power: float = FP8_POWER, dtype: str = "float16") -> np.ndarray:
    """Decoded value of every e4m3fn code for a unit scale, sign(q) * (|q| / 448)**(1/p), as ``dtype``
    (rounded once from float64; the two NaN codes decode to NaN). Read-only: it is shared."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(torch.float8_e4m3fn).to(torch.float32).to(torch.float64)
    table = (values.abs() / FP8_MAX).pow(1.0 / check_fp8_power(power)).copysign(values)
    table = table.numpy().astype(dtype)
    table.flags.writeable = False
    return table


def encode_fp8(array: np.ndarray, power: float = FP8_POWER, where: str = "array") -> tuple[np.ndarray, np.ndarray]:
    """uint8 e4m3fn codes (same shape) of ``448 * sign(x) * (|x| / S_c)**p`` and the uint8 E8M0 bytes of
    the per-channel (last axis) power-of-two scales ``S_c >= max|x[..., c]|``."""
    values_RC = torch.from_numpy(np.ascontiguousarray(fp8_channels(array), dtype=np.float32))
    codes_1RC, scale_bits_1C = fp8_encode_blocks(values_RC[None], power)
    scale_bits_C = scale_bits_1C[0].numpy()
    if (scale_bits_C == E8M0_NAN).any():
        amax_C = values_RC.abs().amax(dim=0)
        if not bool(torch.isfinite(amax_C).all()):
            raise ValueError(f"{where}: contains NaN or inf, which the fp8 codec cannot store")
        e8m0_exponents(amax_C.numpy(), where)  # raises: magnitudes above 2**127
    return codes_1RC[0].numpy().reshape(np.shape(array)), scale_bits_C


def fp8_encode_blocks(values_BRC: torch.Tensor, power: float = FP8_POWER,
                      compiled: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_fp8` of B independent blocks of R rows, on their device (the target store encodes
    a batch of clips on the GPU with it): uint8 codes (B, R, C) and E8M0 bytes (B, C). A channel
    holding NaN, inf or magnitudes above 2**127 gets the scale byte 255 (E8M0 NaN), which every
    decoder refuses; callers check for it. ``compiled``: a torch.compile backend to run the encoding
    as one compiled graph (:func:`compiled_fp8_encode_core`; use it only where
    :func:`compiled_fp8_is_exact` said so), None for the eager kernels."""
    core = fp8_encode_core if compiled is None else compiled_fp8_encode_core(compiled)
    return core(values_BRC, e8m0_table_on(values_BRC.device), check_fp8_power(power))


@functools.lru_cache(maxsize=4)
def compiled_fp8_encode_core(backend: str = "inductor"):
    """:func:`fp8_encode_core` as one ``torch.compile`` graph with dynamic shapes (every batch size
    and both of a teacher's maps share it). Eager, every tensor operation of the encoding is a pass
    over the values; compiled, they fuse into a few kernels: on an H100 0.0011 instead of 0.0063
    device ms a DINOv2 frame, for a static-shape graph (bench/RESULTS.md, issue 19 round 4)."""
    return torch.compile(fp8_encode_core, backend=backend, dynamic=True, fullgraph=True)


def compiled_fp8_is_exact(shapes: list[tuple[int, int, int]], device: torch.device | str,
                          backend: str = "inductor", seed: int = 0) -> bool:
    """Compile the fp8 encoding for values of these (B, R, C) ``shapes`` on ``device`` (the compile
    happens here, not in the first batch) and tell whether it gives the eager kernels' bytes, codes
    and scales, on random float16 values of each shape. A compiled kernel may round a power or a
    division differently from the eager one on some machine; a writer that must store the eager
    recipe's bytes uses it only when this holds. Runs in inference mode, as the teachers loop
    encodes (``ShardLoop.encode_batch``), so the loop reuses this compile."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():  # as the teachers loop encodes: the compiled graph's guards hold there
        for shape in shapes:
            values_BRC = (torch.randn(shape, generator=generator) * 3).to(device=device, dtype=torch.float16)
            eager = fp8_encode_blocks(values_BRC)
            compiled = fp8_encode_blocks(values_BRC, compiled=backend)
            if not all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True)):
                return False
    return True


def fp8_encode_core(values_BRC: torch.Tensor, e8m0_table: torch.Tensor,
                    power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fp8_encode_blocks` given the E8M0 scale table on the values' device and a checked
    power: tensor operations only, so it can be traced and compiled as one graph."""
    values_BRC = values_BRC.to(torch.float32)
    blocks, rows, channels = values_BRC.shape
    amax_BC = values_BRC.abs().amax(dim=1) if rows else values_BRC.new_zeros(blocks, channels)
    exponent_BC = e8m0_unbiased(amax_BC)
    invalid_BC = ~torch.isfinite(amax_BC) | (exponent_BC > E8M0_BIAS)
    scale_bits_BC = torch.where(invalid_BC, E8M0_NAN, exponent_BC.clamp(min=-E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)
    scale_BC = e8m0_table[scale_bits_BC.long()]
    # |x| / S_c is exact (S_c is a power of two) and <= 1, so the companded value stays <= 448.
    companded_BRC = values_BRC.abs().div_(scale_BC[:, None]).pow_(power).mul_(FP8_MAX)
    companded_BRC = companded_BRC.clamp_(max=FP8_MAX).copysign_(values_BRC)
    return companded_BRC.to(torch.float8_e4m3fn).view(torch.uint8), scale_bits_BC


@functools.lru_cache(maxsize=8)
def e8m0_table_on(device: torch.device) -> torch.Tensor:
    """The 256 E8M0 scales (byte -> power of two, NaN for 255) as float32 on ``device``, made once per device."""
    return torch.from_numpy(E8M0_TABLE.copy()).to(device)


def decode_fp8(codes: np.ndarray, scale_bits_C: np.ndarray, dtype: Any = np.float16, power: float = FP8_POWER,
               where: str = "fp8 field") -> np.ndarray:
    """Values ``sign(q) * (|q| / 448)**(1/p) * S_c`` of e4m3fn codes, as ``dtype`` (float16 or float32)."""
    scale_C = fp8_scales(scale_bits_C, where)
    if np.dtype(dtype) == np.float16 and _fits_float16_normal(scale_C):
        # One table lookup and one multiply by a power of two (exact in float16).
        values_RC = np.take(fp8_table(power, "float16"), fp8_channels(codes))
        out = torch.from_numpy(values_RC).mul_(torch.from_numpy(scale_C.astype(np.float16)))
        return out.numpy().reshape(codes.shape)
    values_RC = np.take(fp8_table(power, "float32"), fp8_channels(codes)) * scale_C
    return values_RC.astype(dtype, copy=False).reshape(codes.shape)


def _fits_float16_normal(scale_C: np.ndarray) -> bool:
    # Table values are <= 1, so scales up to 2**15 keep every product finite in float16.
    return bool(scale_C.size == 0 or (scale_C.min() >= np.finfo(np.float16).tiny and scale_C.max() <= 2.0 ** 15))


def fp8_error_bound(array: np.ndarray, scale_bits_C: np.ndarray, dtype: Any = np.float16,
                    power: float = FP8_POWER) -> np.ndarray:
    """Per-element bound on |x - decode(encode(x))| for output ``dtype`` (see the module docstring)."""
    power = check_fp8_power(power)
    magnitude = np.abs(fp8_channels(np.asarray(array, dtype=np.float64)))
    scale = fp8_scales(scale_bits_C).astype(np.float64)
    rel_q = FP8_REL_HALF_ULP * (1 + FP8_ROUNDING_SLACK)
    relative = max(1 - (1 - rel_q) ** (1 / power), (1 + rel_q) ** (1 / power) - 1)
    # Subnormal band: |q - y| <= 2**-10 and t**(1/p) is (1/p)-Hoelder with constant 1 (p >= 1).
    absolute = (FP8_SUBNORMAL_HALF_STEP * (1 + FP8_ROUNDING_SLACK) / FP8_MAX) ** (1 / power)
    bound = relative * magnitude + absolute * scale
    # Output rounding: the table entry (float16 or float32; the fallback path rounds float32 to
    # float16 once more), then the exact power-of-two product, then float16/float32 subnormals.
    if np.dtype(dtype) == np.float16:
        out_relative, out_absolute = 2.0 ** -11 + 2.0 ** -23, 2.0 ** -25
    else:
        out_relative, out_absolute = 2.0 ** -23, 2.0 ** -150
    bound += out_relative * (magnitude + bound) + out_absolute
    return bound.reshape(np.shape(array))


def relative_l2(approx: np.ndarray, reference: np.ndarray) -> float:
    """||approx - reference|| / ||reference|| in float64 (0 when both are zero)."""
    diff = np.asarray(approx, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    norm = float(np.linalg.norm(np.asarray(reference, dtype=np.float64)))
    return float(np.linalg.norm(diff)) / norm if norm else float(np.linalg.norm(diff))
