"""The episode store: datasets of episodes (zarr frames + parquet low-dim), published atomically."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync

from foresight.schemas.base import validate_stored
from foresight.schemas.dataset import (
    SEGMENTS_SCHEMA,
    ColumnStats,
    DatasetInfo,
    EpisodeRecord,
    FeatureSpec,
    FrameStorage,
    LanguageSegment,
    lowdim_schema,
)
from foresight.storage import frame_codecs, layout
from foresight.storage.fs import DiskFullError, Root, free_bytes, open_root, parquet_bytes, read_parquet

log = logging.getLogger(__name__)
ZARR_JSON = "zarr.json"
"""A zarr v3 node's metadata document (group or array)."""
RAW = FrameStorage(codec="raw", zstd_level=3)
"""Frames of a camera given no frame storage: raw uint8 under zstd level 3 (the store's original format)."""


class EpisodeStore:
    """All episodes of one dataset under ``<root>/datasets/<dataset>/``."""

    def __init__(self, root: Root | str | None, dataset: str):
        self.root = open_root(root)
        self.dataset = dataset
        self.dir = layout.dataset_dir(dataset)
        self._arrays: dict[tuple[str, str], zarr.Array] = {}

    # dataset-level metadata -------------------------------------------------------------
    def exists(self) -> bool:
        return self.root.file_exists(self.dir, layout.DATASET_INFO)

    def write_info(self, info: DatasetInfo) -> None:
        """Write dataset.json (atomically)."""
        self.root.write_json_atomic(f"{self.dir}/{layout.DATASET_INFO}", info.model_dump(mode="json"))

    def info(self) -> DatasetInfo:
        """Read dataset.json, checking its format version."""
        where = self.root.url_of(self.dir, layout.DATASET_INFO)
        if not self.root.file_exists(self.dir, layout.DATASET_INFO):
            raise ValueError(f"dataset '{self.dataset}': no {layout.DATASET_INFO} under {self.root.url}")
        return validate_stored(DatasetInfo, self.root.read_json(self.dir, layout.DATASET_INFO), where)

    def write_stats(self, stats: dict[str, ColumnStats]) -> None:
        """Store normalisation statistics with the dataset."""
        info = self.info()
        info.stats = stats
        self.write_info(info)

    # episodes ---------------------------------------------------------------------------
    def episode_ids(self) -> list[str]:
        """Ids of complete episodes, sorted. An episode without its marker does not exist."""
        names = self.root.ls(layout.episodes_dir(self.dataset))
        return [n for n in names if not n.startswith(".") and self._complete(n)]

    def _complete(self, episode_id: str) -> bool:
        return self.root.file_exists(layout.episode_dir(self.dataset, episode_id), layout.COMPLETE_MARKER)

    def record(self, episode_id: str) -> EpisodeRecord:
        """The EpisodeRecord of a complete episode."""
        edir = layout.episode_dir(self.dataset, episode_id)
        if not self._complete(episode_id):
            raise ValueError(f"dataset '{self.dataset}', episode '{episode_id}': not in the store")
        where = self.root.url_of(edir, layout.EPISODE_RECORD)
        return validate_stored(EpisodeRecord, self.root.read_json(edir, layout.EPISODE_RECORD), where)

    def records(self) -> Iterator[EpisodeRecord]:
        for episode_id in self.episode_ids():
            yield self.record(episode_id)

    def has_episode(self, episode_id: str, source_checksum: str) -> bool:
        """True when this episode is stored complete from the same source content."""
        return self._complete(episode_id) and self.record(episode_id).source_checksum == source_checksum

    def frames_array(self, episode_id: str, camera: str) -> zarr.Array:
        """The (T, H, W, 3) uint8 zarr array of one camera."""
        key = (episode_id, camera)
        if key not in self._arrays:
            rel = f"{layout.episode_dir(self.dataset, episode_id)}/{layout.FRAMES}"
            group = zarr.open_group(self.root.zarr_store(rel, read_only=True), mode="r", zarr_format=3)
            if camera not in group:
                raise ValueError(f"dataset '{self.dataset}', episode '{episode_id}': no camera '{camera}' "
                                 f"(has {sorted(group.array_keys())})")
            self._arrays[key] = group[camera]
        return self._arrays[key]

    def frame_storage(self, episode_id: str, camera: str) -> FrameStorage:
        """How one camera's frames of one episode are stored (codec, segment length, ...)."""
        return frame_codecs.storage_of(self.frames_array(episode_id, camera))

    def read_frames(self, episode_id: str, camera: str, indices: Any = slice(None)) -> np.ndarray:
        """(n, H, W, 3) uint8 frames of one camera at ``indices`` (slice, list or array of frame indices).

        Whatever the codec, only the chunks holding the requested frames are read and decoded.
        """
        array = self.frames_array(episode_id, camera)
        try:
            if isinstance(indices, slice):
                return array[indices]
            return array.get_orthogonal_selection((np.asarray(indices, dtype=np.int64),))
        except frame_codecs.FrameDecodeError as err:
            raise ValueError(f"dataset '{self.dataset}', episode '{episode_id}', camera '{camera}': {err}") from None

    def read_frame_of_each(self, picks: list[tuple[str, str, int]]) -> list[np.ndarray]:
        """Frame (H, W, 3) at each (episode, camera, index) of ``picks``, in order, with one
        selection per (episode, camera): on an object store one shard index and concurrent chunk
        reads per episode, not a shard index and a chunk per frame (the observed frame of each clip
        of a shard, which generate and the teachers read)."""
        groups: dict[tuple[str, str], list[int]] = {}
        for position, (episode_id, camera, _) in enumerate(picks):
            groups.setdefault((episode_id, camera), []).append(position)
        out: list[np.ndarray | None] = [None] * len(picks)
        for (episode_id, camera), positions in groups.items():
            frames = self.read_frames(episode_id, camera, [picks[p][2] for p in positions])
            for position, frame in zip(positions, frames, strict=True):
                out[position] = frame
        return out

    def read_lowdim(self, episode_id: str, columns: list[str] | None = None) -> pa.Table:
        """The per-frame low-dim table (frame_index, timestamp, features...)."""
        return read_parquet(self.root, f"{layout.episode_dir(self.dataset, episode_id)}/{layout.LOWDIM}", columns)

    def read_column(self, episode_id: str, column: str) -> np.ndarray:
        """One low-dim column as a (T, ...) numpy array in its stored dtype and shape."""
        if column in self.record(episode_id).extra.get("absent_fields", []):
            raise ValueError(f"dataset '{self.dataset}', episode '{episode_id}', field '{column}': absent in "
                             "this episode's source (an optional field)")
        table = self.read_lowdim(episode_id, [column])
        values = table.column(column).combine_chunks()
        flat = values.values.to_numpy(zero_copy_only=False) if pa.types.is_list(values.type) or \
            pa.types.is_fixed_size_list(values.type) else values.to_numpy(zero_copy_only=False)
        spec = self.info().features.get(column)
        shape = spec.shape if spec else []
        return flat.reshape((len(table), *shape))

    def writer(self, record: EpisodeRecord, features: dict[str, FeatureSpec],
               frame_storage: dict[str, FrameStorage] | None = None, fps: float = 30.0,
               publisher: "EpisodePublisher | None" = None) -> "EpisodeWriter":
        """A writer that stages the episode and publishes it on successful exit of its ``with``.

        ``frame_storage`` gives each camera's codec (cameras not named: raw under zstd 3); ``fps``
        is the frame rate recorded in encoded video segments. With a ``publisher`` the staged
        episode is synced and published on its thread (the writer's exit returns once staged).
        """
        return EpisodeWriter(self, record, features, frame_storage or {}, fps, publisher)

    # segments, quarantine, fingerprint --------------------------------------------------
    def write_segments(self, segments: list[LanguageSegment], embeddings: np.ndarray | None = None) -> None:
        """Replace segments.parquet; optional per-segment embeddings are stored as a list column."""
        columns = {name: [getattr(s, name) for s in segments] for name in SEGMENTS_SCHEMA.names}
        table = pa.Table.from_pydict(columns, schema=SEGMENTS_SCHEMA)
        if embeddings is not None:
            flat = np.asarray(embeddings, dtype=np.float32).reshape(len(segments), -1)
            table = table.append_column("embedding", pa.array(list(flat), type=pa.list_(pa.float32())))
        self.root.write_bytes_atomic(f"{self.dir}/{layout.SEGMENTS}", parquet_bytes(table))

    def segments(self) -> list[LanguageSegment]:
        if not self.root.file_exists(self.dir, layout.SEGMENTS):
            return []
        table = read_parquet(self.root, f"{self.dir}/{layout.SEGMENTS}", list(SEGMENTS_SCHEMA.names))
        return [LanguageSegment(**row) for row in table.to_pylist()]

    def segment_embeddings(self) -> np.ndarray | None:
        """The (N, D) float32 embeddings aligned with ``segments()``, or None when none are stored."""
        if not self.root.file_exists(self.dir, layout.SEGMENTS):
            return None
        table = read_parquet(self.root, f"{self.dir}/{layout.SEGMENTS}")
        if "embedding" not in table.column_names or len(table) == 0:
            return None
        column = table.column("embedding").combine_chunks()
        return column.flatten().to_numpy().astype(np.float32).reshape(len(table), -1)

    def quarantine(self, item: dict[str, Any]) -> None:
        """Record an input that could not be ingested (one JSON line, with the reason)."""
        entry = {"time": datetime.now(timezone.utc).isoformat(), **item}
        rel = f"{self.dir}/{layout.QUARANTINE}"
        line = json.dumps(entry, sort_keys=True, default=str) + "\n"
        if self.root.is_local:
            self.root.makedirs(self.dir)
            with open(self.root.path(rel), "a", encoding="utf-8") as handle:
                handle.write(line)
            return
        old = self.root.read_bytes(rel) if self.root.file_exists(rel) else b""
        self.root.write_bytes_atomic(rel, old + line.encode())

    def quarantined(self) -> list[dict[str, Any]]:
        rel = f"{self.dir}/{layout.QUARANTINE}"
        if not self.root.file_exists(rel):
            return []
        return [json.loads(line) for line in self.root.read_bytes(rel).decode().splitlines() if line.strip()]

    def fingerprint(self) -> str:
        """sha256 over the source fingerprint and every complete episode's id, checksum and length."""
        digest = hashlib.sha256(self.info().source_fingerprint.encode())
        for record in self.records():
            digest.update(f"|{record.episode_id}:{record.source_checksum}:{record.length}".encode())
        return digest.hexdigest()

    def total_bytes(self) -> int:
        return self.root.du(self.dir)


class EpisodeWriter:
    """Streams one episode into a staging folder; publishes it atomically on success.

    Frames arrive in blocks of any size per camera and are written one full zarr shard at a
    time, so memory stays bounded by one shard per camera whatever the episode length. Raw
    frames go through zarr's codecs (``raw``, ``raw-lz4``, or a ``video`` encode); pass-through
    chunks (source JPEG frames, source video segments) are laid into shards as they came.
    """

    def __init__(self, store: EpisodeStore, record: EpisodeRecord, features: dict[str, FeatureSpec],
                 frame_storage: dict[str, FrameStorage], fps: float, publisher: "EpisodePublisher | None" = None):
        self.store, self.record, self.features = store, record, features
        self.frame_storage, self.fps, self.publisher = frame_storage, fps, publisher
        self.root = store.root
        self.final = layout.episode_dir(store.dataset, record.episode_id)
        self.staging = f"{layout.episodes_dir(store.dataset)}/{layout.STAGING}/{record.episode_id}-{uuid.uuid4().hex[:8]}"
        self._group: zarr.Group | None = None
        """The frames group on the root, for cameras whose frames zarr encodes (raw, video encode)."""
        self._arrays: dict[str, zarr.Array] = {}
        self._pass_through: dict[str, ArrayV3Metadata] = {}
        """Pass-through cameras' array metadata: the writer stores its document and the shards
        itself (no zarr store round trips per file)."""
        self._group_document_stored = False
        self._buffers: dict[str, list[np.ndarray]] = {}
        self._chunks: dict[str, list[bytes]] = {}
        self._shards: dict[str, int] = {}
        self._array_storage: dict[str, FrameStorage] = {}
        self._written: dict[str, int] = {}
        self._lowdim: pa.Table | None = None

    def __enter__(self) -> "EpisodeWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.root.rm(self.staging)

    def _where(self, field: str) -> str:
        return f"{self.record.source_path}: episode '{self.record.episode_id}', field '{field}'"

    def _storage(self, camera: str) -> FrameStorage:
        """The camera's storage: as recorded on its array once created, else as configured."""
        return self._array_storage.get(camera) or self.frame_storage.get(camera, RAW)

    def _shard_frames(self, camera: str) -> int:
        return frame_codecs.shard_frames(self._storage(camera), layout.FRAME_SHARD)

    def append_frames(self, camera: str, frames_THWC: np.ndarray) -> None:
        """Append a block of (n, H, W, 3) uint8 frames of one camera (encoded by its codec)."""
        frames_THWC = np.asarray(frames_THWC)
        if frames_THWC.dtype != np.uint8 or frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3:
            raise ValueError(f"{self._where(camera)}: expected uint8 frames (T, H, W, 3), got "
                             f"{frames_THWC.dtype} {tuple(frames_THWC.shape)}")
        if self._storage(camera).pass_through:
            raise ValueError(f"{self._where(camera)}: camera stores the source's {self._storage(camera).codec} "
                             "bytes; frames must come as chunks (append_chunks)")
        buffer = self._buffers.setdefault(camera, [])
        if buffer and buffer[0].shape[1:] != frames_THWC.shape[1:]:
            raise ValueError(f"{self._where(camera)}: frame size changed from {buffer[0].shape[1:]} "
                             f"to {frames_THWC.shape[1:]}")
        buffer.append(frames_THWC)
        shard = self._shard_frames(camera)
        while sum(len(b) for b in self._buffers[camera]) >= shard:
            self._flush(camera, shard)

    def _flush(self, camera: str, count: int) -> None:
        frames = np.concatenate(self._buffers[camera])
        block, rest = frames[:count], frames[count:]
        self._buffers[camera] = [rest] if len(rest) else []
        array = self._array(camera, block.shape[1:])
        start = self._written.get(camera, 0)
        array.resize((start + len(block), *block.shape[1:]))
        array[start:start + len(block)] = block
        self._written[camera] = start + len(block)

    def append_chunks(self, camera: str, payloads: list[bytes], frames: int, frame_shape: tuple[int, int, int],
                      extradata: bytes | None = None, segment_frames: int = 1, stream_codec: str | None = None) -> None:
        """Append pass-through chunk payloads holding ``frames`` frames of (H, W, 3).

        One payload per chunk: a JPEG per frame (``source-jpeg``) or one segment of
        ``segment_frames`` frames (``video``; only the episode's last may be shorter).
        ``extradata`` and ``stream_codec`` describe the video stream to its decoder.
        """
        storage = self._storage(camera)
        if not storage.pass_through:
            raise ValueError(f"{self._where(camera)}: camera is stored as {storage.codec} frames, not as "
                             "source chunks")
        if camera not in self._array_storage:
            update = {"segment_frames": segment_frames, "stream_codec": stream_codec or storage.stream_codec}
            self._array_storage[camera] = storage.model_copy(update=update)
        elif self._array_storage[camera].segment_frames != segment_frames:
            raise ValueError(f"{self._where(camera)}: segments of {segment_frames} frames after segments of "
                             f"{self._array_storage[camera].segment_frames}")
        metadata = self._pass_through_array(camera, tuple(frame_shape), extradata)
        if metadata.shape[1:] != tuple(frame_shape):
            raise ValueError(f"{self._where(camera)}: frame size changed from {metadata.shape[1:]} to {frame_shape}")
        pending = self._chunks.setdefault(camera, [])
        pending.extend(payloads)
        self._written[camera] = self._written.get(camera, 0) + frames
        per_shard = self._shard_frames(camera) // segment_frames
        while len(pending) >= per_shard:
            self._write_shard(camera, pending[:per_shard])
            del pending[:per_shard]

    def _write_shard(self, camera: str, payloads: list[bytes]) -> None:
        per_shard = self._shard_frames(camera) // self._storage(camera).segment_frames
        index = self._shards.get(camera, 0)
        key = self._pass_through[camera].encode_chunk_key((index, 0, 0, 0))
        self._write_staged(f"{layout.FRAMES}/{camera}/{key}", frame_codecs.shard_bytes(payloads, per_shard))
        self._shards[camera] = index + 1

    def _write_staged(self, rel: str, data: bytes) -> None:
        """Write one file of the staging folder, unsynced and in place: nobody reads the folder
        before commit syncs all of it and renames it into place (on an object store: one PUT)."""
        path = self.root.path(self.staging, rel)
        if not self.root.is_local:
            self.root.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path, "wb") as handle:
                handle.write(data)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise DiskFullError(path, len(data), free_bytes(path)) from None
            raise

    def _array(self, camera: str, frame_shape: tuple[int, ...], extradata: bytes | None = None,
               length: int = 0) -> zarr.Array:
        if camera in self._arrays:
            return self._arrays[camera]
        storage = self._storage(camera)
        self._array_storage[camera] = storage
        if self._group is None:  # opened as it is when pass-through cameras already stored its document
            mode = "a" if self._group_document_stored else "w"
            self._group = zarr.open_group(self.root.zarr_store(f"{self.staging}/{layout.FRAMES}"), mode=mode)
        serializer, compressors = frame_codecs.serializer_and_compressors(storage, extradata, self.fps)
        self._arrays[camera] = self._group.create_array(
            camera, shape=(length, *frame_shape), dtype="uint8", chunks=(storage.segment_frames, *frame_shape),
            shards=(self._shard_frames(camera), *frame_shape), serializer=serializer, compressors=compressors,
            fill_value=0, attributes={"frame_storage": storage.model_dump(mode="json")})
        return self._arrays[camera]

    def _pass_through_array(self, camera: str, frame_shape: tuple[int, ...],
                            extradata: bytes | None) -> ArrayV3Metadata:
        """The metadata of a pass-through camera's array, its document (and the group's, unless zarr
        wrote that) stored at first use: the bytes zarr itself writes for the same array."""
        if camera in self._pass_through:
            return self._pass_through[camera]
        storage = self._storage(camera)
        self._array_storage[camera] = storage
        template = _pass_through_template(frame_shape, self._shard_frames(camera), storage.model_dump_json(),
                                          extradata, self.fps)
        metadata = self._pass_through[camera] = template.update_shape((self.record.length, *frame_shape))
        if self._group is None and not self._group_document_stored:
            self._write_staged(f"{layout.FRAMES}/{ZARR_JSON}", _group_document())
            self._group_document_stored = True
        document = metadata.to_buffer_dict(default_buffer_prototype())[ZARR_JSON].to_bytes()
        self._write_staged(f"{layout.FRAMES}/{camera}/{ZARR_JSON}", document)
        return metadata

    def set_lowdim(self, columns: dict[str, np.ndarray], timestamps: np.ndarray | None = None,
                   absent: list[str] | None = None) -> None:
        """Set the per-frame low-dim columns ((T, ...) arrays, one per declared feature).

        Features in ``absent`` (optional fields this episode's source lacks) get no column; the
        episode record lists them under ``extra["absent_fields"]``.
        """
        length = self.record.length
        absent = sorted(absent or [])
        present = {name: spec for name, spec in self.features.items() if name not in absent}
        for name, spec in present.items():
            if name not in columns:
                raise ValueError(f"{self._where(name)}: missing low-dim column")
            values = np.asarray(columns[name])
            if values.shape != (length, *spec.shape):
                raise ValueError(f"{self._where(name)}: shape {values.shape}, expected {(length, *spec.shape)}")
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                raise ValueError(f"{self._where(name)}: contains NaN or inf")
        ts = np.arange(length) / 1.0 if timestamps is None else np.asarray(timestamps, dtype=np.float64)
        data = {"frame_index": np.arange(length, dtype=np.int64), "timestamp": ts}
        for name, spec in present.items():
            data[name] = list(np.asarray(columns[name], dtype=spec.dtype).reshape(length, -1))
        self._lowdim = pa.Table.from_pydict(data, schema=lowdim_schema(present))
        if absent:
            self.record.extra["absent_fields"] = absent

    def commit(self) -> None:
        """Encode the last partial shards, check lengths, then write the rest and publish (marker
        last): on the publisher's thread when the writer has one, so the caller reads the next
        episode meanwhile. Whatever makes the episode bad is raised here, before any hand-over."""
        for camera in list(self._buffers):
            if self._buffers[camera]:
                self._flush(camera, sum(len(b) for b in self._buffers[camera]))
        for camera, count in self._written.items():
            if count != self.record.length:
                raise ValueError(f"{self._where(camera)}: {count} frames but the episode has {self.record.length}")
        if self._lowdim is None and self.features:
            raise ValueError(f"{self._where('lowdim')}: low-dim columns were never set")
        if self.publisher is None:
            self._stage_rest_and_publish()
        else:
            self.publisher.submit(self._stage_rest_and_publish)

    def _stage_rest_and_publish(self) -> None:
        """Write the pending pass-through shards, the low-dim table and the record; sync; publish."""
        for camera in self._chunks:
            if self._chunks[camera]:
                self._write_shard(camera, self._chunks[camera])
        if self._lowdim is not None:
            self._write_staged(layout.LOWDIM, parquet_bytes(self._lowdim))
        # The text Root.write_json_atomic writes (record files read back by every stage).
        record = json.dumps(self.record.model_dump(mode="json"), indent=2, sort_keys=True, default=str)
        self._write_staged(layout.EPISODE_RECORD, record.encode())
        # One concurrent sync of everything staged (frame chunks included, written unsynced) before
        # the rename and the marker publish it: a marker never names bytes a power loss takes back.
        self.root.fsync_tree(self.staging)
        self._publish()

    def _publish(self) -> None:
        trash = f"{layout.episodes_dir(self.store.dataset)}/{layout.TRASH}/{self.record.episode_id}-{uuid.uuid4().hex[:8]}"
        if self.root.exists(self.final):
            # Unmark first so readers never see a mix of old and new files.
            self.root.rm(f"{self.final}/{layout.COMPLETE_MARKER}")
            self.root.rename(self.final, trash)
        self.root.rename(self.staging, self.final)
        self.root.write_bytes_atomic(f"{self.final}/{layout.COMPLETE_MARKER}", b"")
        self.root.rm(trash)
        self.store._arrays = {k: v for k, v in self.store._arrays.items() if k[0] != self.record.episode_id}
        log.info("dataset %s: stored episode %s (%d frames)", self.store.dataset, self.record.episode_id,
                 self.record.length)


@functools.lru_cache(maxsize=1)
def _group_document() -> bytes:
    """The frames group's zarr.json, as zarr writes it for a new group."""
    store = zarr.storage.MemoryStore()
    zarr.open_group(store, mode="w")
    return sync(store.get(ZARR_JSON, default_buffer_prototype())).to_bytes()


@functools.lru_cache(maxsize=64)
def _pass_through_template(frame_shape: tuple[int, ...], shard_frames: int, storage_json: str,
                           extradata: bytes | None, fps: float) -> ArrayV3Metadata:
    """Metadata zarr builds for a pass-through camera array (of length 0: writers set theirs with
    ``update_shape``, as zarr's own resize does), made once per camera format, not per episode."""
    storage = FrameStorage.model_validate_json(storage_json)
    serializer, compressors = frame_codecs.serializer_and_compressors(storage, extradata, fps)
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    array = group.create_array(
        "camera", shape=(0, *frame_shape), dtype="uint8", chunks=(storage.segment_frames, *frame_shape),
        shards=(shard_frames, *frame_shape), serializer=serializer, compressors=compressors, fill_value=0,
        attributes={"frame_storage": storage.model_dump(mode="json")})
    return array.metadata


class EpisodePublisher:
    """Syncs and publishes staged episodes on one background thread, in the order committed.

    An episode's publication is mostly waiting on the disk (its files' fsyncs, the marker's); with a
    publisher, a writer's commit hands that over and the caller reads and stages the next episode
    meanwhile. Each episode is still synced whole before its rename and marker. Leaving the ``with``
    waits for every submitted episode and raises the first failure (after all have finished).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="episode-publish")
        self._pending: list[Future] = []

    def submit(self, publish: Callable[[], None]) -> None:
        """Queue one staged episode's publication; raises a failure of an earlier one at once."""
        for future in self._pending:
            if future.done() and future.exception() is not None:
                raise future.exception()
        self._pending.append(self._pool.submit(publish))

    def wait(self) -> None:
        """Block until every queued publication has finished; raise the first failure."""
        pending, self._pending = self._pending, []
        errors = [err for err in (future.exception() for future in pending) if err is not None]
        if errors:
            raise errors[0]

    def __enter__(self) -> "EpisodePublisher":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
            else:  # the caller's error wins; the episodes it staged before it are still published
                for future in self._pending:
                    if future.exception() is not None:
                        log.error("publishing a staged episode failed too: %s", future.exception())
        finally:
            self._pool.shutdown(wait=True)


def read_start_frames(root: Root | str, rows: list[Any], stores: dict[str, EpisodeStore]) -> list[np.ndarray]:
    """Frame ``row.start`` of camera ``row.camera`` of each plan row (each clip's observed frame),
    in order, with one selection per episode (:meth:`EpisodeStore.read_frame_of_each`); ``stores``
    caches the datasets' stores between calls."""
    by_dataset: dict[str, list[int]] = {}
    for position, row in enumerate(rows):
        by_dataset.setdefault(row.dataset, []).append(position)
    frames: list[np.ndarray] = [np.empty(0, np.uint8)] * len(rows)
    for dataset, positions in by_dataset.items():
        store = stores.setdefault(dataset, EpisodeStore(root, dataset))
        picked = store.read_frame_of_each([(rows[p].episode_id, rows[p].camera, rows[p].start) for p in positions])
        for position, frame in zip(positions, picked, strict=True):
            frames[position] = frame
    return frames
