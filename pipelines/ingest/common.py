"""Pieces shared by the source readers: stream blocks, bad-input errors, checksums, depth packing.

A reader turns one source episode into a stream of blocks: ``FrameBlock`` (a few frames of one
camera) and, last, one ``LowdimBlock`` (all per-frame vectors, which are small). Writers consume
the stream shard by shard, so no reader ever holds a whole episode of images.
"""

from __future__ import annotations

import hashlib
import json
import os
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Literal

import numpy as np
from pydantic import Field

from foresight.schemas.base import StrictModel
from foresight.schemas.dataset import FeatureSpec, FrameCodecName, FrameStorage, LanguageSegment

log = logging.getLogger(__name__)

DEFAULT_SEGMENT_FRAMES = 8
"""Frames per segment (one closed GOP) when decoded frames are encoded as video."""

READ_BLOCK = 64
"""Frames read per block: one episode-store shard, so memory is bounded by one shard per camera."""

HASH_BLOCK = 4 << 20

DEPTH_UINT24_MAX = (1 << 24) - 1


class IngestError(ValueError):
    """Bad source data: one line naming the file, the episode and the field."""

    def __init__(self, file: str | os.PathLike[str], episode: str | None, field: str | None, reason: str):
        self.file, self.episode, self.field, self.reason = str(file), episode, field, reason
        parts = [self.file]
        if episode is not None:
            parts.append(f"episode '{episode}'")
        if field is not None:
            parts.append(f"field '{field}'")
        super().__init__(": ".join([", ".join(parts), reason]))

    def as_item(self) -> dict[str, Any]:
        """The quarantine.jsonl entry for this error."""
        return {"file": self.file, "episode": self.episode, "field": self.field,
                "reason": self.reason, "message": str(self)}


@dataclass
class FrameBlock:
    """Consecutive frames of one camera: (n, H, W, 3) uint8."""

    camera: str
    frames_THWC: np.ndarray


@dataclass
class ChunkBlock:
    """Source-compressed chunks of one camera stored as they came (pass-through).

    One payload per store chunk: a JPEG per frame, or one keyframe-aligned video segment.
    """

    camera: str
    payloads: list[bytes]
    frames: int
    """Frames the payloads hold."""
    frame_shape: tuple[int, int, int]
    extradata: bytes | None = None
    """The video stream's codec configuration (avcC, hvcC, av1C), when its decoder needs one."""
    segment_frames: int = 1
    """Frames per payload (the last payload of an episode may hold fewer)."""
    stream_codec: str | None = None
    """Codec of video payloads ('h264', 'hevc', 'av1')."""


@dataclass
class LowdimBlock:
    """All per-frame vectors of the episode, each (T, ...), plus timestamps in seconds (T,)."""

    columns: dict[str, np.ndarray]
    timestamps_T: np.ndarray
    segments: list[LanguageSegment] = field(default_factory=list)
    """Language segments the source defines inside this episode (episode-relative, inclusive)."""
    absent: list[str] = field(default_factory=list)
    """Optional features this episode's source lacks (no column is stored for them)."""


@dataclass
class SourceEpisode:
    """What a reader knows about one source episode before reading its data."""

    episode_id: str
    split: str
    task: str
    length: int
    source_path: str
    files: list[str] = field(default_factory=list)
    """Every source file whose bytes define this episode (hashed for idempotence)."""
    instructions: list[str] = field(default_factory=list)
    success: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source_bytes: int | None = None
    """This episode's share of its source files' bytes (None: the sum of ``files``' sizes)."""


@dataclass
class SourceLayout:
    """Dataset-level facts a reader found by scanning a source."""

    fps: float
    cameras: dict[str, list[int]]
    features: dict[str, FeatureSpec]
    extra: dict[str, Any] = field(default_factory=dict)
    frame_storage: dict[str, FrameStorage] = field(default_factory=dict)
    """Camera -> how its frames are stored (cameras not named: raw under zstd 3)."""
    shared_files: list[str] = field(default_factory=list)
    """Source files of the dataset as a whole (metadata), counted once in its source bytes."""


SourceCompression = Literal["none", "jpeg", "video"]
"""What a source camera holds: decoded frames, JPEG images, or a video stream."""


class FrameCodecOptions(StrictModel):
    """How camera frames are stored (the ``--frame-codec``, ``--crf`` and ``--zstd-level`` flags)."""

    frame_codec: FrameCodecName | None = Field(default=None, description="raw, raw-lz4, source-jpeg or video; "
                                               "default: the source's own compression (JPEG, video) kept, "
                                               "raw under zstd otherwise.")
    crf: int | None = Field(default=None, ge=0, le=51, description="video encode of decoded frames: x264 CRF "
                            "(lossy, yuv420p); default lossless (libx264rgb qp 0). Ignored for pass-through.")
    zstd_level: int = Field(default=3, ge=1, le=22, description="raw: zstd level.")


def resolve_frame_storage(options: FrameCodecOptions, compression: SourceCompression, where: str,
                          stream_codec: str | None = None) -> FrameStorage:
    """The frame storage of one source camera: pass-through when the source is compressed and no
    other codec was asked for; raw under zstd for decoded sources; an encode for ``video`` on them.

    Raises ``ValueError`` naming ``where`` for a codec the source cannot give (source-jpeg of a
    video or of decoded frames).
    """
    codec = options.frame_codec or {"none": "raw", "jpeg": "source-jpeg", "video": "video"}[compression]
    if codec == "source-jpeg" and compression != "jpeg":
        raise ValueError(f"{where}: --frame-codec source-jpeg needs JPEG source frames, this camera holds "
                         f"{'a video stream' if compression == 'video' else 'decoded frames'}")
    if codec == "raw":
        return FrameStorage(codec="raw", zstd_level=options.zstd_level)
    if codec == "raw-lz4":
        return FrameStorage(codec="raw-lz4", lz4_level=5)
    if codec == "source-jpeg":
        return FrameStorage(codec="source-jpeg", pass_through=True)
    if compression == "video":
        if options.crf is not None:
            log.warning("%s: --crf %d ignored: the source's video packets are kept as they are", where, options.crf)
        return FrameStorage(codec="video", pass_through=True, stream_codec=stream_codec)
    return FrameStorage(codec="video", segment_frames=DEFAULT_SEGMENT_FRAMES, crf=options.crf, stream_codec="h264")


def depth_frame_storage(options: FrameCodecOptions) -> FrameStorage:
    """Packed depth must stay exact: raw-lz4 or lossless video when asked, raw under zstd otherwise."""
    if options.frame_codec == "raw-lz4" or (options.frame_codec == "video" and options.crf is None):
        return resolve_frame_storage(options, "none", "depth")
    return FrameStorage(codec="raw", zstd_level=options.zstd_level)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of one file's bytes, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def source_checksum(files: Iterable[str | os.PathLike[str]], options: dict[str, Any],
                    known: dict[str, str] | None = None) -> str:
    """sha256 over every file's name and content digest (in order) and the ingest options.

    Options are part of the key so that re-ingesting with other cameras rewrites the episode.
    ``known`` maps paths to digests already computed (files shared by several episodes).
    """
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    for path in files:
        file_digest = (known or {}).get(str(path)) or file_sha256(path)
        digest.update(f"\n{Path(path).name}:{file_digest}".encode())
    return digest.hexdigest()


def check_finite(values: np.ndarray, file: str, episode: str, name: str) -> None:
    """Raise IngestError naming the first frame that holds NaN or inf."""
    if values.dtype.kind not in "fc" or values.size == 0:
        return
    finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if not finite.all():
        frame = int(np.flatnonzero(~finite)[0])
        raise IngestError(file, episode, name, f"NaN or inf at frame {frame}")


def pack_depth_uint24(depth_THW: np.ndarray, scale: float) -> np.ndarray:
    """Store depth losslessly at ``scale`` resolution as an RGB image: value = round(depth / scale).

    The 24-bit value is split big-endian over R, G, B so the episode store, which holds uint8
    (T, H, W, 3) cameras, can keep depth beside colour. ``unpack_depth_uint24`` inverts it.
    """
    values = np.rint(np.asarray(depth_THW, dtype=np.float64) / scale)
    if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(initial=0) > DEPTH_UINT24_MAX:
        raise ValueError(f"depth outside the packable range [0, {DEPTH_UINT24_MAX * scale:g}]")
    as_int = values.astype(np.uint32)
    packed = np.empty((*as_int.shape, 3), dtype=np.uint8)
    packed[..., 0] = as_int >> 16
    packed[..., 1] = (as_int >> 8) & 0xFF
    packed[..., 2] = as_int & 0xFF
    return packed


def unpack_depth_uint24(frames_THWC: np.ndarray, scale: float) -> np.ndarray:
    """Depth (T, H, W) float32 from frames written by ``pack_depth_uint24``."""
    frames = np.asarray(frames_THWC, dtype=np.uint32)
    value = (frames[..., 0] << 16) | (frames[..., 1] << 8) | frames[..., 2]
    return (value * scale).astype(np.float32)


def blocks_of(indices: range, size: int = READ_BLOCK) -> Iterator[range]:
    """Split a range of frame indices into consecutive blocks of at most ``size``."""
    for start in range(indices.start, indices.stop, size):
        yield range(start, min(start + size, indices.stop))


_DONE = object()


def prefetch(blocks: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``blocks`` produced by a background thread, at most ``depth`` blocks ahead.

    Reading (zlib, JPEG and video decoding) and the store's compression both release the GIL,
    so decoding the next block overlaps writing the current one; memory stays bounded by
    ``depth`` blocks. An exception in the producer is raised here, in order.
    """
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for block in blocks:
                if stop.is_set():
                    return
                queue.put(block)
            queue.put(_DONE)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put(err)

    worker = threading.Thread(target=produce, name="ingest-prefetch", daemon=True)
    worker.start()
    try:
        while (item := queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                queue.get(timeout=0.1)
            except Empty:
                pass  # drained: a reader blocked on a full queue can now see `stop` and end
        worker.join()
