"""The one hardware probe behind ``device = "auto"`` (the rules are in schemas/devices.py)."""

from __future__ import annotations

from foresight.schemas.devices import resolve_device, resolve_dtype


def cuda_available() -> bool:
    """Whether torch sees a CUDA device in this process (torch is imported on first use)."""
    import torch

    return torch.cuda.is_available()


def auto_device(device: str) -> str:
    """``device`` with ``auto`` resolved for this host."""
    return resolve_device(device, cuda_available() if device == "auto" else False)


def auto_dtype(stage: str, dtype: str, device: str) -> str:
    """``dtype`` with ``auto`` resolved for ``stage`` on ``device`` (already resolved)."""
    return resolve_dtype(stage, dtype, auto_device(device))


def resolve_device_field(cls, device: str) -> str:
    """A pydantic field validator body shared by the stage configs: resolve ``device``'s ``auto``."""
    return auto_device(device)
