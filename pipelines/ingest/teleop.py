"""Teleoperation HDF5 reader (ALOHA, Mobile ALOHA, AgileX Cobot Magic): one ``episode_{idx}.hdf5`` per episode.

File layout (docs/REFERENCE.md, Teleop HDF5): attrs ``sim`` and ``compress`` (absent in the original ALOHA: False);
``/observations/{qpos,qvel,effort}``, ``/action``, ``/base_action``; images under
``/observations/images/<cam>``, either raw (T, H, W, 3) uint8 or JPEG bytes (T, padded_len)
zero-padded with ``/compress_len`` (n_cams, T); optional ``/observations/images_depth/<cam>`` uint16.

Fields the public recorders disagree on are optional (``OPTIONAL_FIELDS``): a file without one
ingests, and the episode is recorded as lacking it. JPEG frames are kept as the recorder wrote
them (``source-jpeg``, checked by their headers) unless another frame codec is asked for; then
they are decoded with ``cv2.imdecode(buf, 1)`` so the recorder's channel order is kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
import h5py
import numpy as np
from pydantic import Field

from foresight.pipelines.ingest.common import (
    ChunkBlock,
    FrameBlock,
    FrameCodecOptions,
    IngestError,
    LowdimBlock,
    SourceEpisode,
    SourceLayout,
    blocks_of,
    check_finite,
    depth_frame_storage,
    pack_depth_uint24,
    resolve_frame_storage,
)
from foresight.schemas.dataset import FeatureSpec, FrameStorage
from foresight.storage.frame_codecs import decode_jpeg, jpeg_size

EPISODE_FILE = re.compile(r"^episode_(\d+)\.hdf5$")
LOWDIM_PATHS: dict[str, str] = {
    "state": "observations/qpos",
    "qvel": "observations/qvel",
    "effort": "observations/effort",
    "action": "action",
    "base_action": "base_action",
}
"""Stored column name -> HDF5 dataset path. ``state`` is qpos (14 = per arm 6 joints + gripper), the
role the name has in every foresight dataset."""
REQUIRED_FIELDS = ("state", "action")
"""Every recorder writes qpos and action; a file without either is quarantined."""
OPTIONAL_FIELDS = ("qvel", "effort", "base_action")
"""Written by some recorders only: ACT's simulated episodes have no effort, only Mobile ALOHA and
AgileX write base_action, LeRobot's HDF5 conversions keep qpos and action alone. A column is
stored when any file of the dataset has it; episodes whose file lacks it are recorded as such."""
IMAGES = "observations/images"
IMAGES_DEPTH = "observations/images_depth"
DEPTH_SCALE = 1.0
"""uint16 depth is stored exactly, in the recorder's units (24-bit packing, scale 1)."""


class TeleopOptions(FrameCodecOptions):
    """How to interpret a folder of teleoperation HDF5 episodes."""

    fps: float = Field(default=50.0, gt=0, description="Recording rate (ALOHA 50 Hz, AgileX 30 Hz).")
    instruction: str | None = Field(default=None, description="Instruction text shared by every episode.")
    task: str | None = Field(default=None, description="Task name; defaults to the source folder name.")


def list_episode_files(src: str | Path) -> list[Path]:
    """``episode_{idx}.hdf5`` files of a folder, in numeric index order."""
    src = Path(src)
    if not src.is_dir():
        raise ValueError(f"{src}: teleop source folder not found")
    files = [p for p in src.iterdir() if EPISODE_FILE.match(p.name)]
    if not files:
        raise ValueError(f"{src}: no episode_*.hdf5 files")
    return sorted(files, key=lambda p: int(EPISODE_FILE.match(p.name).group(1)))


def episode_id_of(path: str | Path) -> str:
    return f"episode_{int(EPISODE_FILE.match(Path(path).name).group(1))}"


def _open(path: Path, episode: str) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise IngestError(path, episode, None, f"unreadable HDF5 ({err})") from None


def probe_layout(files: list[Path], options: TeleopOptions) -> tuple[SourceLayout, list[IngestError]]:
    """Cameras and frame storage from the first readable file, low-dim features from every file
    (an optional field is a feature when any file has it); unreadable files are problems."""
    problems: list[IngestError] = []
    layout: SourceLayout | None = None
    for path in files:
        try:
            with _open(path, episode_id_of(path)) as h5:
                if layout is None:
                    layout = _layout_of(h5, path, options)
                else:
                    _add_optional_features(h5, layout.features)
        except IngestError as err:
            problems.append(err)
    if layout is None:
        raise ValueError(f"{files[0].parent}: no readable episode_*.hdf5 file")
    return layout, problems


def _add_optional_features(h5: h5py.File, features: dict[str, FeatureSpec]) -> None:
    for name in OPTIONAL_FIELDS:
        if name not in features and LOWDIM_PATHS[name] in h5:
            features[name] = FeatureSpec(dtype="float32", shape=list(h5[LOWDIM_PATHS[name]].shape[1:]))


def _layout_of(h5: h5py.File, path: Path, options: TeleopOptions) -> SourceLayout:
    episode = episode_id_of(path)
    for name in REQUIRED_FIELDS:
        if LOWDIM_PATHS[name] not in h5:
            raise IngestError(path, episode, LOWDIM_PATHS[name], "dataset missing")
    features = {name: FeatureSpec(dtype="float32", shape=list(h5[p].shape[1:]))
                for name, p in LOWDIM_PATHS.items() if p in h5}
    compressed = bool(h5.attrs.get("compress", False))
    cameras: dict[str, list[int]] = {}
    for cam in _camera_names(h5, IMAGES):
        dataset = h5[f"{IMAGES}/{cam}"]
        shape = _decode_jpeg(dataset[0], path, episode, cam, 0).shape if compressed else dataset.shape[1:]
        cameras[cam] = [int(shape[0]), int(shape[1]), 3]
    for cam in _camera_names(h5, IMAGES_DEPTH):
        shape = h5[f"{IMAGES_DEPTH}/{cam}"].shape
        cameras[f"{cam}_depth"] = [int(shape[1]), int(shape[2]), 3]
    if not cameras:
        raise IngestError(path, episode, IMAGES, "no cameras")
    storage = {cam: depth_frame_storage(options) if cam.endswith("_depth") else
               resolve_frame_storage(options, "jpeg" if compressed else "none", f"{path.parent}, camera '{cam}'")
               for cam in cameras}
    return SourceLayout(fps=options.fps, cameras=cameras, features=features, frame_storage=storage,
                        extra={"sim": bool(h5.attrs.get("sim", False)), "compress": compressed,
                               "depth_scale": DEPTH_SCALE})


def _camera_names(h5: h5py.File, group: str) -> list[str]:
    """Camera datasets of a group in file order (h5py lists them by name)."""
    if group not in h5:
        return []
    return [name for name, item in h5[group].items() if isinstance(item, h5py.Dataset)]


def teleop_episode(path: str | Path, options: TeleopOptions) -> SourceEpisode:
    """Metadata of one HDF5 episode (opens the file; raises IngestError when unreadable)."""
    path = Path(path)
    episode = episode_id_of(path)
    with _open(path, episode) as h5:
        if "observations/qpos" not in h5:
            raise IngestError(path, episode, "observations/qpos", "dataset missing")
        length = int(h5["observations/qpos"].shape[0])
        sim = bool(h5.attrs.get("sim", False))
    return SourceEpisode(
        episode_id=episode, split="train", task=options.task or path.parent.name, length=length,
        source_path=str(path), files=[str(path)],
        instructions=[options.instruction] if options.instruction else [],
        extra={"sim": sim},
    )


def read_teleop_episode(path: str | Path, layout: SourceLayout
                        ) -> Iterator[FrameBlock | ChunkBlock | LowdimBlock]:
    """Stream one HDF5 episode: every camera block by block, then the low-dim columns.

    JPEG cameras stored ``source-jpeg`` come as ``ChunkBlock`` of the recorder's bytes; the
    others as decoded ``FrameBlock``.
    """
    path = Path(path)
    episode = episode_id_of(path)
    with _open(path, episode) as h5:
        length = int(h5["observations/qpos"].shape[0])
        columns, absent = _read_lowdim(h5, path, episode, layout, length)
        compressed = bool(h5.attrs.get("compress", False))
        cams = _camera_names(h5, IMAGES)
        _check_cameras(cams, _camera_names(h5, IMAGES_DEPTH), layout, path, episode)
        table = _compress_table(h5, len(cams), length, path, episode) if compressed else None
        for order, cam in enumerate(cams):
            dataset = h5[f"{IMAGES}/{cam}"]
            if len(dataset) != length:
                raise IngestError(path, episode, f"{IMAGES}/{cam}", f"{len(dataset)} frames but qpos has {length}")
            keep = layout.frame_storage.get(cam, FrameStorage(codec="raw")).codec == "source-jpeg"
            if table is None:
                if keep:
                    raise IngestError(path, episode, f"{IMAGES}/{cam}", "raw frames, but the dataset keeps JPEG "
                                      "frames as recorded (other files are compressed); use --frame-codec raw")
                yield from _raw_blocks(dataset, layout.cameras[cam], path, episode, cam)
                continue
            lengths_T = np.zeros(length, dtype=np.int64)
            read = _jpeg_chunks if keep else _jpeg_blocks
            yield from read(dataset, layout.cameras[cam], path, episode, cam, lengths_T)
            check_compress_row(table, order, lengths_T, path, episode, cam)
        for cam in _camera_names(h5, IMAGES_DEPTH):
            yield from _depth_blocks(h5[f"{IMAGES_DEPTH}/{cam}"], length, path, episode, cam)
    yield LowdimBlock(columns=columns, timestamps_T=np.arange(length) / layout.fps, absent=absent)


def _read_lowdim(h5: h5py.File, path: Path, episode: str, layout: SourceLayout, length: int
                 ) -> tuple[dict[str, np.ndarray], list[str]]:
    """The episode's low-dim columns, and the optional features its file lacks."""
    columns, absent = {}, []
    for name, spec in layout.features.items():
        hdf_path = LOWDIM_PATHS[name]
        if hdf_path not in h5:
            if name in OPTIONAL_FIELDS:
                absent.append(name)
                continue
            raise IngestError(path, episode, hdf_path, "dataset missing")
        values = h5[hdf_path][()]
        if values.ndim != 2 or list(values.shape[1:]) != spec.shape or values.dtype.kind not in "fiu":
            raise IngestError(path, episode, hdf_path, f"expected numeric (T, {spec.shape[0]}), "
                              f"found {values.dtype} {values.shape}")
        if len(values) != length:
            raise IngestError(path, episode, hdf_path, f"{len(values)} steps but observations/qpos has {length}")
        check_finite(values, str(path), episode, hdf_path)
        columns[name] = values.astype(np.float32)
    return columns, absent


def _check_cameras(cams: list[str], depth_cams: list[str], layout: SourceLayout, path: Path, episode: str) -> None:
    found = set(cams) | {f"{c}_depth" for c in depth_cams}
    if found != set(layout.cameras):
        raise IngestError(path, episode, IMAGES, f"cameras {sorted(found)} differ from the dataset's "
                          f"{sorted(layout.cameras)}")


def _raw_blocks(dataset: h5py.Dataset, shape: list[int], path: Path, episode: str, cam: str) -> Iterator[FrameBlock]:
    if dataset.dtype != np.uint8 or list(dataset.shape[1:]) != shape:
        raise IngestError(path, episode, f"{IMAGES}/{cam}", f"expected uint8 (T, {shape[0]}, {shape[1]}, 3), "
                          f"found {dataset.dtype} {dataset.shape}")
    for block in blocks_of(range(len(dataset))):
        yield FrameBlock(cam, dataset[block.start:block.stop])


def _depth_blocks(dataset: h5py.Dataset, length: int, path: Path, episode: str, cam: str) -> Iterator[FrameBlock]:
    field = f"{IMAGES_DEPTH}/{cam}"
    if dataset.ndim != 3 or dataset.dtype.kind not in "ui" or len(dataset) != length:
        raise IngestError(path, episode, field, f"expected integer depth ({length}, H, W), "
                          f"found {dataset.dtype} {dataset.shape}")
    for block in blocks_of(range(length)):
        try:
            yield FrameBlock(f"{cam}_depth", pack_depth_uint24(dataset[block.start:block.stop], DEPTH_SCALE))
        except ValueError as err:
            raise IngestError(path, episode, field, str(err)) from None


def jpeg_lengths(buffers_TL: np.ndarray) -> np.ndarray:
    """Byte length of each zero-padded JPEG: a JPEG ends with the EOI marker FF D9, never with 0."""
    nonzero = buffers_TL != 0
    last = buffers_TL.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, 0)


def _compress_table(h5: h5py.File, n_cams: int, length: int, path: Path, episode: str) -> np.ndarray:
    """``/compress_len`` as integers (n_cams, T); h5py writes it as float32 by default."""
    if "compress_len" not in h5:
        raise IngestError(path, episode, "compress_len", "dataset missing in a compressed file")
    table = h5["compress_len"][()]
    if table.shape != (n_cams, length):
        raise IngestError(path, episode, "compress_len", f"shape {table.shape}, expected {(n_cams, length)}")
    return np.rint(table).astype(np.int64)


def check_compress_row(table: np.ndarray, order: int, lengths_T: np.ndarray, path: Path, episode: str,
                       cam: str) -> None:
    """Check that some row of ``/compress_len`` gives this camera's JPEG lengths.

    Rows follow the recorder's camera list, which h5py's by-name listing may not reproduce, so
    the camera's own row in file order is tried first, then the others.
    """
    candidates = [order] + [r for r in range(len(table)) if r != order]
    if any(np.array_equal(table[r], lengths_T) for r in candidates):
        return
    frame = int(np.flatnonzero(table[order] != lengths_T)[0])
    raise IngestError(path, episode, "compress_len", f"camera '{cam}' frame {frame}: JPEG is "
                      f"{lengths_T[frame]} bytes but compress_len says {table[order, frame]}")


def _decode_jpeg(buffer: np.ndarray, path: Path, episode: str, cam: str, frame: int) -> np.ndarray:
    image = decode_jpeg(np.ascontiguousarray(buffer))
    if image is None:
        raise IngestError(path, episode, f"{IMAGES}/{cam}", f"frame {frame}: corrupt JPEG")
    return image


def _jpeg_buffers(dataset: h5py.Dataset, path: Path, episode: str, cam: str,
                  lengths_T: np.ndarray) -> Iterator[tuple[range, np.ndarray]]:
    """The padded JPEG buffers block by block; fills ``lengths_T`` with every frame's JPEG length."""
    if dataset.dtype != np.uint8 or dataset.ndim != 2:
        raise IngestError(path, episode, f"{IMAGES}/{cam}", f"expected uint8 (T, padded_len) JPEG bytes, "
                          f"found {dataset.dtype} {dataset.shape}")
    for block in blocks_of(range(len(dataset))):
        buffers = dataset[block.start:block.stop]
        lengths_T[block.start:block.stop] = jpeg_lengths(buffers)
        yield block, buffers


def _jpeg_blocks(dataset: h5py.Dataset, shape: list[int], path: Path, episode: str, cam: str,
                 lengths_T: np.ndarray) -> Iterator[FrameBlock]:
    """Decode JPEG frames block by block from each frame's own bytes (not the zero padding).

    Fills ``lengths_T`` with every frame's JPEG length, for the ``/compress_len`` check.
    """
    for block, buffers in _jpeg_buffers(dataset, path, episode, cam, lengths_T):
        frames = np.empty((len(block), *shape), dtype=np.uint8)
        for i, t in enumerate(block):
            image = _decode_jpeg(buffers[i, :lengths_T[t]], path, episode, cam, t)
            if list(image.shape) != shape:
                raise IngestError(path, episode, f"{IMAGES}/{cam}", f"frame {t}: decoded {image.shape}, "
                                  f"expected {tuple(shape)}")
            frames[i] = image
        yield FrameBlock(cam, frames)


def _jpeg_chunks(dataset: h5py.Dataset, shape: list[int], path: Path, episode: str, cam: str,
                 lengths_T: np.ndarray) -> Iterator[ChunkBlock]:
    """The recorder's JPEG bytes block by block, unchanged, each checked by its header.

    A frame whose bytes are not a whole JPEG (no start or end marker, no frame header) or whose
    header gives another size or fewer than 3 components is corrupt. Fills ``lengths_T``.
    """
    for block, buffers in _jpeg_buffers(dataset, path, episode, cam, lengths_T):
        payloads = []
        for i, t in enumerate(block):
            data = buffers[i, :lengths_T[t]]
            try:
                height, width, components = jpeg_size(data)
            except ValueError as err:
                raise IngestError(path, episode, f"{IMAGES}/{cam}", f"frame {t}: corrupt JPEG ({err})") from None
            if [height, width] != shape[:2] or components != 3:
                raise IngestError(path, episode, f"{IMAGES}/{cam}", f"frame {t}: JPEG is {height}x{width} with "
                                  f"{components} components, expected {shape[0]}x{shape[1]} colour")
            payloads.append(data.tobytes())
        yield ChunkBlock(cam, payloads, len(payloads), (shape[0], shape[1], 3))
