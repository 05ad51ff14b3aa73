"""Clip plans: which frames of which episodes become training clips."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from schemas.base import FORMAT_VERSION, StrictModel


class ClipRow(StrictModel):
    """One clip: ``num_frames`` frames of one camera, ``stride`` apart, from ``start``."""

    clip_id: str = Field(description="Unique id within the plan (no '.' so it is a valid webdataset key).")
    dataset: str
    episode_id: str
    camera: str
    start: int = Field(description="Frame index of the observed (conditioning) frame.")
    num_frames: int
    stride: int
    instruction: str


CLIPS_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("dataset", pa.string()),
        ("episode_id", pa.string()),
        ("camera", pa.string()),
        ("start", pa.int64()),
        ("num_frames", pa.int64()),
        ("stride", pa.int64()),
        ("instruction", pa.string()),
    ]
)


class PlanInfo(StrictModel):
    """plan.json: how a plan was made. ``plan_id`` is content addressed over the rest."""

    format_version: int = Field(default=FORMAT_VERSION)
    plan_id: str
    dataset: str
    dataset_fingerprint: str
    params: dict[str, Any] = Field(description="Every parameter that changed the clip list.")
    num_clips: int
    clips_sha256: str = Field(default="", description="sha256 of clips.parquet.")
    created: str = Field(default="", description="ISO timestamp.")
