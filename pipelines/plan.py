"""Clip plans: which observed frames (and which frames after them) become clips.

A clip is ``num_frames`` frames of one camera, ``stride`` frames apart, from ``start`` (the
observed, conditioning frame). Starts are chosen every ``every`` frames either inside the
language segments of a dataset (CALVIN: a clip's instruction is its segment's text) or inside
whole episodes (MetaWorld, teleop: the episode's first instruction, else its task). A clip must
fit in its episode. Pure compute: records in, rows out; the caller reads and writes the stores.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from foresight.schemas.base import StrictModel
from foresight.schemas.dataset import EpisodeRecord, LanguageSegment
from foresight.schemas.plan import ClipRow
from foresight.schemas.target import content_id

PLAN_STAGE_VERSION = 1
"""Bumped by hand when the clip selection algorithm changes (it is part of the plan id)."""


class PlanParams(StrictModel):
    """Every parameter that changes a plan's clip list (all enter the plan id)."""

    source: Literal["segments", "episodes"] = Field(
        description="Where clip starts are drawn from: language segments (CALVIN) or whole episodes.")
    camera: str = Field(description="Camera whose frames the clips use.")
    frames: int = Field(default=16, ge=1, description="Frames per clip (T).")
    stride: int = Field(default=2, ge=1, description="Frames between consecutive clip frames.")
    every: int = Field(default=8, ge=1, description="Frames between consecutive clip starts.")
    limit: int | None = Field(default=None, ge=1, description="Keep at most N clips, spread evenly over the list.")
    split: str | None = Field(default=None, description="Only episodes of this split (train, validation, ...).")


def clip_span(params: PlanParams) -> int:
    """Frames from a clip's first to its last frame."""
    return (params.frames - 1) * params.stride


def instruction_of(record: EpisodeRecord) -> str:
    """An episode's instruction: its first natural-language instruction, else its task name."""
    return record.instructions[0] if record.instructions else record.task.replace("-", " ").replace("_", " ")


def _row(dataset: str, record: EpisodeRecord, params: PlanParams, clip_id: str, start: int, text: str) -> ClipRow:
    return ClipRow(clip_id=clip_id, dataset=dataset, episode_id=record.episode_id, camera=params.camera,
                   start=start, num_frames=params.frames, stride=params.stride, instruction=text)


def episode_clips(dataset: str, records: list[EpisodeRecord], params: PlanParams) -> list[ClipRow]:
    """Clips starting every ``every`` frames inside each episode (ids ``<episode>-<start>``)."""
    rows = []
    for record in records:
        last_start = record.length - 1 - clip_span(params)
        for start in range(0, last_start + 1, params.every):
            rows.append(_row(dataset, record, params, f"{record.episode_id}-{start:06d}", start,
                             instruction_of(record)))
    return rows


def segment_clips(dataset: str, records: list[EpisodeRecord], segments: list[LanguageSegment],
                  params: PlanParams) -> list[ClipRow]:
    """Clips starting every ``every`` frames inside each language segment, carrying its text.

    Segments may overlap (CALVIN's windows do), so ids name the segment: ``<episode>-s<k>-<start>``
    with k the segment's index in the dataset's segment list."""
    by_id = {record.episode_id: record for record in records}
    rows = []
    for index, segment in enumerate(segments):
        record = by_id.get(segment.episode_id)
        if record is None:
            continue
        last_start = min(segment.end, record.length - 1 - clip_span(params))
        for start in range(segment.start, last_start + 1, params.every):
            clip_id = f"{record.episode_id}-s{index:05d}-{start:06d}"
            rows.append(_row(dataset, record, params, clip_id, start, segment.text))
    return rows


def spread(rows: list[ClipRow], limit: int | None) -> list[ClipRow]:
    """At most ``limit`` rows, evenly spaced over the list (so a small plan still covers many
    episodes and tasks), in their original order."""
    if limit is None or len(rows) <= limit:
        return rows
    picks = np.unique(np.linspace(0, len(rows) - 1, limit).round().astype(int))
    return [rows[i] for i in picks]


def make_clips(dataset: str, records: list[EpisodeRecord], segments: list[LanguageSegment],
               params: PlanParams) -> list[ClipRow]:
    """The plan's clip rows, ordered by episode id then start (segments: by segment order)."""
    records = sorted((r for r in records if params.split is None or r.split == params.split),
                     key=lambda r: r.episode_id)
    if params.source == "segments":
        if not segments:
            raise ValueError(f"dataset '{dataset}': plan source 'segments' but the dataset has no "
                             "language segments (use --source episodes)")
        rows = segment_clips(dataset, records, segments, params)
    else:
        rows = episode_clips(dataset, records, params)
    return spread(rows, params.limit)


def plan_id(dataset: str, dataset_fingerprint: str, params: PlanParams) -> str:
    """Content address of a plan: ``plan-<12 hex>`` over the dataset content and the parameters."""
    return content_id("plan", {"dataset": dataset, "fingerprint": dataset_fingerprint,
                               "stage_version": PLAN_STAGE_VERSION, "params": params.model_dump(mode="json")})
