"""Dataset, episode and language-segment records, and the Arrow schemas of their tables."""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from foresight.schemas.base import FORMAT_VERSION, StrictModel

SourceKind = Literal["metaworld", "calvin", "teleop", "lerobot", "synthetic"]

FrameCodecName = Literal["raw", "raw-lz4", "source-jpeg", "video"]
"""How camera frames are kept: ``raw`` uint8 under zstd, ``raw-lz4`` uint8 under blosc-lz4,
``source-jpeg`` the source's JPEG bytes, ``video`` self-contained keyframe-aligned segments."""


class FrameStorage(StrictModel):
    """How one camera's frames are stored (dataset.json ``frame_storage`` and each array's attributes)."""

    codec: FrameCodecName = Field(description="Frame codec of the camera's arrays.")
    pass_through: bool = Field(default=False, description="True when the source's compressed bytes are kept "
                               "unchanged (JPEG frames, video packets); False when frames were (re-)encoded.")
    segment_frames: int | None = Field(default=1, ge=1, description="Frames per zarr chunk: 1 for raw and JPEG, "
                                       "the segment (GOP) length for encoded video; None in dataset.json for "
                                       "pass-through video, whose arrays each take the source's keyframe spacing.")
    zstd_level: int | None = Field(default=None, description="raw: zstd level.")
    lz4_level: int | None = Field(default=None, description="raw-lz4: blosc clevel.")
    crf: int | None = Field(default=None, description="video encode: x264 CRF (lossy, yuv420p); None is "
                            "lossless (libx264rgb, qp 0), exact for uint8 RGB.")
    stream_codec: str | None = Field(default=None, description="video: codec of the stored packets "
                                     "('h264', 'hevc', 'av1').")
    swap_rb: bool = Field(default=False, description="source-jpeg: swap R and B after an OpenCV decode "
                          "(the source JPEG was encoded from RGB); False keeps the recorder's order.")


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
    frame_storage: dict[str, FrameStorage] = Field(default_factory=dict, description="Camera name -> how its "
                                                   "frames are stored (absent in stores written before issue 16: "
                                                   "raw under zstd level 3).")
    source_bytes: int | None = Field(default=None, description="Bytes of the source files of the stored "
                                     "episodes (files shared by several episodes counted once).")
    absent_fields: dict[str, list[str]] = Field(default_factory=dict, description="Optional source field -> "
                                                "ids of the stored episodes whose source lacks it.")


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
    source_bytes: int | None = Field(default=None, description="Bytes of this episode's share of its source "
                                     "files (a file shared by n episodes counts 1/n to each).")


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
