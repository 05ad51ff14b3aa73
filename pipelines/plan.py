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
import pyarrow.compute as pc
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


class ClipGroups:
    """A plan's clips before they are rows: for each group of clips (an episode, or a language
    segment) its episode, text, first start and clip count, a few Python values per group. The
    per-clip columns are made at the end as numpy and arrow arrays (``rows``), about 100 B a clip
    with no Python object per clip (Python column lists took ~0.4 KB a clip, 0.4 GB at 10^6)."""

    def __init__(self, dataset: str, params: PlanParams):
        self.dataset, self.params = dataset, params
        self.episode_ids: list[str] = []
        self.texts: list[str] = []
        self.first_starts: list[int] = []
        self.counts: list[int] = []
        self.segment_indices: list[int] = []

    def add(self, record: EpisodeRecord, first_start: int, last_start: int, text: str,
            segment_index: int | None = None) -> None:
        """Clips of ``record`` starting every ``every`` frames from ``first_start`` to ``last_start``."""
        self.episode_ids.append(record.episode_id)
        self.texts.append(text)
        self.first_starts.append(first_start)
        self.counts.append(len(range(first_start, last_start + 1, self.params.every)))
        if segment_index is not None:
            self.segment_indices.append(segment_index)

    def rows(self, limit: int | None) -> ClipRows:
        """The clip rows in group order, at most ``limit`` of them spread evenly (see ``spread``)."""
        counts = np.asarray(self.counts, dtype=np.int64)
        group_C = np.repeat(np.arange(len(counts)), counts)
        offsets = np.cumsum(counts) - counts
        starts_C = (np.asarray(self.first_starts, dtype=np.int64)[group_C]
                    + self.params.every * (np.arange(len(group_C)) - offsets[group_C]))
        if limit is not None and len(group_C) > limit:
            picks = spread_picks(len(group_C), limit)
            group_C, starts_C = group_C[picks], starts_C[picks]
        episode_C = pa.array(self.episode_ids, pa.string()).take(group_C)
        columns = {"clip_id": self._clip_ids(episode_C, group_C, starts_C), "episode_id": episode_C,
                   "dataset": pa.repeat(self.dataset, len(group_C)),
                   "camera": pa.repeat(self.params.camera, len(group_C)), "start": pa.array(starts_C),
                   "num_frames": pa.repeat(self.params.frames, len(group_C)).cast(pa.int64()),
                   "stride": pa.repeat(self.params.stride, len(group_C)).cast(pa.int64()),
                   "instruction": pa.array(self.texts, pa.string()).take(group_C)}
        table = pa.table([columns[name] for name in CLIPS_SCHEMA.names], schema=CLIPS_SCHEMA)
        if table.num_rows:
            ClipRow(**table.slice(0, 1).to_pylist()[0])  # the types of every row: one check suffices
        return ClipRows(table)

    def _clip_ids(self, episode_C: pa.Array, group_C: np.ndarray, starts_C: np.ndarray) -> pa.Array:
        """``<episode>-<start:06d>``, or ``<episode>-s<segment:05d>-<start:06d>`` for segment clips."""
        parts = [episode_C]
        if self.segment_indices:
            segment_C = np.asarray(self.segment_indices, dtype=np.int64)[group_C]
            parts.append(pc.binary_join_element_wise("s", zero_padded(segment_C, 5), ""))
        return pc.binary_join_element_wise(*parts, zero_padded(starts_C, 6), "-")


def zero_padded(values: np.ndarray, width: int) -> pa.Array:
    """Decimal strings of ``values`` as Python's ``f"{value:0{width}d}"`` writes them (a minus sign
    counts towards the width)."""
    digits = pc.cast(pa.array(np.abs(values)), pa.string())
    padded = pc.utf8_lpad(digits, width, "0")
    negative = values < 0
    if not negative.any():
        return padded
    signed = pc.binary_join_element_wise("-", pc.utf8_lpad(digits, width - 1, "0"), "")
    return pc.if_else(pa.array(negative), signed, padded)


def episode_clips(dataset: str, records: list[EpisodeRecord], params: PlanParams) -> ClipGroups:
    """Clips starting every ``every`` frames inside each episode (ids ``<episode>-<start>``)."""
    groups = ClipGroups(dataset, params)
    for record in records:
        groups.add(record, 0, record.length - 1 - clip_span(params), instruction_of(record))
    return groups


def segment_clips(dataset: str, records: list[EpisodeRecord], segments: list[LanguageSegment],
                  params: PlanParams) -> ClipGroups:
    """Clips starting every ``every`` frames inside each language segment, carrying its text.

    Segments may overlap (CALVIN's windows do), so ids name the segment: ``<episode>-s<k>-<start>``
    with k the segment's index in the dataset's segment list."""
    by_id = {record.episode_id: record for record in records}
    groups = ClipGroups(dataset, params)
    for index, segment in enumerate(segments):
        record = by_id.get(segment.episode_id)
        if record is not None:
            last_start = min(segment.end, record.length - 1 - clip_span(params))
            groups.add(record, segment.start, last_start, segment.text, segment_index=index)
    return groups


def spread_picks(count: int, limit: int) -> np.ndarray:
    """At most ``limit`` of ``range(count)``, evenly spaced over it (so a small plan still covers
    many episodes and tasks), in their original order."""
    return np.unique(np.linspace(0, count - 1, limit).round().astype(int))


def make_clips(dataset: str, records: list[EpisodeRecord], segments: list[LanguageSegment],
               params: PlanParams) -> ClipRows:
    """The plan's clip rows (as columns), ordered by episode id then start (segments: by segment
    order), at most ``params.limit`` of them spread evenly over that list."""
    records = sorted((r for r in records if params.split is None or r.split == params.split),
                     key=lambda r: r.episode_id)
    if params.source == "segments":
        if not segments:
            raise ValueError(f"dataset '{dataset}': plan source 'segments' but the dataset has no "
                             "language segments (use --source episodes)")
        groups = segment_clips(dataset, records, segments, params)
    else:
        groups = episode_clips(dataset, records, params)
    return groups.rows(params.limit)


def plan_id(dataset: str, dataset_fingerprint: str, params: PlanParams) -> str:
    """Content address of a plan: ``plan-<12 hex>`` over the dataset content and the parameters."""
    return content_id("plan", {"dataset": dataset, "fingerprint": dataset_fingerprint,
                               "stage_version": PLAN_STAGE_VERSION, "params": params.model_dump(mode="json")})
