"""How a stage's ``device = "auto"`` and ``dtype = "auto"`` resolve: pure rules, no probing.

Every stage config (text, generate, teachers, pi0) defaults both settings to ``auto`` and
resolves them in a validator through :func:`resolve_device` and :func:`resolve_dtype`, so the
CLI, ``pipeline.toml`` and deployments pick the same values on the same host, and the resolved
dtype (never ``auto``) is what enters a version id. Whether CUDA is present is asked by the
caller (``pipelines.devices.cuda_available``): probing the hardware is not a schema's business.
"""

from __future__ import annotations

AUTO = "auto"
"""The default of every stage's ``device`` and ``dtype``."""

DEVICE_HELP = ("Torch device: auto (cuda when this host has CUDA, else cpu), cpu, cuda, cuda:1 ... "
               "(where it runs, not keyed: pick the numerics with dtype).")
"""The description of every stage's ``device`` field (hence of its ``--device`` option)."""

CPU_DTYPE = "fp32"
"""The compute dtype of ``auto`` on a CPU: reduced precision is slow there and rounds differently."""

GPU_DTYPES: dict[str, tuple[str, str]] = {
    "text": ("fp32", "CLIP text runs in fp32 everywhere (one forward per instruction; no dtype setting)"),
    "generate": ("fp16", "the release's SVD dtype; what `foresight generate` picked on CUDA before `auto`"),
    "teachers": ("fp32", "what every teacher version was built with so far; bf16/fp16 are opt-in (keyed)"),
    "pi0": ("fp32", "pi0 targets are distillation labels; bf16/fp16 are opt-in (keyed)"),
}
"""Per stage: (dtype of ``auto`` on CUDA, why)."""

TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Every stage's dtype names -> torch's names. pi0 versions key the torch name (what they were
built with before the stages shared one spelling), so its ids did not change."""


def resolve_device(device: str, cuda_available: bool) -> str:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; any other device as given."""
    if device != AUTO:
        return device
    return "cuda" if cuda_available else "cpu"


def resolve_dtype(stage: str, dtype: str, device: str) -> str:
    """``auto`` -> the stage's GPU dtype on a CUDA device, fp32 elsewhere; any other dtype as given."""
    if stage not in GPU_DTYPES:
        raise ValueError(f"dtype auto: unknown stage {stage!r} (known: {', '.join(GPU_DTYPES)})")
    if dtype != AUTO:
        return dtype
    if device.startswith("cuda"):
        return GPU_DTYPES[stage][0]
    return CPU_DTYPE
