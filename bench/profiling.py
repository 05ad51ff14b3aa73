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


def _device_events(prof) -> list:
    """The events of a finished ``torch.profiler`` run that ran on a device (kernels, copies, memsets).
    A host operator's own device time is that of the kernels it launched, so counting operators
    beside kernels (a profile with CPU activity too) would count the same device time twice."""
    from torch.autograd import DeviceType

    return [event for event in prof.events() if event.device_type != DeviceType.CPU]


def device_kernels(prof) -> list[tuple[str, float, int]]:
    """(name, device microseconds, count) of every kernel of a finished ``torch.profiler`` run."""
    totals: dict[str, list[float]] = {}
    for event in _device_events(prof):
        entry = totals.setdefault(event.name, [0.0, 0])
        entry[0] += event.time_range.end - event.time_range.start
        entry[1] += 1
    return [(name, us, int(count)) for name, (us, count) in totals.items() if us > 0]


def device_busy_us(prof) -> float:
    """Microseconds in which at least one kernel ran on the device (the union over streams: copies
    overlapping compute count once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in _device_events(prof))
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy


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
