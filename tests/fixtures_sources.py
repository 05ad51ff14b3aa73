"""Generators of small, faithful copies of the source formats ingest reads (tests and benchmark).

- CALVIN: a split folder of per-frame ``np.savez_compressed`` files with float64 vectors and the
  real key names and image shapes, global ids (the debug set starts at 358482), pickled
  ``scene_info.npy`` and ``lang_annotations/auto_lang_ann.npy``, ``statistics.yaml``.
- Teleop HDF5: ALOHA-style ``episode_{idx}.hdf5`` with raw or JPEG-compressed images (zero-padded,
  ``/compress_len`` in the recorder's camera order, float32 as h5py writes it by default); every
  frame carries PATCH_COLOR at PATCH so the channel order can be checked.
- LeRobot: v3.0 (episodes share one data parquet and one mp4) and v2.1 (one of each per episode).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import av
import cv2
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

CALVIN_DEBUG_START = 358482
CALVIN_IMAGE_SHAPES = {
    "rgb_static": (200, 200, 3), "rgb_gripper": (84, 84, 3), "rgb_tactile": (160, 120, 6),
    "depth_static": (200, 200), "depth_gripper": (84, 84), "depth_tactile": (160, 120, 2),
}
CALVIN_VECTORS = {"actions": 7, "rel_actions": 7, "robot_obs": 15, "scene_obs": 24}

PATCH = (slice(16, 32), slice(16, 32))
"""Aligned to 16x16 JPEG MCUs so chroma subsampling keeps its colour."""
PATCH_COLOR = np.array([200, 30, 10], dtype=np.uint8)
"""Colour of the patch in the recorder's channel order; a decoder that swaps R and B gives 10, 30, 200."""
ALOHA_CAMERAS = ("cam_high", "cam_low", "cam_left_wrist", "cam_right_wrist")


# CALVIN ------------------------------------------------------------------------------------------
def calvin_vectors(frame_id: int) -> dict[str, np.ndarray]:
    """The float64 low-dim vectors of one frame: a smooth function of the global id."""
    phase = (frame_id - CALVIN_DEBUG_START) * 0.05
    out = {}
    for offset, (key, size) in enumerate(CALVIN_VECTORS.items()):
        values = np.sin(phase + np.arange(size) * 0.3 + offset)
        out[key] = np.clip(values, -1, 1) if key == "rel_actions" else values
    return {k: v.astype(np.float64) for k, v in out.items()}


def calvin_image(key: str, frame_id: int) -> np.ndarray:
    """A smooth frame whose pixel (0, 0) encodes the frame id: (id % 251, id // 251 % 251, k)."""
    shape = CALVIN_IMAGE_SHAPES[key]
    h, w = shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    if key.startswith("depth_"):
        depth = 0.5 + 0.001 * (yy + xx) + 0.0001 * (frame_id % 100)
        return np.repeat(depth[..., None], shape[2], axis=2).astype(np.float32) if len(shape) == 3 \
            else depth.astype(np.float32)
    image = np.empty(shape, dtype=np.uint8)
    for c in range(shape[2]):
        image[..., c] = (xx * (c + 1) + yy * 2 + frame_id) % 256
    image[0, 0, :3] = [frame_id % 251, frame_id // 251 % 251, list(CALVIN_IMAGE_SHAPES).index(key)]
    return image


def write_calvin_frame(folder: Path, frame_id: int) -> None:
    arrays = {**calvin_vectors(frame_id), **{k: calvin_image(k, frame_id) for k in CALVIN_IMAGE_SHAPES}}
    np.savez_compressed(folder / f"episode_{frame_id:07d}.npz", **arrays)


def make_calvin_split(folder: Path, ranges: Sequence[tuple[int, int]],
                      windows: Sequence[tuple[int, int, str, str]] = (), lang_folder: str = "lang_annotations",
                      scene: str = "calvin_scene_D") -> Path:
    """Write one CALVIN split folder: frames of every inclusive range, index and annotation files."""
    folder.mkdir(parents=True, exist_ok=True)
    for start, end in ranges:
        for frame_id in range(start, end + 1):
            write_calvin_frame(folder, frame_id)
    np.save(folder / "ep_start_end_ids.npy", np.array(ranges, dtype=np.int64))
    np.save(folder / "ep_lens.npy", np.array([e - s + 1 for s, e in ranges], dtype=np.int64))
    np.save(folder / "scene_info.npy", {scene: [ranges[0][0], ranges[-1][1]]}, allow_pickle=True)
    _write_calvin_statistics(folder)
    (folder / ".hydra").mkdir(exist_ok=True)
    (folder / ".hydra" / "config.yaml").write_text("cameras:\n  static: {width: 200, height: 200}\n")
    if windows:
        write_calvin_language(folder / lang_folder, windows)
    return folder


def write_calvin_language(folder: Path, windows: Sequence[tuple[int, int, str, str]]) -> None:
    """auto_lang_ann.npy: language.{ann, task, emb (N, 1, 384)}, info.{indx, episodes}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    annotations = {
        "language": {"ann": [w[3] for w in windows], "task": [w[2] for w in windows],
                     "emb": rng.normal(size=(len(windows), 1, 384)).astype(np.float32)},
        "info": {"episodes": [], "indx": [(int(w[0]), int(w[1])) for w in windows]},
    }
    np.save(folder / "auto_lang_ann.npy", annotations, allow_pickle=True)


def _write_calvin_statistics(folder: Path) -> None:
    stats = {
        "robot_obs": [{"_target_": "calvin_agent.utils.transforms.NormalizeVector",
                       "mean": [0.0] * 15, "std": [1.0] * 15}],
        "scene_obs": [{"_target_": "calvin_agent.utils.transforms.NormalizeVector",
                       "mean": [0.0] * 24, "std": [1.0] * 24}],
        "act_min_bound": [-0.432188, -0.545456, 0.293439, -3.141593, -0.811348, -3.141573, -1.0],
        "act_max_bound": [0.42977, 0.139396, 0.796262, 3.141592, 0.638583, 3.141551, 1.0],
    }
    (folder / "statistics.yaml").write_text(yaml.safe_dump(stats))


def make_calvin_dataset(root: Path, lengths: Sequence[int] = (70, 6), gap: int = 3) -> dict:
    """A ``training`` split (two episodes from id 358482, language windows) and a ``validation``
    split (one episode with ids far from 0). Returns what was written, for assertions."""
    ranges, start = [], CALVIN_DEBUG_START
    for length in lengths:
        ranges.append((start, start + length - 1))
        start += length + gap
    windows = [(ranges[0][0] + 2, ranges[0][0] + 40, "open_drawer", "pull the handle to open the drawer"),
               (ranges[1][0], ranges[1][1], "lift_red_block_table", "pick up the red block")]
    make_calvin_split(root / "training", ranges, windows)
    val_ranges = [(553567, 553567 + 4)]
    make_calvin_split(root / "validation", val_ranges,
                      [(553567, 553570, "push_blue_block_left", "slide the blue block to the left")])
    return {"training": ranges, "validation": val_ranges, "windows": windows}


# Teleop HDF5 -------------------------------------------------------------------------------------
def teleop_frame(cam_index: int, t: int, size: tuple[int, int]) -> np.ndarray:
    """A frame in the recorder's channel order with PATCH_COLOR at PATCH; texture differs by camera."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    frame = np.stack([(xx * 3 + t) % 256, (yy * 3 + 40 * cam_index) % 256, (xx + yy) % 256], axis=-1)
    rng = np.random.default_rng(cam_index * 1000 + t)
    frame = frame + rng.integers(0, 4 + 12 * cam_index, size=frame.shape)
    frame = np.clip(frame, 0, 255).astype(np.uint8)
    frame[PATCH] = PATCH_COLOR
    return frame


def teleop_vectors(t_count: int, dim: int, seed: int) -> np.ndarray:
    t = np.arange(t_count)[:, None]
    return np.sin(0.1 * t + np.arange(dim)[None, :] + seed).astype(np.float32)


def make_teleop_episode(path: Path, length: int = 10, cameras: Sequence[str] = ALOHA_CAMERAS,
                        size: tuple[int, int] = (48, 64), compress: bool | None = False, sim: bool = False,
                        effort: bool = True, base_action: bool = False, depth: bool = False) -> Path:
    """Write one ALOHA-style episode; ``compress=None`` omits the attribute like the original ALOHA."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = {cam: np.stack([teleop_frame(i, t, size) for t in range(length)]) for i, cam in enumerate(cameras)}
    with h5py.File(path, "w") as root:
        root.attrs["sim"] = sim
        if compress is not None:
            root.attrs["compress"] = compress
        obs = root.create_group("observations")
        images = obs.create_group("images")
        obs.create_dataset("qpos", data=teleop_vectors(length, 14, 0))
        obs.create_dataset("qvel", data=teleop_vectors(length, 14, 1))
        if effort:
            obs.create_dataset("effort", data=teleop_vectors(length, 14, 2))
        root.create_dataset("action", data=teleop_vectors(length, 14, 3))
        if base_action:
            root.create_dataset("base_action", data=teleop_vectors(length, 2, 4))
        if compress:
            _write_jpeg_cameras(root, images, frames, cameras, length)
        else:
            for cam in cameras:
                images.create_dataset(cam, data=frames[cam], chunks=(1, *frames[cam].shape[1:]))
        if depth:
            depth_group = obs.create_group("images_depth")
            for i, cam in enumerate(cameras):
                depth_group.create_dataset(cam, data=(np.arange(length)[:, None, None] * 100 + i * 7
                                                      + np.zeros((1, *size))).astype(np.uint16))
    return path


def _write_jpeg_cameras(root: h5py.File, images: h5py.Group, frames: dict[str, np.ndarray],
                        cameras: Sequence[str], length: int) -> None:
    """As the ALOHA recorder: cv2.imencode each frame, pad to the longest, lengths per camera row."""
    encoded = {cam: [cv2.imencode(".jpg", frame, [int(cv2.IMWRITE_JPEG_QUALITY), 90])[1] for frame in frames[cam]]
               for cam in cameras}
    padded = max(len(buf) for bufs in encoded.values() for buf in bufs)
    for cam in cameras:
        data = np.zeros((length, padded), dtype=np.uint8)
        for t, buf in enumerate(encoded[cam]):
            data[t, :len(buf)] = buf.reshape(-1)
        images.create_dataset(cam, data=data, chunks=(1, padded))
    compress_len = root.create_dataset("compress_len", (len(cameras), length), dtype="f4")
    compress_len[...] = [[len(buf) for buf in encoded[cam]] for cam in cameras]


# LeRobot -----------------------------------------------------------------------------------------
LEROBOT_FPS = 10
LEROBOT_SIZE = (48, 64)
LEROBOT_TASKS = ["pick up the cube", "put the cube in the bowl"]
LEROBOT_CAMERA = "observation.images.top"


def lerobot_frame(global_index: int, size: tuple[int, int] = LEROBOT_SIZE) -> np.ndarray:
    """Flat colour blocks (robust to yuv420p): left half grey = 8 * index, right half pure red."""
    h, w = size
    frame = np.zeros((h, w, 3), dtype=np.uint8)
    frame[:, : w // 2] = (8 * global_index) % 256
    frame[:, w // 2:] = [220, 20, 20]
    return frame


def write_mp4(path: Path, frames_THWC: np.ndarray, fps: int) -> None:
    """Encode RGB frames as H.264 (yuv420p) with PyAV, one frame per 1/fps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames_THWC.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "g": "2"}
        for image in frames_THWC:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _lerobot_features(size: tuple[int, int], fps: int) -> dict:
    video_info = {"video.fps": float(fps), "video.height": size[0], "video.width": size[1], "video.channels": 3,
                  "video.codec": "h264", "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "has_audio": False}
    return {
        "action": {"dtype": "float32", "shape": [6], "names": {"motors": [f"m{i}" for i in range(6)]}},
        "observation.state": {"dtype": "float32", "shape": [6], "names": [f"j{i}" for i in range(6)]},
        LEROBOT_CAMERA: {"dtype": "video", "shape": [size[0], size[1], 3], "names": ["height", "width", "channels"],
                         "info": video_info},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }


def lerobot_vectors(global_index: np.ndarray, seed: int) -> np.ndarray:
    return np.cos(0.2 * global_index[:, None] + np.arange(6)[None, :] + seed).astype(np.float32)


def _frame_table(episode: int, length: int, first_index: int, task_of_frame: Sequence[int]) -> pa.Table:
    index = np.arange(first_index, first_index + length)
    vec = pa.list_(pa.float32(), 6)
    return pa.table({
        "action": pa.array(list(lerobot_vectors(index, 0)), type=vec),
        "observation.state": pa.array(list(lerobot_vectors(index, 1)), type=vec),
        "timestamp": pa.array(np.arange(length, dtype=np.float32) / LEROBOT_FPS),
        "frame_index": pa.array(np.arange(length, dtype=np.int64)),
        "episode_index": pa.array(np.full(length, episode, dtype=np.int64)),
        "index": pa.array(index.astype(np.int64)),
        "task_index": pa.array(np.asarray(task_of_frame, dtype=np.int64)),
    })


def _info(version: str, lengths: Sequence[int], size: tuple[int, int]) -> dict:
    info = {"codebase_version": version, "robot_type": "so100", "total_episodes": len(lengths),
            "total_frames": int(sum(lengths)), "total_tasks": len(LEROBOT_TASKS), "chunks_size": 1000,
            "fps": LEROBOT_FPS, "splits": {"train": f"0:{len(lengths)}"},
            "features": _lerobot_features(size, LEROBOT_FPS)}
    if version == "v3.0":
        info.update(data_files_size_in_mb=100, video_files_size_in_mb=500,
                    data_path="data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                    video_path="videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4")
    else:
        info.update(total_chunks=1, total_videos=len(lengths),
                    data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                    video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4")
    return info


def _task_runs(length: int, episode: int) -> list[int]:
    """Episode 0 switches task halfway (two language segments); others keep task 0."""
    if episode != 0:
        return [0] * length
    return [0 if t < length // 2 else 1 for t in range(length)]


def make_lerobot_v3(root: Path, lengths: Sequence[int] = (12, 9), size: tuple[int, int] = LEROBOT_SIZE) -> Path:
    """Two (or more) episodes in one data parquet and one mp4, located by timestamps."""
    (root / "meta").mkdir(parents=True, exist_ok=True)
    tables, rows, first = [], [], 0
    for ep, length in enumerate(lengths):
        tasks = _task_runs(length, ep)
        tables.append(_frame_table(ep, length, first, tasks))
        rows.append(_episode_row_v3(ep, length, first, sorted(set(tasks))))
        first += length
    data_path = root / "data/chunk-000/file-000.parquet"
    data_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(tables), data_path)
    write_mp4(root / f"videos/{LEROBOT_CAMERA}/chunk-000/file-000.mp4",
              np.stack([lerobot_frame(i, size) for i in range(first)]), LEROBOT_FPS)
    episodes_path = root / "meta/episodes/chunk-000/file-000.parquet"
    episodes_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), episodes_path)
    _write_tasks_parquet(root / "meta/tasks.parquet")
    (root / "meta/info.json").write_text(json.dumps(_info("v3.0", lengths, size), indent=4))
    (root / "meta/stats.json").write_text(json.dumps({"action": {"mean": [0.0] * 6, "std": [1.0] * 6}}))
    return root


def _episode_row_v3(ep: int, length: int, first: int, task_ids: list[int]) -> dict:
    key = f"videos/{LEROBOT_CAMERA}"
    return {"episode_index": ep, "tasks": [LEROBOT_TASKS[t] for t in task_ids], "length": length,
            "data/chunk_index": 0, "data/file_index": 0, "dataset_from_index": first,
            "dataset_to_index": first + length, f"{key}/chunk_index": 0, f"{key}/file_index": 0,
            f"{key}/from_timestamp": first / LEROBOT_FPS, f"{key}/to_timestamp": (first + length) / LEROBOT_FPS,
            "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
            "stats/action/mean": [0.0] * 6, "stats/action/count": [length]}


def _write_tasks_parquet(path: Path) -> None:
    """As pandas ``DataFrame({"task_index": ...}, index=tasks).to_parquet``: the index is a column."""
    table = pa.table({"task_index": pa.array(range(len(LEROBOT_TASKS)), type=pa.int64()),
                      "__index_level_0__": pa.array(LEROBOT_TASKS)})
    pandas_meta = {"index_columns": ["__index_level_0__"], "column_indexes": [], "columns": [
        {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
         "metadata": None},
        {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object",
         "metadata": None}], "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3"}
    pq.write_table(table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()}), path)


def make_lerobot_v21(root: Path, lengths: Sequence[int] = (8, 7), size: tuple[int, int] = LEROBOT_SIZE) -> Path:
    """One parquet and one mp4 per episode, episodes.jsonl and tasks.jsonl."""
    (root / "meta").mkdir(parents=True, exist_ok=True)
    first, episodes = 0, []
    for ep, length in enumerate(lengths):
        tasks = _task_runs(length, ep)
        path = root / f"data/chunk-000/episode_{ep:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_frame_table(ep, length, first, tasks), path)
        write_mp4(root / f"videos/chunk-000/{LEROBOT_CAMERA}/episode_{ep:06d}.mp4",
                  np.stack([lerobot_frame(first + t, size) for t in range(length)]), LEROBOT_FPS)
        episodes.append({"episode_index": ep, "tasks": [LEROBOT_TASKS[t] for t in sorted(set(tasks))],
                         "length": length})
        first += length
    (root / "meta/episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    (root / "meta/tasks.jsonl").write_text("".join(json.dumps({"task_index": i, "task": t}) + "\n"
                                                   for i, t in enumerate(LEROBOT_TASKS)))
    (root / "meta/info.json").write_text(json.dumps(_info("v2.1", lengths, size), indent=4))
    return root
