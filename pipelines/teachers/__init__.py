"""Teacher registry: name -> (settings model, loader).

A teacher turns uint8 clips (B, T, H, W, 3) into float16 tokens (B, T, h, w, C) and the observed
frame alone into a reference map (B, 1, h, w, C). Names: ``dinov2`` (semantic, S-VAM), ``da3``
(geometric, S-VAM) and ``hf`` (any transformers vision backbone, for teacher ablations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from foresight.pipelines.teachers.base import DTYPES, OUTPUT_DTYPE, Teacher, parse_dtype
from foresight.pipelines.teachers.da3 import DA3Settings, load_da3
from foresight.pipelines.teachers.dinov2 import DinoV2Settings, load_dinov2
from foresight.pipelines.teachers.hf import HFSettings, load_hf
from foresight.schemas.base import StrictModel, validate
from foresight.schemas.model import ModelSpec

__all__ = ["TEACHERS", "Teacher", "TeacherEntry", "DTYPES", "OUTPUT_DTYPE", "load_teacher", "parse_settings",
           "parse_dtype", "teacher_names"]


@dataclass(frozen=True)
class TeacherEntry:
    """One registered teacher family."""

    settings: type[StrictModel]
    load: Callable[..., Teacher]
    description: str


TEACHERS: dict[str, TeacherEntry] = {
    "dinov2": TeacherEntry(DinoV2Settings, load_dinov2, "DINOv2 (default ViT-B/14 with registers), final-LN patch tokens"),
    "da3": TeacherEntry(DA3Settings, load_da3, "Depth Anything 3 any-view backbone (default DA3-LARGE stage 0)"),
    "hf": TeacherEntry(HFSettings, load_hf, "any transformers vision backbone, patch tokens at its own grid"),
}


def teacher_names() -> list[str]:
    return sorted(TEACHERS)


def _entry(name: str) -> TeacherEntry:
    if name not in TEACHERS:
        raise ValueError(f"teacher {name!r}: unknown, expected one of {teacher_names()}")
    return TEACHERS[name]


def parse_settings(name: str, settings: dict[str, Any] | StrictModel | None = None) -> StrictModel:
    """Validated settings of teacher ``name`` (defaults when None); unknown keys are errors."""
    model = _entry(name).settings
    if isinstance(settings, model):
        return settings
    return validate(model, dict(settings or {}), f"teacher {name} settings")


def load_teacher(name: str, spec: str | ModelSpec, settings: dict[str, Any] | StrictModel | None = None,
                 device: str = "cpu", dtype: str | torch.dtype = "fp32") -> Teacher:
    """Load teacher ``name`` with weights ``spec`` onto ``device`` in ``dtype`` ('fp32'|'bf16'|'fp16')."""
    entry = _entry(name)
    parsed_spec = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if parsed_spec.source == "null":
        from foresight.pipelines.null_models import null_teacher

        return null_teacher(name, parse_settings(name, settings), device, torch_dtype)
    return entry.load(parsed_spec, parse_settings(name, settings), device, torch_dtype)
