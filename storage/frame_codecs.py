"""Frame codecs of the episode store: zarr v3 codecs registered when the package is imported.

A camera array is always (T, H, W, 3) uint8 to its readers; what its chunks hold depends on the
codec recorded in the array metadata (and in dataset.json, ``frame_storage``):

- ``raw``: the uint8 frames under zstd (``raw-lz4``: under blosc-lz4, for speed).
- ``source-jpeg`` (zarr codec ``foresight.source_jpeg``): one JPEG per (1, H, W, 3) chunk, the
  source's bytes unchanged, decoded with OpenCV on read.
- ``video`` (zarr codec ``foresight.video_segment``): one self-contained, keyframe-aligned segment of
  ``segment_frames`` frames per chunk: the segment's compressed packets, each prefixed with its
  uint32 length, decoded with PyAV on read. Segments come from the source's own stream (pass
  through, no re-encode) or from encoding raw frames (libx264rgb qp 0 lossless, or libx264 CRF).

Arrays are sharded along T like every frame array, so a read of frame ``t`` or of a 16-frame clip
fetches and decodes only the chunks (frames, segments) it covers. Pass-through writers hand the
store finished chunk payloads; ``shard_bytes`` lays them out in zarr's sharding format.
"""

from __future__ import annotations

import base64
import struct
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np
import zarr
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import parse_named_configuration
from zarr.registry import register_codec

from foresight.schemas.dataset import FrameStorage

# PyAV and OpenCV are imported where they are used: a store of raw frames, and every stage that
# only reads one (the GPU stages among them), needs neither.

if TYPE_CHECKING:
    import av
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

SOURCE_JPEG = "foresight.source_jpeg"
VIDEO_SEGMENT = "foresight.video_segment"
EMPTY_CHUNK = 2**64 - 1
"""Offset and length that mark an absent inner chunk in a zarr shard index."""
LOSSLESS_ENCODER = "libx264rgb"
"""qp 0 in RGB: exact for uint8 frames, and every segment carries its own SPS/PPS (no extradata)."""
LOSSY_ENCODER = "libx264"
_PACKET_LENGTH = struct.Struct("<I")
MAX_DECODERS = 8
"""Decoders kept per thread (one per stream configuration)."""


class FrameDecodeError(ValueError):
    """A stored chunk that does not decode to its frames (a corrupt JPEG or video segment)."""


# JPEG --------------------------------------------------------------------------------------------
def decode_jpeg(data: bytes | np.ndarray, swap_rb: bool = False) -> np.ndarray | None:
    """(H, W, 3) uint8 from JPEG bytes with OpenCV (None when undecodable)."""
    import cv2
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is not None and swap_rb:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def jpeg_size(data: bytes | np.ndarray) -> tuple[int, int, int]:
    """(height, width, components) from a JPEG's frame header, without decoding its pixels.

    Raises ``ValueError`` for bytes that are not a complete JPEG (no SOI, no frame header, no EOI).
    """
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if len(buf) < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        raise ValueError("no JPEG start-of-image marker")
    if buf[-2] != 0xFF or buf[-1] != 0xD9:
        raise ValueError("no JPEG end-of-image marker (truncated)")
    pos = 2
    while pos + 4 <= len(buf):
        if buf[pos] != 0xFF:
            raise ValueError(f"bad JPEG marker at byte {pos}")
        marker = int(buf[pos + 1])
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        length = (int(buf[pos + 2]) << 8) | int(buf[pos + 3])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 10 > len(buf):
                break
            height = (int(buf[pos + 5]) << 8) | int(buf[pos + 6])
            width = (int(buf[pos + 7]) << 8) | int(buf[pos + 8])
            return height, width, int(buf[pos + 9])
        if marker == 0xDA or length < 2:
            break
        pos += 2 + length
    raise ValueError("no JPEG frame header before the image data")


@dataclass(frozen=True)
class SourceJpegCodec(ArrayBytesCodec):
    """(1, H, W, 3) uint8 chunk <-> one JPEG image; source bytes are written as they came."""

    is_fixed_size = False
    swap_rb: bool = False
    quality: int = 95
    """JPEG quality when zarr itself encodes frames (pass-through writers never encode)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        _, config = parse_named_configuration(data, SOURCE_JPEG, require_configuration=False)
        return cls(**(config or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": SOURCE_JPEG, "configuration": {"swap_rb": self.swap_rb, "quality": self.quality}}

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        image = decode_jpeg(chunk_bytes.as_numpy_array(), self.swap_rb)
        shape = tuple(chunk_spec.shape[1:])
        if image is None or image.shape != shape:
            found = "undecodable" if image is None else f"decoded {image.shape}"
            raise FrameDecodeError(f"corrupt JPEG chunk ({found}, expected {shape})")
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(image.reshape(chunk_spec.shape))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        import cv2

        image = np.ascontiguousarray(chunk_array.as_numpy_array().reshape(chunk_spec.shape[1:]))
        if self.swap_rb:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        ok, encoded = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), self.quality])
        assert ok, "OpenCV failed to encode a uint8 frame"
        return chunk_spec.prototype.buffer.from_bytes(encoded.tobytes())


# Video segments ----------------------------------------------------------------------------------
def pack_packets(packets: list[bytes]) -> bytes:
    """One segment's chunk payload: each packet prefixed with its uint32 little-endian length."""
    return b"".join(_PACKET_LENGTH.pack(len(p)) + p for p in packets)


def unpack_packets(payload: bytes | memoryview) -> list[bytes]:
    """The packets of a chunk payload written by ``pack_packets``."""
    view, packets, pos = memoryview(payload), [], 0
    while pos < len(view):
        if pos + 4 > len(view):
            raise FrameDecodeError("truncated video segment (packet length cut off)")
        (size,) = _PACKET_LENGTH.unpack_from(view, pos)
        if pos + 4 + size > len(view):
            raise FrameDecodeError(f"truncated video segment (packet of {size} bytes cut off)")
        packets.append(bytes(view[pos + 4:pos + 4 + size]))
        pos += 4 + size
    return packets


def decoder_name(stream_codec: str) -> str:
    """The PyAV decoder for a stream codec (dav1d for AV1: the fastest, and in PyAV's wheels)."""
    import av
    if stream_codec == "av1":
        try:
            av.codec.Codec("libdav1d", "r")
            return "libdav1d"
        except (av.error.FFmpegError, ValueError):
            return "av1"
    return stream_codec


_decoders = threading.local()


def frame_rgb(frame: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded frame, through this thread's reused reformatter.

    Equal to ``frame.to_ndarray(format="rgb24")``, which builds a new scaler for every frame
    (most of the cost of small frames).
    """
    from av.video.reformatter import VideoReformatter
    reformatter = getattr(_decoders, "reformatter", None)
    if reformatter is None:
        reformatter = _decoders.reformatter = VideoReformatter()
    return reformatter.reformat(frame, format="rgb24").to_ndarray()


def _decoder(stream_codec: str, extradata: bytes | None) -> av.CodecContext:
    """A decoder for this thread, reused across segments (flushed between them)."""
    import av
    cache = getattr(_decoders, "cache", None)
    if cache is None:
        cache = _decoders.cache = {}
    key = (stream_codec, extradata)
    if key not in cache:
        if len(cache) >= MAX_DECODERS:
            cache.clear()  # streams of many configurations: keep memory bounded
        context = av.CodecContext.create(decoder_name(stream_codec), "r")
        if extradata:
            context.extradata = extradata
        context.thread_type = "NONE"  # one segment is a few frames; parallelism comes from the readers
        context.options = {"err_detect": "explode"}  # fail on damaged data instead of concealing it
        cache[key] = context
    return cache[key]


def decode_segment(packets: list[bytes], stream_codec: str, extradata: bytes | None,
                   to_rgb: bool = True) -> list[Any]:
    """Decode one self-contained segment: its frames in presentation order.

    ``to_rgb`` gives (H, W, 3) uint8 RGB arrays; False gives the decoded ``av.VideoFrame`` objects
    (cheaper: enough to check that a segment decodes). Raises ``FrameDecodeError`` on bad data.
    """
    import av
    context = _decoder(stream_codec, extradata)
    frames: list[Any] = []
    try:
        for data in packets:
            frames += context.decode(av.Packet(data))
        frames += context.decode(None)
    except (av.error.FFmpegError, ValueError) as err:
        raise FrameDecodeError(f"corrupt video segment ({err})") from None
    finally:
        context.flush_buffers()
    if to_rgb:
        return [frame_rgb(frame) for frame in frames]
    return frames


def encode_segment(frames_THWC: np.ndarray, crf: int | None, fps: float = 30.0) -> list[bytes]:
    """Encode frames as one closed GOP: lossless libx264rgb (crf None) or libx264 yuv420p at ``crf``."""
    import av
    name = LOSSLESS_ENCODER if crf is None else LOSSY_ENCODER
    context = av.CodecContext.create(name, "w")
    context.height, context.width = frames_THWC.shape[1:3]
    context.pix_fmt = "rgb24" if crf is None else "yuv420p"
    context.time_base = Fraction(1, max(1, round(fps)))
    quality = {"qp": "0"} if crf is None else {"crf": str(crf)}
    context.options = {**quality, "preset": "veryfast", "g": str(len(frames_THWC)), "bf": "0", "threads": "1"}
    packets: list[bytes] = []
    for index, image in enumerate(frames_THWC):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = index
        packets += [bytes(p) for p in context.encode(frame if crf is None else frame.reformat(format="yuv420p"))]
    packets += [bytes(p) for p in context.encode(None)]
    return packets


@dataclass(frozen=True)
class VideoSegmentCodec(ArrayBytesCodec):
    """(N, H, W, 3) uint8 chunk <-> one self-contained segment of N frames' video packets.

    ``extradata`` (base64) is the stream's codec configuration (avcC, hvcC, av1C) for packets passed
    through from a container; encoded segments carry their parameter sets inline and need none.
    ``crf`` is what zarr-side encodes use (None: lossless); a decoded segment shorter than its
    chunk (the last of an episode) is padded with zeros, which the array's shape never exposes.
    """

    is_fixed_size = False
    stream_codec: str = "h264"
    extradata: str = ""
    crf: int | None = None
    fps: float = 30.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        _, config = parse_named_configuration(data, VIDEO_SEGMENT, require_configuration=False)
        return cls(**(config or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": VIDEO_SEGMENT, "configuration": {
            "stream_codec": self.stream_codec, "extradata": self.extradata, "crf": self.crf, "fps": self.fps}}

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        frames = decode_segment(unpack_packets(chunk_bytes.as_numpy_array().tobytes()), self.stream_codec,
                                base64.b64decode(self.extradata) or None)
        shape = tuple(chunk_spec.shape)
        if len(frames) > shape[0] or any(f.shape != shape[1:] for f in frames):
            found = [f.shape for f in frames[:1]]
            raise FrameDecodeError(f"video segment decoded to {len(frames)} frames of {found}, expected "
                                   f"at most {shape[0]} of {shape[1:]}")
        out = np.zeros(shape, dtype=np.uint8)
        if frames:
            out[:len(frames)] = np.stack(frames)
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(out)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        frames = chunk_array.as_numpy_array().reshape(chunk_spec.shape)
        return chunk_spec.prototype.buffer.from_bytes(pack_packets(encode_segment(frames, self.crf, self.fps)))


register_codec(SOURCE_JPEG, SourceJpegCodec)
register_codec(VIDEO_SEGMENT, VideoSegmentCodec)


# Array creation and pass-through shards ---------------------------------------------------------
def serializer_and_compressors(storage: FrameStorage, extradata: bytes | None = None,
                               fps: float = 30.0) -> tuple[Any, Any]:
    """The zarr serializer and compressors of an array stored with ``storage``."""
    if storage.codec == "raw":
        return "auto", zarr.codecs.ZstdCodec(level=3 if storage.zstd_level is None else storage.zstd_level)
    if storage.codec == "raw-lz4":
        level = 5 if storage.lz4_level is None else storage.lz4_level
        return "auto", zarr.codecs.BloscCodec(cname="lz4", clevel=level, shuffle="noshuffle")
    if storage.codec == "source-jpeg":
        return SourceJpegCodec(swap_rb=storage.swap_rb), None
    encoded = base64.b64encode(extradata or b"").decode()
    return VideoSegmentCodec(stream_codec=storage.stream_codec or "h264", extradata=encoded, crf=storage.crf,
                             fps=float(fps)), None


def shard_frames(storage: FrameStorage, frame_shard: int) -> int:
    """Frames per shard: a whole number of chunks, about ``frame_shard`` frames."""
    per = storage.segment_frames
    return per * max(1, frame_shard // per)


def shard_bytes(payloads: list[bytes], chunks_per_shard: int) -> bytes:
    """A zarr v3 shard (index at the end: uint64 offset/length pairs, then crc32c) of chunk payloads.

    Chunks past ``len(payloads)`` (beyond the array's end) are marked absent.
    """
    assert len(payloads) <= chunks_per_shard, "more chunks than a shard holds"
    index = np.full((chunks_per_shard, 2), EMPTY_CHUNK, dtype="<u8")
    offset = 0
    for i, payload in enumerate(payloads):
        index[i] = (offset, len(payload))
        offset += len(payload)
    index_bytes = index.tobytes()
    checksum = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
    return b"".join([*payloads, index_bytes, checksum])


def storage_of(array: zarr.Array) -> FrameStorage:
    """How an episode-store camera array is stored (arrays written before issue 16: raw, zstd 3)."""
    recorded = array.attrs.get("frame_storage")
    if recorded:
        return FrameStorage.model_validate(recorded)
    return FrameStorage(codec="raw", zstd_level=3)

