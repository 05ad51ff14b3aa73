"""Dataset, episode and language-segment records, and the Arrow schemas of their tables."""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from schemas.base import FORMAT_VERSION, StrictModel

SourceKind = Literal["metaworld", "calvin", "teleop", "lerobot", "synthetic"]


class FeatureSpec(StrictModel):
    """One low-dimensional per-frame column."""

    dtype: str = Field(description="numpy dtype name of one element, e.g. 'float32'.")
    shape: list[int] = Field(description="Per-frame shape, e.g. [7].")
    names: list[str] | None = Field(default=None, description="Optional per-element names.")


class ColumnStats(StrictModel):
    """Normalisation statistics of one low-dim column, per element."""

    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    q01: list[float]
    q99: list[float]
    count: int = Field(description="Number of frames the statistics were computed over.")


class DatasetInfo(StrictModel):
    """dataset.json: what a dataset holds and where it came from."""

    format_version: int = Field(default=FORMAT_VERSION, description="On-disk format version.")
    name: str = Field(description="Dataset name (folder under datasets/).")
    source_kind: SourceKind = Field(description="Which reader produced it.")
    source: str = Field(description="Source location (folder, or generator description).")
    source_fingerprint: str = Field(description="sha256 over the source's identifying content.")
    fps: float = Field(description="Frame rate of the stored episodes.")
    cameras: dict[str, list[int]] = Field(description="Camera name -> [H, W, 3].")
    features: dict[str, FeatureSpec] = Field(description="Low-dim columns stored per frame.")
    stats: dict[str, ColumnStats] | None = Field(default=None, description="Per-column statistics.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Source-specific facts.")


class EpisodeRecord(StrictModel):
    """episode.json: one stored episode."""

    format_version: int = Field(default=FORMAT_VERSION)
    episode_id: str = Field(description="Unique id within the dataset (no '/' or '.').")
    split: str = Field(default="train", description="train / validation / ...")
    task: str = Field(description="Task name, e.g. 'pick-place' or a CALVIN task id.")
    instructions: list[str] = Field(default_factory=list, description="Natural-language instructions.")
    length: int = Field(description="Number of frames.")
    success: bool | None = Field(default=None, description="Whether the episode succeeded, if known.")
    source_path: str = Field(description="The input file or folder this episode came from.")
    source_checksum: str = Field(description="sha256 identifying the source content of this episode.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Source-specific facts.")


class LanguageSegment(StrictModel):
    """One language-annotated window of an episode (frame indices within the episode, inclusive)."""

    episode_id: str
    start: int
    end: int
    task: str
    text: str


SEGMENTS_SCHEMA = pa.schema(
    [
        ("episode_id", pa.string()),
        ("start", pa.int64()),
        ("end", pa.int64()),
        ("task", pa.string()),
        ("text", pa.string()),
    ]
)

def lowdim_schema(features: dict[str, FeatureSpec]) -> pa.Schema:
    """Arrow schema of lowdim.parquet: frame_index, timestamp, then one flattened list column per feature."""
    fields = [pa.field("frame_index", pa.int64()), pa.field("timestamp", pa.float64())]
    for name, spec in features.items():
        size = 1
        for dim in spec.shape:
            size *= dim
        fields.append(pa.field(name, pa.list_(pa.from_numpy_dtype(_np_dtype(spec.dtype)), size)))
    return pa.schema(fields)


def _np_dtype(name: str):
    import numpy as np

    return np.dtype(name)
