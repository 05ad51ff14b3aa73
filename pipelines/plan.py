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
import pyarrow as pa
from pydantic import Field

from foresight.schemas.base import StrictModel
from foresight.schemas.dataset import EpisodeRecord, LanguageSegment
from foresight.schemas.plan import CLIPS_SCHEMA, ClipRow, ClipRows
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


class RowColumns:
    """Clip rows collected as columns (CLIPS_SCHEMA order): about 150 B a clip while a plan is made,
    where a ClipRow object each took about 1.4 KB (1.4 GB at 10^6 clips in the planning process).
    The first row is validated as a ClipRow; the rest share its types."""

    def __init__(self, dataset: str, params: PlanParams):
        self.dataset, self.params = dataset, params
        self.columns: dict[str, list] = {name: [] for name in CLIPS_SCHEMA.names}

    def add(self, record: EpisodeRecord, clip_id: str, start: int, text: str) -> None:
        fields = {"clip_id": clip_id, "dataset": self.dataset, "episode_id": record.episode_id,
                  "camera": self.params.camera, "start": start, "num_frames": self.params.frames,
                  "stride": self.params.stride, "instruction": text}
        if not self.columns["clip_id"]:
            ClipRow(**fields)
        for name, value in fields.items():
            self.columns[name].append(value)

    def rows(self) -> ClipRows:
        return ClipRows(pa.Table.from_pydict(self.columns, schema=CLIPS_SCHEMA))


def episode_clips(dataset: str, records: list[EpisodeRecord], params: PlanParams) -> ClipRows:
    """Clips starting every ``every`` frames inside each episode (ids ``<episode>-<start>``)."""
    rows = RowColumns(dataset, params)
    for record in records:
        last_start = record.length - 1 - clip_span(params)
        text = instruction_of(record)
        for start in range(0, last_start + 1, params.every):
            rows.add(record, f"{record.episode_id}-{start:06d}", start, text)
    return rows.rows()


def segment_clips(dataset: str, records: list[EpisodeRecord], segments: list[LanguageSegment],
                  params: PlanParams) -> ClipRows:
    """Clips starting every ``every`` frames inside each language segment, carrying its text.

    Segments may overlap (CALVIN's windows do), so ids name the segment: ``<episode>-s<k>-<start>``
    with k the segment's index in the dataset's segment list."""
    by_id = {record.episode_id: record for record in records}
    rows = RowColumns(dataset, params)
    for index, segment in enumerate(segments):
        record = by_id.get(segment.episode_id)
        if record is None:
            continue
        last_start = min(segment.end, record.length - 1 - clip_span(params))
        for start in range(segment.start, last_start + 1, params.every):
            clip_id = f"{record.episode_id}-s{index:05d}-{start:06d}"
            rows.add(record, clip_id, start, segment.text)
    return rows.rows()


def spread(rows: ClipRows, limit: int | None) -> ClipRows:
    """At most ``limit`` rows, evenly spaced over the list (so a small plan still covers many
    episodes and tasks), in their original order."""
    if limit is None or len(rows) <= limit:
        return rows
    picks = np.unique(np.linspace(0, len(rows) - 1, limit).round().astype(int))
    return ClipRows(rows.table.take(pa.array(picks)).combine_chunks())


def make_clips(dataset: str, records: list[EpisodeRecord], segments: list[LanguageSegment],
               params: PlanParams) -> ClipRows:
    """The plan's clip rows (as columns), ordered by episode id then start (segments: by segment order)."""
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
