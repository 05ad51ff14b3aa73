"""CALVIN reader: per-frame ``episode_XXXXXXX.npz`` files grouped by ``ep_start_end_ids.npy``.

Layout of one split folder (``training/`` or ``validation/``), see docs/REFERENCE.md, CALVIN:
``episode_{id:07d}.npz`` per frame with global ids (the debug set starts at 358482),
``ep_start_end_ids.npy`` (N, 2) inclusive, ``scene_info.npy`` and
``<lang_folder>/auto_lang_ann.npy`` (pickled dicts, read through the restricted unpickler),
``statistics.yaml``. One stored episode per row of ``ep_start_end_ids``.
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field, field_validator

from foresight.pipelines.ingest.common import (
    FrameCodecOptions,
    depth_frame_storage,
    resolve_frame_storage,
    FrameBlock,
    IngestError,
    LowdimBlock,
    SourceEpisode,
    SourceLayout,
    blocks_of,
    pack_depth_uint24,
)
from foresight.pipelines.ingest.safe_pickle import load_npy, load_pickled_dict
from foresight.schemas.dataset import FeatureSpec, LanguageSegment

log = logging.getLogger(__name__)

CALVIN_FPS = 30.0
DEPTH_SCALE_M = 1e-5
"""Depth is stored as 24-bit integers of 10 micrometres (range 0 to 167 m)."""

LOWDIM_SHAPES: dict[str, int] = {"actions": 7, "rel_actions": 7, "robot_obs": 15, "scene_obs": 24}
"""Per-frame low-dim vectors of a CALVIN frame and their lengths."""
STORED_NAMES: dict[str, str] = {"rel_actions": "action", "actions": "abs_action", "robot_obs": "state",
                                "scene_obs": "scene_obs"}
"""npz key -> stored column. ``action`` is the relative action (what S-VAM/VPP train on) and
``state`` the robot proprioception, the same roles these names have in every foresight dataset."""

RGB_KEYS = ("rgb_static", "rgb_gripper", "rgb_tactile")
FRAME_NAME = "episode_{:07d}.npz"
EP_IDS = "ep_start_end_ids.npy"
SCENE_INFO = "scene_info.npy"
STATISTICS = "statistics.yaml"
LANG_FILE = "auto_lang_ann.npy"
_NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


class CalvinOptions(FrameCodecOptions):
    """What to take from a CALVIN dataset folder."""

    splits: list[str] = Field(default=["training", "validation"], description="Split folders to ingest.")
    cameras: list[str] = Field(default=["rgb_static", "rgb_gripper"],
                               description="RGB keys of each frame to store (rgb_static, rgb_gripper, rgb_tactile).")
    depth: bool = Field(default=False, description="Also store depth_<x> for each rgb_<x> camera (24-bit packed).")
    lang_folder: str = Field(default="lang_annotations", description="Folder with auto_lang_ann.npy per split.")

    @field_validator("cameras")
    @classmethod
    def _known_cameras(cls, cameras: list[str]) -> list[str]:
        unknown = [c for c in cameras if c not in RGB_KEYS]
        if unknown or not cameras:
            raise ValueError(f"cameras {unknown or cameras}: choose from {', '.join(RGB_KEYS)}")
        return cameras


@dataclass
class CalvinScan:
    """Everything found in a CALVIN folder before reading frames."""

    episodes: list[dict[str, Any]]
    """Task descriptors: {split, start, end, scene} (ids inclusive, global)."""
    layout: SourceLayout
    segments: list[tuple[LanguageSegment, np.ndarray | None]]
    problems: list[IngestError] = field(default_factory=list)


def frame_keys(options: CalvinOptions) -> list[str]:
    """The npz keys holding images that this ingest reads."""
    keys = list(options.cameras)
    if options.depth:
        keys += ["depth_" + cam.removeprefix("rgb_") for cam in options.cameras]
    return keys


def episode_id(split: str, start: int) -> str:
    return f"{split}-{start:07d}"


def check_splits(src: str | Path, options: CalvinOptions) -> None:
    """ValueError naming the folder unless ``src`` holds every split folder of ``options`` (a usage
    error, found before anything is written)."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"{src}: CALVIN folder not found")
    for split in options.splits:
        if not (src / split).is_dir():
            raise ValueError(f"{src / split}: CALVIN split folder '{split}' not found")


def scan_calvin(src: str | Path, options: CalvinOptions) -> CalvinScan:
    """Read the index files of each split; bad index files become problems, not crashes."""
    src = Path(src)
    episodes: list[dict[str, Any]] = []
    segments: list[tuple[LanguageSegment, np.ndarray | None]] = []
    problems: list[IngestError] = []
    statistics: dict[str, Any] = {}
    check_splits(src, options)
    for split in options.splits:
        folder = src / split
        try:
            ranges = _episode_ranges(folder)
        except IngestError as err:
            problems.append(err)
            continue
        scenes = _scene_names(folder, ranges, problems)
        episodes += [{"split": split, "start": s, "end": e, "scene": scenes[i]} for i, (s, e) in enumerate(ranges)]
        segments += _language_segments(folder, split, ranges, options.lang_folder, problems)
        statistics[split] = _statistics(folder, problems)
    layout = _probe_layout(src, episodes, options)
    layout.extra["calvin_statistics"] = statistics
    return CalvinScan(episodes=episodes, layout=layout, segments=segments, problems=problems)


def _episode_ranges(folder: Path) -> list[tuple[int, int]]:
    """Rows of ep_start_end_ids.npy as inclusive (start, end) pairs, sorted by start."""
    path = folder / EP_IDS
    if not path.exists():
        raise IngestError(path, None, None, "file missing")
    try:
        ids = load_npy(path)
    except ValueError as err:
        raise IngestError(path, None, None, str(err).removeprefix(f"{path}: ")) from None
    if ids.ndim != 2 or ids.shape[1] != 2 or ids.dtype.kind not in "iu":
        raise IngestError(path, None, None, f"expected integer (N, 2), found {ids.dtype} {ids.shape}")
    ranges = sorted((int(s), int(e)) for s, e in ids)
    for (s, e), nxt in zip(ranges, ranges[1:] + [None]):
        if e < s or (nxt is not None and nxt[0] <= e):
            raise IngestError(path, episode_id(folder.name, s), None, f"bad or overlapping range [{s}, {e}]")
    return ranges


def _statistics(folder: Path, problems: list[IngestError]) -> Any:
    """CALVIN's own normalisation file, kept as metadata (plain YAML, read safely)."""
    path = folder / STATISTICS
    if not path.exists():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        problems.append(IngestError(path, None, None, f"invalid YAML ({' '.join(str(err).split())})"))
        return None


def _scene_names(folder: Path, ranges: list[tuple[int, int]], problems: list[IngestError]) -> list[str | None]:
    """Scene of each episode from scene_info.npy ({scene: [first_id, last_id]}), None if unknown."""
    path = folder / SCENE_INFO
    if not path.exists():
        return [None] * len(ranges)
    try:
        info = load_pickled_dict(path)
    except ValueError as err:
        problems.append(IngestError(path, None, None, str(err).removeprefix(f"{path}: ")))
        return [None] * len(ranges)
    try:
        bounds = {str(name): (int(ids[0]), int(ids[1])) for name, ids in info.items()}
    except (TypeError, ValueError, IndexError, KeyError) as err:
        problems.append(IngestError(path, None, None, f"expected {{scene: [first_id, last_id]}} ({err})"))
        return [None] * len(ranges)
    return [next((name for name, (lo, hi) in bounds.items() if lo <= start <= hi), None) for start, _ in ranges]


def _language_segments(folder: Path, split: str, ranges: list[tuple[int, int]], lang_folder: str,
                       problems: list[IngestError]) -> list[tuple[LanguageSegment, np.ndarray | None]]:
    """Language windows of one split as episode-relative inclusive segments (+ embedding)."""
    path = folder / lang_folder / LANG_FILE
    if not path.exists():
        log.info("%s: no language annotations", path)
        return []
    try:
        ann = load_pickled_dict(path)
        texts, tasks, windows = ann["language"]["ann"], ann["language"]["task"], ann["info"]["indx"]
        emb = ann["language"].get("emb")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        if isinstance(err, KeyError):
            problems.append(IngestError(path, None, str(err).strip("'"), "key missing"))
        else:
            problems.append(IngestError(path, None, None, str(err).removeprefix(f"{path}: ")))
        return []
    if not (len(texts) == len(tasks) == len(windows)) or (emb is not None and len(emb) != len(texts)):
        problems.append(IngestError(path, None, "language.ann", "ann, task, emb and info.indx lengths differ"))
        return []
    starts = np.array([s for s, _ in ranges], dtype=np.int64)
    out = []
    for i, (w_start, w_end) in enumerate(windows):
        k = int(np.searchsorted(starts, int(w_start), side="right")) - 1
        if k < 0 or int(w_end) > ranges[k][1] or int(w_end) < int(w_start):
            problems.append(IngestError(path, None, "info.indx", f"window {i} [{w_start}, {w_end}] lies in no episode"))
            continue
        segment = LanguageSegment(episode_id=episode_id(split, ranges[k][0]), start=int(w_start) - ranges[k][0],
                                  end=int(w_end) - ranges[k][0], task=str(tasks[i]), text=str(texts[i]))
        out.append((segment, None if emb is None else np.asarray(emb[i], dtype=np.float32).reshape(-1)))
    return out


def _probe_layout(src: Path, episodes: list[dict[str, Any]], options: CalvinOptions) -> SourceLayout:
    """Camera shapes from the first readable frame (later frames must match it)."""
    for desc in episodes:
        path = src / desc["split"] / FRAME_NAME.format(desc["start"])
        try:
            with np.load(path) as npz:
                shapes = {key: npz[key].shape for key in frame_keys(options)}
        except _NPZ_ERRORS:
            continue
        cameras = {}
        for key, shape in shapes.items():
            for name in _camera_names(key, shape):
                cameras[name] = [int(shape[0]), int(shape[1]), 3]
        storage = {name: depth_frame_storage(options) if name.startswith("depth_") else
                   resolve_frame_storage(options, "none", f"{src}, camera '{name}'") for name in cameras}
        return SourceLayout(fps=CALVIN_FPS, cameras=cameras, features=calvin_features(), frame_storage=storage,
                            extra={"frame_shapes": {k: list(v) for k, v in shapes.items()},
                                   "depth_scale_m": DEPTH_SCALE_M if options.depth else None,
                                   "source_columns": {v: k for k, v in STORED_NAMES.items()}})
    raise ValueError(f"{src}: no readable CALVIN frame found in splits {options.splits}")


def calvin_features() -> dict[str, FeatureSpec]:
    return {STORED_NAMES[key]: FeatureSpec(dtype="float32", shape=[size]) for key, size in LOWDIM_SHAPES.items()}


def _camera_names(key: str, shape: tuple[int, ...]) -> list[str]:
    """Store names for one npz image key: tactile keys hold two sensors and split in two."""
    channels = 1 if len(shape) == 2 else shape[2]
    per_camera = 1 if key.startswith("depth_") else 3
    count = channels // per_camera
    return [key] if count == 1 else [f"{key}_{i}" for i in range(count)]


def calvin_episode(src: str | Path, desc: dict[str, Any]) -> SourceEpisode:
    """Metadata of one CALVIN episode from its task descriptor."""
    folder = Path(src) / desc["split"]
    ids = range(desc["start"], desc["end"] + 1)
    return SourceEpisode(
        episode_id=episode_id(desc["split"], desc["start"]), split=desc["split"], task="play",
        length=len(ids), source_path=str(folder), files=[str(folder / FRAME_NAME.format(i)) for i in ids],
        extra={"start_id": desc["start"], "end_id": desc["end"], "scene": desc.get("scene")},
    )


def read_calvin_episode(src: str | Path, desc: dict[str, Any], options: CalvinOptions,
                        frame_shapes: dict[str, list[int]]) -> Iterator[FrameBlock | LowdimBlock]:
    """Stream one episode: per-camera blocks of READ_BLOCK frames, then the low-dim columns."""
    episode = calvin_episode(src, desc)
    folder = Path(src) / desc["split"]
    lowdim = {key: np.empty((episode.length, size), dtype=np.float32) for key, size in LOWDIM_SHAPES.items()}
    ids = range(desc["start"], desc["end"] + 1)
    for block in blocks_of(ids):
        images: dict[str, list[np.ndarray]] = {key: [] for key in frame_shapes}
        for frame_id in block:
            _read_frame(folder / FRAME_NAME.format(frame_id), episode.episode_id, frame_id - ids.start,
                        frame_shapes, images, lowdim)
        for key, frames in images.items():
            yield from _camera_blocks(key, np.stack(frames), folder, episode.episode_id)
    columns = {STORED_NAMES[key]: values for key, values in lowdim.items()}
    yield LowdimBlock(columns=columns, timestamps_T=np.arange(episode.length) / CALVIN_FPS)


def _read_frame(path: Path, episode: str, index: int, frame_shapes: dict[str, list[int]],
                images: dict[str, list[np.ndarray]], lowdim: dict[str, np.ndarray]) -> None:
    """Read one frame file into the image lists and row ``index`` of the low-dim arrays."""
    key = "<archive>"
    try:
        with np.load(path) as npz:
            for key, expected in frame_shapes.items():
                value = npz[key]
                want = "uint8" if key.startswith("rgb_") else "float32"
                if value.shape != tuple(expected) or value.dtype != want:
                    raise IngestError(path, episode, key, f"expected {want} {tuple(expected)}, "
                                      f"found {value.dtype} {value.shape}")
                images[key].append(value)
            for key, size in LOWDIM_SHAPES.items():
                value = npz[key]
                if value.shape != (size,) or value.dtype not in (np.float32, np.float64):
                    raise IngestError(path, episode, key, f"expected float32 or float64 ({size},), "
                                      f"found {value.dtype} {value.shape}")
                if not np.isfinite(value).all():
                    raise IngestError(path, episode, key, "NaN or inf")
                lowdim[key][index] = value
    except IngestError:
        raise
    except FileNotFoundError:
        raise IngestError(path, episode, None, "frame file missing") from None
    except KeyError:
        raise IngestError(path, episode, key, "key missing from the npz") from None
    except _NPZ_ERRORS as err:
        raise IngestError(path, episode, key, f"unreadable npz ({type(err).__name__}: {err})") from None


def _camera_blocks(key: str, stacked: np.ndarray, folder: Path, episode: str) -> Iterator[FrameBlock]:
    """Turn a stacked npz image block into store cameras (tactile split, depth packed)."""
    names = _camera_names(key, stacked.shape[1:])
    if key.startswith("depth_"):
        depth = stacked[..., None] if stacked.ndim == 3 else stacked
        for i, name in enumerate(names):
            try:
                yield FrameBlock(name, pack_depth_uint24(depth[..., i], DEPTH_SCALE_M))
            except ValueError as err:
                raise IngestError(folder, episode, key, str(err)) from None
        return
    for i, name in enumerate(names):
        yield FrameBlock(name, np.ascontiguousarray(stacked[..., 3 * i:3 * i + 3]))
