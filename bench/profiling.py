"""Device-time breakdowns from torch.profiler runs, shared by the GPU benchmarks: the kernels a
profile saw, their class (GEMM, convolution, attention, norm/reduction, pointwise, copies), and
the share of each class."""

from __future__ import annotations

KERNEL_CLASSES = (("memcpy", ("memcpy", "memset")),
                  ("attention", ("sdpa", "flash", "fmha", "attention", "attn")),
                  ("conv", ("fprop", "conv", "implicit_convolve", "winograd")),
                  ("gemm", ("gemm", "nvjet", "cutlass", "matmul")),
                  ("norm/reduction", ("triton_red", "triton_per", "norm", "reduce")),
                  ("pointwise", ("triton_poi", "elementwise", "vectorized", "unrolled", "copy", "cat")))
"""(class, name fragments): the first class with a fragment in a kernel's lower-cased name wins.
Host<->device copies come first: "Memcpy DtoH" would otherwise count as pointwise."""


def kernel_class(name: str) -> str:
    """The class of one device kernel, by name (``other`` when nothing matches)."""
    lowered = name.lower()
    for label, needles in KERNEL_CLASSES:
        if any(n in lowered for n in needles):
            return label
    return "other"


def device_kernels(prof) -> list[tuple[str, float, int]]:
    """(name, self device microseconds, count) of every event of a finished ``torch.profiler``
    run that took device time."""
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if us > 0:
            kernels.append((event.key, float(us), int(event.count)))
    return kernels


def class_totals_us(kernels: list[tuple[str, float, int]]) -> dict[str, float]:
    """Device microseconds per kernel class."""
    totals: dict[str, float] = {}
    for name, us, _ in kernels:
        totals[kernel_class(name)] = totals.get(kernel_class(name), 0.0) + us
    return totals


def top_kernels(kernels: list[tuple[str, float, int]], count: int = 12) -> list[list]:
    """The ``count`` kernels with the most device time: [name (90 chars), ms, calls]."""
    top = sorted(kernels, key=lambda k: -k[1])[:count]
    return [[name[:90], round(us / 1e3, 2), calls] for name, us, calls in top]
