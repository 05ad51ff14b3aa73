"""LeRobot dataset reader: a local folder of codebase v3.0 (or legacy v2.0/v2.1).

v3.0: ``meta/info.json``, ``meta/tasks.parquet``, ``meta/episodes/chunk-*/file-*.parquet``; many
episodes per data parquet and per video file, an episode's frames located in its video by
``videos/<key>/from_timestamp``. v2.x: one parquet and one mp4 per episode, ``meta/episodes.jsonl``,
``meta/tasks.jsonl``. Paths come from the ``data_path``/``video_path`` templates of info.json.

Video is kept as the source's packets by default (frame codec ``video``, pass-through): each file
is demuxed once, front to back, and each episode's packets are cut into keyframe-aligned segments
that the store keeps as they are, each checked by decoding it alone. With another frame codec the
frames are decoded with PyAV, again each file once and sequentially. Either way episodes sharing
files form one group, read in file order, so nothing is ever sought.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from foresight.pipelines.ingest.common import (
    READ_BLOCK,
    ChunkBlock,
    FrameBlock,
    FrameCodecOptions,
    IngestError,
    LowdimBlock,
    SourceEpisode,
    SourceLayout,
    check_finite,
    resolve_frame_storage,
)
from foresight.schemas.dataset import FeatureSpec, FrameStorage, LanguageSegment
from foresight.storage.frame_codecs import FrameDecodeError, decode_segment, frame_rgb, pack_packets

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
LONG_SEGMENT = 64
"""Segments longer than this (sparse or irregular keyframes) make every frame read decode many frames."""
INDEX_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
CAMERA_PREFIX = "observation.images."
STORED_NAMES = {"observation.state": "state"}
"""Feature key -> stored column where foresight has a common name (``action`` is already common)."""
INFO = "meta/info.json"
TEMPLATE_FIELDS = {"data_path": {"chunk_index", "file_index", "episode_chunk", "episode_index"},
                   "video_path": {"chunk_index", "file_index", "episode_chunk", "episode_index", "video_key"}}
"""The placeholders each info.json path template may use (LeRobot v2.x and v3.0)."""


class LeRobotUsageError(IngestError):
    """The folder is not an ingestible LeRobot dataset (missing, or its metadata is unreadable or
    unsupported): the command refuses it before writing anything (exit 2), nothing is quarantined."""


class LeRobotOptions(FrameCodecOptions):
    """What to take from a LeRobot dataset folder."""

    cameras: list[str] | None = Field(default=None, description="Video/image feature keys to store (default all).")


@dataclass
class LeRobotMeta:
    """The metadata of one LeRobot dataset folder."""

    root: Path
    version: str
    info: dict[str, Any]
    fps: float
    camera_keys: list[str]
    """Feature keys of dtype video or image, in info.json order."""
    lowdim: dict[str, FeatureSpec]
    episodes: dict[int, dict[str, Any]]
    tasks: dict[int, str]
    problems: list[IngestError] = field(default_factory=list)

    @property
    def is_v3(self) -> bool:
        return self.version.startswith("v3")

    def data_file(self, ep: int) -> Path:
        row = self.episodes[ep]
        keys = _template_keys(self, ep, row, "data")
        return confined_path(self.root, "data_path", self.info["data_path"], keys, ep)

    def video_file(self, ep: int, key: str) -> Path:
        row = self.episodes[ep]
        keys = _template_keys(self, ep, row, f"videos/{key}")
        return confined_path(self.root, "video_path", self.info["video_path"], {"video_key": key, **keys}, ep)


def confined_path(root: Path, template_name: str, template: str, keys: dict[str, Any], ep: int) -> Path:
    """``root / template.format(**keys)``, refused unless it stays inside the dataset folder: no
    absolute path, no ``..``, no symlink whose target leaves the folder (a crafted info.json or
    dataset must not make ingest read other files)."""
    where = f"{root / INFO}"
    try:
        relative = template.format(**keys)
    except (KeyError, IndexError, ValueError) as err:
        raise IngestError(where, _episode_id(ep), template_name, f"template {template!r} cannot be filled "
                          f"({err.__class__.__name__}: {err})") from None
    if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise IngestError(where, _episode_id(ep), template_name, f"resolves to {relative!r}, outside the dataset "
                          "folder (absolute paths and '..' are refused)")
    path = root / relative
    if not _has_link_below(root, Path(relative).parts):
        return path  # plain folders and files below the root: inside it (no '..', checked above)
    real, base = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, base]) != base:
        raise IngestError(path, _episode_id(ep), template_name, f"is a link to {real}, outside the dataset folder "
                          f"{base}; refusing to read it")
    return path


def _has_link_below(root: Path, parts: tuple[str, ...]) -> bool:
    """Whether any of ``root/parts[0]``, ``root/parts[0]/parts[1]``, ... is a symbolic link: a few
    lstat calls, where a full ``realpath`` of both paths costs one per component of each (and an
    ingest resolves every episode's files a dozen times)."""
    current = root
    for part in parts:
        current = current / part
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return True
        except FileNotFoundError:
            return False  # nothing further exists, so nothing further links anywhere
    return False


def _episode_id(ep: int) -> str:
    return f"episode_{ep:06d}"


def stored_name(key: str) -> str:
    return STORED_NAMES.get(key, key)


def camera_name(key: str) -> str:
    """Store camera name of a feature key: ``observation.images.top`` -> ``top``."""
    return key.removeprefix(CAMERA_PREFIX) or key


def _template_keys(meta: LeRobotMeta, ep: int, row: dict[str, Any], prefix: str) -> dict[str, int]:
    chunks_size = int(meta.info.get("chunks_size", 1000))
    if meta.is_v3:
        try:
            return {"chunk_index": int(row[f"{prefix}/chunk_index"]), "file_index": int(row[f"{prefix}/file_index"]),
                    "episode_index": ep}
        except (KeyError, TypeError, ValueError) as err:
            raise IngestError(meta.root / "meta/episodes", _episode_id(ep), f"{prefix}/chunk_index",
                              f"missing or not an integer ({err.__class__.__name__}: {err})") from None
    return {"episode_chunk": ep // chunks_size, "episode_index": ep}


def load_meta(src: str | Path) -> LeRobotMeta:
    """Read info.json, episodes and tasks; raises :class:`LeRobotUsageError` (one line naming the
    file, and for JSON the line and key) for a missing, malformed or unsupported dataset."""
    root = Path(src)
    if not root.is_dir():
        raise LeRobotUsageError(root, None, None, "no such folder (expected a LeRobot dataset folder)")
    info_path = root / INFO
    info = _read_json_object(info_path)
    version = str(info.get("codebase_version"))
    if version not in SUPPORTED_VERSIONS:
        raise LeRobotUsageError(info_path, None, "codebase_version", f"unsupported version {version!r} "
                                f"(supported: {', '.join(SUPPORTED_VERSIONS)})")
    _check_info(info, info_path)
    features = info["features"]
    camera_keys = [k for k, f in features.items() if f.get("dtype") in ("video", "image")]
    lowdim = {k: FeatureSpec(dtype=f["dtype"], shape=[int(d) for d in f["shape"]], names=_flat_names(f.get("names")))
              for k, f in features.items() if k not in INDEX_COLUMNS and _is_numeric(f.get("dtype"))}
    is_v3 = version.startswith("v3")
    try:
        episodes = _episodes_v3(root) if is_v3 else _episodes_v2(root)
        tasks = _tasks_v3(root) if is_v3 else _tasks_v2(root)
    except LeRobotUsageError:
        raise
    except IngestError as err:
        raise LeRobotUsageError(err.file, err.episode, err.field, err.reason) from None
    return LeRobotMeta(root=root, version=version, info=info, fps=float(info["fps"]), camera_keys=camera_keys,
                       lowdim=lowdim, episodes=episodes, tasks=tasks)


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a file; LeRobotUsageError naming the file (and line/column) otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LeRobotUsageError(path, None, None, "file missing (not a LeRobot dataset folder)") from None
    except OSError as err:
        raise LeRobotUsageError(path, None, None, f"unreadable ({err.strerror or err})") from None
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise LeRobotUsageError(path, None, None, f"not UTF-8 text (byte {err.start}: {err.reason})") from None
    except json.JSONDecodeError as err:
        raise LeRobotUsageError(path, None, None, f"malformed JSON at line {err.lineno} column {err.colno}: "
                                f"{err.msg}") from None
    if not isinstance(value, dict):
        raise LeRobotUsageError(path, None, None, f"expected a JSON object, found {type(value).__name__}")
    return value


def _check_info(info: dict[str, Any], path: Path) -> None:
    """Every key ingest relies on, with its type; the first problem raises LeRobotUsageError."""
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise LeRobotUsageError(path, None, key, "key missing")
    fps = info["fps"]
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
        raise LeRobotUsageError(path, None, "fps", f"expected a positive finite number, found {fps!r}")
    if not isinstance(info["features"], dict):
        raise LeRobotUsageError(path, None, "features", f"expected an object, found {type(info['features']).__name__}")
    for name, feature in info["features"].items():
        _check_feature(name, feature, path)
    if "video_path" not in info and any(f.get("dtype") == "video" for f in info["features"].values()):
        raise LeRobotUsageError(path, None, "video_path", "key missing (the dataset has video features)")
    if "chunks_size" in info and (not isinstance(info["chunks_size"], int) or info["chunks_size"] <= 0):
        raise LeRobotUsageError(path, None, "chunks_size", f"expected a positive integer, found "
                                f"{info['chunks_size']!r}")
    for key, allowed in TEMPLATE_FIELDS.items():
        if key in info:
            _check_template(info[key], key, allowed, path)


def _check_feature(name: str, feature: Any, path: Path) -> None:
    """A feature is an object with a string 'dtype' and a 'shape' of positive integers; a camera's
    shape is (height, width, 3), or (3, height, width) with names channels, height, width."""
    where = f"features.{name}"
    if not isinstance(feature, dict):
        raise LeRobotUsageError(path, None, where, f"expected an object, found {type(feature).__name__}")
    shape = feature.get("shape")
    if not isinstance(feature.get("dtype"), str) or not isinstance(shape, list) or \
            not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise LeRobotUsageError(path, None, where, "expected 'dtype' (a string) and 'shape' (a list of integers)")
    if any(d <= 0 for d in shape):
        raise LeRobotUsageError(path, None, f"{where}.shape", f"expected positive sizes, found {shape}")
    if feature["dtype"] in ("video", "image"):
        names = list(feature.get("names") or [])[:3]
        channels = shape[0] if names == ["channels", "height", "width"] else shape[-1] if shape else None
        if len(shape) != 3 or channels != 3:
            raise LeRobotUsageError(path, None, f"{where}.shape", f"a camera needs (height, width, 3) or "
                                    f"(3, height, width) with names channels, height, width; found {shape}")


def _check_template(template: Any, key: str, allowed: set[str], path: Path) -> None:
    """A path template must be relative, without '..', and use only LeRobot's placeholders."""
    if not isinstance(template, str) or not template:
        raise LeRobotUsageError(path, None, key, f"expected a path template string, found {template!r}")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise LeRobotUsageError(path, None, key, f"template {template!r} is malformed ({err})") from None
    unknown = sorted(n for n in names if n not in allowed)  # attribute or item access included
    if unknown:
        raise LeRobotUsageError(path, None, key, f"template {template!r} uses unknown placeholders {unknown} "
                                f"(allowed: {sorted(allowed)})")
    if template.startswith(("/", "\\")) or Path(template).is_absolute() or \
            ".." in template.replace("\\", "/").split("/"):
        raise LeRobotUsageError(path, None, key, f"template {template!r} leaves the dataset folder (absolute "
                                "paths and '..' are refused)")


def _is_numeric(dtype: Any) -> bool:
    try:
        return np.dtype(str(dtype)).kind in "fiub"
    except TypeError:
        return False


def _flat_names(names: Any) -> list[str] | None:
    """Per-element names: a list of strings, or LeRobot's {"motors": [...]} form."""
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return names
    return None


def _episodes_v3(root: Path) -> dict[int, dict[str, Any]]:
    files = sorted((root / "meta/episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise IngestError(root / "meta/episodes", None, None, "no episode metadata parquet files")
    episodes: dict[int, dict[str, Any]] = {}
    for path in files:
        try:  # without the per-episode stats/ columns (most of the file), which ingest recomputes
            parquet = pq.ParquetFile(path)
            keep = [c for c in parquet.schema_arrow.names if not c.startswith("stats/")]
            table = parquet.read(columns=keep)
        except (OSError, pa.ArrowException) as err:
            raise IngestError(path, None, None, f"unreadable parquet ({err})") from None
        if "episode_index" not in table.column_names:
            raise IngestError(path, None, "episode_index", "column missing")
        for row in table.to_pylist():
            episodes[int(row["episode_index"])] = row
    return episodes


def _episodes_v2(root: Path) -> dict[int, dict[str, Any]]:
    path = root / "meta/episodes.jsonl"
    if not path.exists():
        raise IngestError(path, None, None, "file missing")
    return {_int_key(row, "episode_index", path, number): row for number, row in _jsonl_rows(path)}


def _tasks_v3(root: Path) -> dict[int, str]:
    """tasks.parquet is a pandas frame: task strings as its index, a ``task_index`` column."""
    path = root / "meta/tasks.parquet"
    if not path.exists():
        raise IngestError(path, None, None, "file missing")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise IngestError(path, None, None, f"unreadable parquet ({err})") from None
    index_columns = (table.schema.pandas_metadata or {}).get("index_columns", [])
    text_column = next((c for c in [*index_columns, "task"] if isinstance(c, str) and c in table.column_names), None)
    if text_column is None or "task_index" not in table.column_names:
        raise IngestError(path, None, "task", f"no task text column (columns {table.column_names})")
    return dict(zip(table.column("task_index").to_pylist(), table.column(text_column).to_pylist()))


def _tasks_v2(root: Path) -> dict[int, str]:
    path = root / "meta/tasks.jsonl"
    if not path.exists():
        raise IngestError(path, None, None, "file missing")
    tasks = {}
    for number, row in _jsonl_rows(path):
        if "task" not in row:
            raise IngestError(path, None, "task", f"line {number}: key missing")
        tasks[_int_key(row, "task_index", path, number)] = str(row["task"])
    return tasks


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-empty line; errors name the file and the line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise IngestError(path, None, None, f"not UTF-8 text (byte {err.start}: {err.reason})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise IngestError(path, None, None, f"line {number}: malformed JSON at column {err.colno}: "
                              f"{err.msg}") from None
        if not isinstance(row, dict):
            raise IngestError(path, None, None, f"line {number}: expected a JSON object, found {type(row).__name__}")
        yield number, row


def _int_key(row: dict[str, Any], key: str, path: Path, number: int) -> int:
    value = row.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise IngestError(path, None, key, f"line {number}: expected an integer, found {value!r}")
    return value


def selected_cameras(meta: LeRobotMeta, options: LeRobotOptions) -> list[str]:
    keys = options.cameras if options.cameras is not None else meta.camera_keys
    unknown = [k for k in keys if k not in meta.camera_keys]
    if unknown:
        raise ValueError(f"{meta.root / INFO}: no video/image features {unknown} (has {meta.camera_keys})")
    return list(keys)


def source_layout(meta: LeRobotMeta, options: LeRobotOptions) -> SourceLayout:
    """Cameras (H, W from the feature shape and its names) and low-dim features."""
    cameras = {camera_name(k): [*_height_width(meta, k), 3] for k in selected_cameras(meta, options)}
    features = {stored_name(k): spec for k, spec in meta.lowdim.items()}
    storage = {camera_name(k): _frame_storage(meta, k, options) for k in selected_cameras(meta, options)}
    shared = [str(p) for p in sorted((meta.root / "meta").rglob("*")) if p.is_file()]
    return SourceLayout(fps=meta.fps, cameras=cameras, features=features, frame_storage=storage, shared_files=shared,
                        extra={"codebase_version": meta.version, "robot_type": meta.info.get("robot_type"),
                               "camera_keys": {camera_name(k): k for k in selected_cameras(meta, options)},
                               "source_columns": {stored_name(k): k for k in meta.lowdim}})


def _frame_storage(meta: LeRobotMeta, key: str, options: LeRobotOptions) -> FrameStorage:
    """Video features keep their packets unless another codec is asked for; image features are decoded."""
    feature = meta.info["features"][key]
    where = f"{meta.root / INFO}, camera '{camera_name(key)}'"
    if feature["dtype"] != "video":
        return resolve_frame_storage(options, "none", where)
    storage = resolve_frame_storage(options, "video", where, stream_codec=(feature.get("info") or {}).get("video.codec"))
    return storage.model_copy(update={"segment_frames": None}) if storage.pass_through else storage


def _height_width(meta: LeRobotMeta, key: str) -> tuple[int, int]:
    feature = meta.info["features"][key]
    shape, names = list(feature["shape"]), feature.get("names") or []
    if len(shape) == 3 and list(names)[:3] == ["channels", "height", "width"]:
        return int(shape[1]), int(shape[2])
    return int(shape[0]), int(shape[1])


def episode_groups(meta: LeRobotMeta, options: LeRobotOptions) -> list[list[int]]:
    """Episodes that share a data or video file, each group in file order (v2.x: one per episode)."""
    owner: dict[Path, int] = {}
    parent = {ep: ep for ep in meta.episodes}

    def find(ep: int) -> int:
        while parent[ep] != ep:
            parent[ep] = parent[parent[ep]]
            ep = parent[ep]
        return ep

    for ep in sorted(meta.episodes):
        for path in episode_files(meta, ep, options):
            if path in owner:
                parent[find(ep)] = find(owner[path])
            else:
                owner[path] = ep
    groups: dict[int, list[int]] = {}
    for ep in sorted(meta.episodes):
        groups.setdefault(find(ep), []).append(ep)
    return list(groups.values())


def episode_files(meta: LeRobotMeta, ep: int, options: LeRobotOptions) -> list[Path]:
    files = [meta.data_file(ep)]
    files += [meta.video_file(ep, k) for k in selected_cameras(meta, options)
              if meta.info["features"][k]["dtype"] == "video"]
    return files


def lerobot_episode(meta: LeRobotMeta, ep: int, options: LeRobotOptions) -> SourceEpisode:
    row = meta.episodes[ep]
    tasks = [str(t) for t in (row.get("tasks") or [])]
    extra = {"episode_index": ep, "codebase_version": meta.version,
             "meta": {k: v for k, v in row.items() if isinstance(v, (int, float, str, list))}}
    return SourceEpisode(episode_id=f"episode_{ep:06d}", split="train", task=tasks[0] if tasks else "",
                         length=int(row["length"]), source_path=str(meta.data_file(ep)),
                         files=[str(p) for p in episode_files(meta, ep, options)], instructions=tasks, extra=extra)


Block = FrameBlock | LowdimBlock


def read_lerobot_group(meta: LeRobotMeta, group: list[int], options: LeRobotOptions,
                       skip: set[int] | None = None) -> Iterator[tuple[SourceEpisode, Iterator[Block]]]:
    """For each episode of a group (in file order): its metadata and its block stream.

    Each block stream must be consumed or dropped before the next pair is requested: the video
    decoders are shared and only move forward. Episodes in ``skip`` are passed over (their video
    frames are decoded and discarded when a later episode needs the decoder to move on).
    """
    tables = _TableCache()
    cursors: dict[Path, VideoCursor] = {}
    try:
        for ep in group:
            if skip and ep in skip:
                continue
            episode = lerobot_episode(meta, ep, options)
            yield episode, _episode_blocks(meta, ep, episode, options, tables, cursors)
    finally:
        for cursor in cursors.values():
            cursor.close()


class _TableCache:
    """The data parquet in use: a group's episodes come in file order, so one table is kept."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.table: pa.Table | None = None

    def get(self, path: Path, episode: str) -> pa.Table:
        if path != self.path:
            try:
                self.table, self.path = pq.read_table(path), path
            except (OSError, pa.ArrowException) as err:
                raise IngestError(path, episode, None, f"unreadable parquet ({err})") from None
        return self.table


def _episode_blocks(meta: LeRobotMeta, ep: int, episode: SourceEpisode, options: LeRobotOptions,
                    tables: _TableCache, cursors: dict[Path, "VideoCursor | PacketCursor"]) -> Iterator[Block]:
    data_path = meta.data_file(ep)
    rows = _episode_rows(tables.get(data_path, episode.episode_id), ep, data_path, episode)
    columns = _lowdim_columns(meta, rows, data_path, episode.episode_id)
    segments = _task_segments(meta, rows, data_path, episode.episode_id)
    for key in selected_cameras(meta, options):
        if meta.info["features"][key]["dtype"] == "image":
            yield from _image_blocks(rows, key, data_path, episode.episode_id)
            continue
        path = meta.video_file(ep, key)
        pass_through = _frame_storage(meta, key, options).pass_through
        if path not in cursors:
            cursors[path] = PacketCursor(path, meta.fps) if pass_through else VideoCursor(path, meta.fps)
        row = meta.episodes[ep]
        from_ts = float(row.get(f"videos/{key}/from_timestamp", 0.0))
        to_ts = float(row.get(f"videos/{key}/to_timestamp", from_ts + episode.length / meta.fps))
        shape = [*_height_width(meta, key), 3]
        if pass_through:
            yield from cursors[path].take(from_ts, to_ts, episode.length, shape, episode.episode_id, key)
            continue
        for frames in cursors[path].take(from_ts, to_ts, episode.length, shape, episode.episode_id, key):
            yield FrameBlock(camera_name(key), frames)
    timestamps = rows.column("timestamp").to_numpy().astype(np.float64) if "timestamp" in rows.column_names \
        else np.arange(episode.length) / meta.fps
    yield LowdimBlock(columns=columns, timestamps_T=timestamps, segments=segments)


def _episode_rows(table: pa.Table, ep: int, path: Path, episode: SourceEpisode) -> pa.Table:
    if "episode_index" not in table.column_names:
        raise IngestError(path, episode.episode_id, "episode_index", "column missing")
    mask = pc.equal(table.column("episode_index"), ep)
    rows = table.filter(mask)
    if len(rows) != episode.length:
        raise IngestError(path, episode.episode_id, "episode_index", f"{len(rows)} data rows but the episode "
                          f"metadata says length {episode.length}")
    if "frame_index" in rows.column_names:
        frame_index = rows.column("frame_index").to_numpy()
        if not np.array_equal(frame_index, np.arange(len(rows))):
            raise IngestError(path, episode.episode_id, "frame_index", "not 0..length-1 in order")
    return rows


def column_array(rows: pa.Table, name: str, shape: list[int]) -> np.ndarray:
    """A parquet column (scalars, lists or fixed-size lists) as a (T, *shape) array."""
    column = rows.column(name).combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) or \
            pa.types.is_large_list(column.type):
        values = column.flatten().to_numpy(zero_copy_only=False)
    else:
        values = column.to_numpy(zero_copy_only=False)
    return values.reshape(len(rows), *shape)


def _lowdim_columns(meta: LeRobotMeta, rows: pa.Table, path: Path, episode: str) -> dict[str, np.ndarray]:
    columns = {}
    for name, spec in meta.lowdim.items():
        if name not in rows.column_names:
            raise IngestError(path, episode, name, "column missing")
        try:
            values = column_array(rows, name, spec.shape)
        except (ValueError, pa.ArrowException) as err:
            raise IngestError(path, episode, name, f"expected per-frame shape {spec.shape} ({err})") from None
        check_finite(values, str(path), episode, name)
        columns[stored_name(name)] = values.astype(spec.dtype)
    return columns


def _task_segments(meta: LeRobotMeta, rows: pa.Table, path: Path, episode: str) -> list[LanguageSegment]:
    """One segment per run of constant task_index: the episode's instructions over frames."""
    if "task_index" not in rows.column_names or not len(rows):
        return []
    task_index = rows.column("task_index").to_numpy()
    unknown = sorted(set(task_index.tolist()) - set(meta.tasks))
    if unknown:
        raise IngestError(path, episode, "task_index", f"task indices {unknown} not in the task table")
    bounds = np.flatnonzero(np.diff(task_index)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds - 1, len(task_index) - 1]
    return [LanguageSegment(episode_id=episode, start=int(s), end=int(e), task=meta.tasks[int(task_index[s])],
                            text=meta.tasks[int(task_index[s])]) for s, e in zip(starts, ends)]


def _image_blocks(rows: pa.Table, key: str, path: Path, episode: str) -> Iterator[FrameBlock]:
    """Frames of an ``image`` feature: PNG/JPEG bytes in the parquet (written as RGB by PIL)."""
    if key not in rows.column_names:
        raise IngestError(path, episode, key, "column missing")
    column = rows.column(key).combine_chunks()
    if not pa.types.is_struct(column.type) or column.type.get_field_index("bytes") < 0:
        raise IngestError(path, episode, key, f"expected a struct with image bytes, found {column.type}")
    encoded = column.field("bytes").to_pylist()
    for start in range(0, len(encoded), READ_BLOCK):
        frames = []
        for t in range(start, min(start + READ_BLOCK, len(encoded))):
            image = None if encoded[t] is None else cv2.imdecode(np.frombuffer(encoded[t], np.uint8), cv2.IMREAD_COLOR)
            if image is None:
                raise IngestError(path, episode, key, f"frame {t}: missing or undecodable image bytes")
            frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        yield FrameBlock(camera_name(key), np.stack(frames))


class VideoCursor:
    """One video file decoded once, front to back; episodes take their frames by timestamp."""

    def __init__(self, path: Path, fps: float):
        self.path = path
        self.tolerance = 0.5 / fps
        self._frames: Iterator[tuple[float, av.VideoFrame]] | None = None
        self._container: av.container.InputContainer | None = None

    def _decode(self, episode: str, key: str) -> Iterator[tuple[float, av.VideoFrame]]:
        try:
            self._container = av.open(str(self.path))
            stream = self._container.streams.video[0]
        except (av.error.FFmpegError, OSError, IndexError) as err:
            raise IngestError(self.path, episode, key, f"unreadable video ({err})") from None
        stream.thread_type = "AUTO"
        for frame in self._container.decode(stream):
            yield float(frame.time if frame.time is not None else 0.0), frame

    def _next(self, episode: str, key: str) -> tuple[float, av.VideoFrame] | None:
        if self._frames is None:
            self._frames = self._decode(episode, key)
        try:
            return next(self._frames)
        except StopIteration:
            return None
        except (av.error.FFmpegError, OSError) as err:
            raise IngestError(self.path, episode, key, f"video decoding failed ({err})") from None

    def take(self, from_ts: float, to_ts: float, count: int, shape: list[int], episode: str,
             key: str) -> Iterator[np.ndarray]:
        """Blocks of the ``count`` frames starting at ``from_ts`` ((n, H, W, 3) RGB uint8)."""
        block: list[np.ndarray] = []
        taken = 0
        while taken < count:
            item = self._next(episode, key)
            if item is None:
                raise IngestError(self.path, episode, key, f"video holds {taken} frames for the episode, "
                                  f"data has {count} rows")
            time, frame = item
            if time < from_ts - self.tolerance:
                continue
            if time >= to_ts - self.tolerance:
                raise IngestError(self.path, episode, key, f"video holds {taken} frames before to_timestamp "
                                  f"{to_ts:.3f}, data has {count} rows")
            image = frame_rgb(frame)
            if list(image.shape) != shape:
                raise IngestError(self.path, episode, key, f"frame {taken}: decoded {image.shape}, expected {shape}")
            block.append(image)
            taken += 1
            if len(block) == READ_BLOCK:
                yield np.stack(block)
                block = []
        if block:
            yield np.stack(block)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()


@dataclass
class _Packet:
    data: bytes
    time: float
    keyframe: bool


class PacketCursor:
    """One video file demuxed once, front to back; episodes take their packets by timestamp.

    An episode's packets become self-contained segments of ``n`` frames, ``n`` the shortest
    spacing at which every segment starts on a keyframe (LeRobot encodes with ``g=2``: 2 frames),
    so reading any frame decodes at most one segment. Each segment is decoded alone once, to
    check that it is whole, before the store keeps its packets.
    """

    def __init__(self, path: Path, fps: float):
        self.path = path
        self.tolerance = 0.5 / fps
        self._container: av.container.InputContainer | None = None
        self._packets: Iterator[av.Packet] | None = None
        self._pending: _Packet | None = None
        self.stream_codec = ""
        self.extradata: bytes | None = None

    def _open(self, episode: str, key: str) -> None:
        try:
            self._container = av.open(str(self.path))
            stream = self._container.streams.video[0]
        except (av.error.FFmpegError, OSError, IndexError) as err:
            raise IngestError(self.path, episode, key, f"unreadable video ({err})") from None
        codec = stream.codec_context.codec
        self.stream_codec = getattr(codec, "canonical_name", None) or codec.name
        self.extradata = stream.codec_context.extradata or None
        self._time_base = stream.time_base
        self._packets = self._container.demux(stream)

    def _next(self, episode: str, key: str) -> _Packet | None:
        if self._pending is not None:
            packet, self._pending = self._pending, None
            return packet
        if self._packets is None:
            self._open(episode, key)
        try:
            for packet in self._packets:
                if packet.size and packet.pts is not None:
                    return _Packet(bytes(packet), float(packet.pts * self._time_base), bool(packet.is_keyframe))
        except (av.error.FFmpegError, OSError) as err:
            raise IngestError(self.path, episode, key, f"video demuxing failed ({err})") from None
        return None

    def _episode_packets(self, from_ts: float, to_ts: float, count: int, episode: str, key: str) -> list[_Packet]:
        """The packets presented in [from_ts, to_ts), in decode order."""
        packets: list[_Packet] = []
        while (packet := self._next(episode, key)) is not None:
            if packet.time < from_ts - self.tolerance:
                continue
            if packet.time >= to_ts - self.tolerance:
                self._pending = packet
                break
            packets.append(packet)
        if len(packets) != count:
            raise IngestError(self.path, episode, key, f"video holds {len(packets)} frames for the episode, "
                              f"data has {count} rows")
        return packets

    def take(self, from_ts: float, to_ts: float, count: int, shape: list[int], episode: str,
             key: str) -> Iterator[ChunkBlock]:
        """Blocks of the episode's segments (about ``READ_BLOCK`` frames each), each checked."""
        packets = self._episode_packets(from_ts, to_ts, count, episode, key)
        order = np.argsort([p.time for p in packets], kind="stable")
        rank = np.empty(len(packets), dtype=np.int64)
        rank[order] = np.arange(len(packets))
        keyframes = {int(rank[i]) for i, p in enumerate(packets) if p.keyframe}
        size = segment_length(keyframes, count)
        if size is None:
            raise IngestError(self.path, episode, key, "the episode does not start on a keyframe, so its "
                              "packets cannot be kept; ingest with --frame-codec raw")
        if size > LONG_SEGMENT:
            log.warning("%s: episode '%s', camera '%s': keyframes every %d frames, so a frame read decodes up "
                        "to as many (--frame-codec raw-lz4 stores decoded frames instead)", self.path, episode, key,
                        size)
        segments: list[list[bytes]] = [[] for _ in range((count + size - 1) // size)]
        for i, packet in enumerate(packets):
            segments[int(rank[i]) // size].append(packet.data)
        per_block = max(1, READ_BLOCK // size)
        for first in range(0, len(segments), per_block):
            batch = segments[first:first + per_block]
            for j, segment in enumerate(batch):
                self._check_segment(segment, (first + j) * size, shape, episode, key)
            frames = sum(len(segment) for segment in batch)
            yield ChunkBlock(camera_name(key), [pack_packets(segment) for segment in batch], frames,
                             (shape[0], shape[1], 3), self.extradata, size, self.stream_codec)

    def _check_segment(self, segment: list[bytes], start: int, shape: list[int], episode: str, key: str) -> None:
        try:
            frames = decode_segment(segment, self.stream_codec, self.extradata, to_rgb=False)
        except FrameDecodeError as err:
            raise IngestError(self.path, episode, key, f"frame {start}: {err}") from None
        if len(frames) != len(segment) or any((f.height, f.width) != tuple(shape[:2]) for f in frames):
            found = f"{frames[0].height}x{frames[0].width}" if frames else "nothing"
            raise IngestError(self.path, episode, key, f"frame {start}: segment of {len(segment)} packets decoded "
                              f"to {len(frames)} frames of {found}, expected {shape[0]}x{shape[1]}")

    def close(self) -> None:
        if self._container is not None:
            self._container.close()


def segment_length(keyframes: set[int], count: int) -> int | None:
    """The shortest ``n`` with a keyframe at every multiple of ``n`` below ``count`` (None: frame 0 is not one)."""
    if 0 not in keyframes:
        return None
    for n in range(1, count + 1):
        if all(t in keyframes for t in range(0, count, n)):
            return n
    return count
