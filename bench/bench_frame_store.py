"""Frame codecs against the source: store bytes, ingest speed and clip-read speed, same data, same run.

Two sources, each ingested once per frame codec through the real ingest (``ingest_lerobot`` /
``ingest_teleop``, no orchestrator), timed against a bare decode of the same frames in the same run:

- LeRobot v3.0, written by ``lerobot`` 0.4.4 itself (AV1, g=2, crf 30; checked in under
  ``bench/data/``, see ``bench/make_lerobot_recording.py``). Bare decode: PyAV, the whole mp4 to RGB.
  Clip baseline: PyAV on an open container, seek to the keyframe before the clip, decode its frames.
- A teleop HDF5 written as the ALOHA recorder does with ``compress=True`` (``cv2.imencode`` q90,
  zero-padded, ``compress_len``), 480x640, 3 cameras. Bare decode: h5py read + ``cv2.imdecode``.

Figures: store bytes / source bytes (the whole dataset folder against the whole source folder, and
the frame arrays against the source's frame bytes), ingest frames/s / bare-decode frames/s, and
16-frame clip reads (random starts, fixed seed) frames/s / bare decode of the same frames. Every
clip read is checked equal to its bare decode (pass-through and lossless codecs). Best of
``--repeats`` for every timing.

    python bench/bench_frame_store.py [--lerobot bench/data/lerobot_v30_av1_96x128] [--episodes 2]
        [--frames 60] [--clips 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import av  # noqa: E402
import cv2  # noqa: E402
import h5py  # noqa: E402

from foresight.flows.ingest_sources import ingest_lerobot, ingest_teleop  # noqa: E402
from foresight.pipelines.ingest import lerobot, teleop  # noqa: E402
from foresight.storage.episodes import EpisodeStore  # noqa: E402

HERE = Path(__file__).resolve().parent
CLIP = 16
TELEOP_CAMERAS = ("cam_high", "cam_left_wrist", "cam_right_wrist")


def best(fn, repeats: int, setup=None) -> tuple[float, object]:
    """Fastest wall time of ``repeats`` calls (``setup`` run untimed before each), and the last result."""
    times, result = [], None
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def best_pair(ours, bare, repeats: int, setup=None) -> tuple[float, float, object, object]:
    """Fastest times of ``ours`` and ``bare`` called alternately (load drifts hit both alike)."""
    ours_s, bare_s, ours_out, bare_out = [], [], None, None
    for _ in range(repeats):
        t, ours_out = best(ours, 1, setup)
        ours_s.append(t)
        t, bare_out = best(bare, 1)
        bare_s.append(t)
    return min(ours_s), min(bare_s), ours_out, bare_out


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def frame_array_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("frames.zarr/*/c/*/*/*/*") if p.is_file())


# LeRobot -----------------------------------------------------------------------------------------
def lerobot_mp4(src: Path) -> Path:
    [path] = sorted(src.glob("videos/*/chunk-*/file-*.mp4"))
    return path


def pyav_decode_all(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])


def pyav_clips(path: Path, starts: list[float], fps: float) -> list[np.ndarray]:
    """Bare clip decode: seek to the keyframe at or before each clip, decode its CLIP frames."""
    clips = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for start in starts:
            container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
            frames = []
            for frame in container.decode(stream):
                if frame.time < start - 0.5 / fps:
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == CLIP:
                    break
            clips.append(np.stack(frames))
    return clips


def bench_lerobot(src: Path, work: Path, clips: int, repeats: int) -> list[dict]:
    mp4 = lerobot_mp4(src)
    meta = lerobot.load_meta(src)
    total = sum(int(row["length"]) for row in meta.episodes.values())
    decoded = pyav_decode_all(mp4)
    rng = np.random.default_rng(0)
    key = meta.camera_keys[0]
    picks = []
    for _ in range(clips):
        ep = int(rng.choice(sorted(meta.episodes)))
        row = meta.episodes[ep]
        picks.append((ep, int(rng.integers(0, int(row["length"]) - CLIP + 1)),
                      float(row[f"videos/{key}/from_timestamp"])))
    times = [from_ts + t / meta.fps for _, t, from_ts in picks]
    rows = []
    for codec in ("video", "raw", "raw-lz4"):
        root = work / f"lerobot-{codec}"

        def ingest() -> None:
            summary = ingest_lerobot(str(root), "lr", str(src), lerobot.LeRobotOptions(frame_codec=codec))
            assert not summary.partial, summary.quarantined

        ingest_s, decode_s, _, _ = best_pair(ingest, lambda: pyav_decode_all(mp4), repeats,
                                             setup=lambda: shutil.rmtree(root, ignore_errors=True))
        store = EpisodeStore(str(root), "lr")
        camera = lerobot.camera_name(key)
        ours_s, clip_bare_s, ours, bare_clips = best_pair(
            lambda: [store.read_frames(f"episode_{ep:06d}", camera, slice(t, t + CLIP)) for ep, t, _ in picks],
            lambda: pyav_clips(mp4, times, meta.fps), repeats)
        exact = all(np.array_equal(a, b) for a, b in zip(ours, bare_clips))
        stored = np.concatenate([store.read_frames(e, camera) for e in store.episode_ids()])
        rows.append({"source": f"lerobot {src.name}", "codec": codec,
                     "frames": total, "store_vs_source": folder_bytes(root / "datasets/lr") / folder_bytes(src),
                     "frames_vs_source": frame_array_bytes(root) / mp4.stat().st_size,
                     "ingest_vs_decode": (total / ingest_s) / (total / decode_s),
                     "decode_fps": total / decode_s, "ingest_fps": total / ingest_s,
                     "clip_vs_decode": clip_bare_s / ours_s, "clip_fps": clips * CLIP / ours_s,
                     "bare_clip_fps": clips * CLIP / clip_bare_s,
                     "exact": exact and np.array_equal(stored, decoded)})
    return rows


# Teleop JPEG HDF5 --------------------------------------------------------------------------------
def scene(cam: int, t: int, height: int, width: int) -> np.ndarray:
    """A camera-like BGR frame: shaded background, a textured table, a moving object, sensor noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frame = np.stack([80 + 80 * yy / height, 90 + 50 * xx / width, 110 + 30 * np.sin(xx / 17.0 + cam)], axis=-1)
    table = yy > height * (0.5 + 0.05 * cam)
    grain = 18 * np.sin(xx / 4.0 + 0.2 * yy) * np.cos(yy / 7.0)
    frame[table] = np.stack([60 + grain, 100 + grain, 150 + grain], axis=-1)[table]
    cx, cy = width * (0.2 + 0.6 * t / 100.0), height * (0.6 + 0.02 * cam)
    frame[(np.abs(xx - cx) < 40) & (np.abs(yy - cy) < 30)] = [40, 40, 200]
    frame += np.random.default_rng(cam * 10000 + t).normal(0, 3.0, frame.shape)
    return np.clip(frame, 0, 255).astype(np.uint8)


def write_teleop_episode(path: Path, length: int, height: int, width: int) -> None:
    """As the ALOHA recorder with compress=True: cv2.imencode q90, padded to the longest frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = {cam: [cv2.imencode(".jpg", scene(i, t, height, width), [int(cv2.IMWRITE_JPEG_QUALITY), 90])[1]
                     for t in range(length)] for i, cam in enumerate(TELEOP_CAMERAS)}
    padded = max(len(b) for bufs in encoded.values() for b in bufs)
    t = np.arange(length)[:, None]
    with h5py.File(path, "w") as h5:
        h5.attrs["sim"], h5.attrs["compress"] = False, True
        obs = h5.create_group("observations")
        for name, seed in (("qpos", 0), ("qvel", 1), ("effort", 2)):
            obs.create_dataset(name, data=np.sin(0.1 * t + np.arange(14) + seed).astype(np.float32))
        h5.create_dataset("action", data=np.cos(0.1 * t + np.arange(14)).astype(np.float32))
        images = obs.create_group("images")
        for cam in TELEOP_CAMERAS:
            data = np.zeros((length, padded), dtype=np.uint8)
            for i, buf in enumerate(encoded[cam]):
                data[i, :len(buf)] = buf.reshape(-1)
            images.create_dataset(cam, data=data, chunks=(1, padded))
        h5.create_dataset("compress_len", data=np.array([[len(b) for b in encoded[c]] for c in TELEOP_CAMERAS],
                                                        dtype=np.float32))


def teleop_decode(files: list[Path], frames_of=None) -> list[np.ndarray]:
    """Bare decode: h5py read of each frame's bytes + cv2.imdecode (all frames, or ``frames_of``)."""
    out = []
    for path in files:
        with h5py.File(path) as h5:
            for cam in TELEOP_CAMERAS:
                data = h5[f"observations/images/{cam}"]
                indices = range(len(data)) if frames_of is None else frames_of
                for t in indices:
                    buf = data[t]
                    out.append(cv2.imdecode(buf[:teleop.jpeg_lengths(buf[None])[0]], cv2.IMREAD_COLOR))
    return out


def teleop_clip_decode(src: Path, picks: list[tuple[int, str, int]]) -> list[np.ndarray]:
    clips = []
    for ep, cam, start in picks:
        with h5py.File(src / f"episode_{ep}.hdf5") as h5:
            data = h5[f"observations/images/{cam}"][start:start + CLIP]
        lengths = teleop.jpeg_lengths(data)
        clips.append(np.stack([cv2.imdecode(data[i, :lengths[i]], cv2.IMREAD_COLOR) for i in range(CLIP)]))
    return clips


def bench_teleop(work: Path, episodes: int, length: int, clips: int, repeats: int) -> list[dict]:
    src = work / "teleop-src"
    for ep in range(episodes):
        write_teleop_episode(src / f"episode_{ep}.hdf5", length, 480, 640)
    files = teleop.list_episode_files(src)
    total = episodes * length * len(TELEOP_CAMERAS)
    rng = np.random.default_rng(0)
    picks = [(int(rng.integers(episodes)), str(rng.choice(TELEOP_CAMERAS)), int(rng.integers(0, length - CLIP + 1)))
             for _ in range(clips)]
    jpeg_bytes = 0
    for path in files:
        with h5py.File(path) as h5:
            jpeg_bytes += int(h5["compress_len"][()].sum())
    rows = []
    for codec in ("source-jpeg", "raw", "raw-lz4"):
        root = work / f"teleop-{codec}"

        def ingest() -> None:
            summary = ingest_teleop(str(root), "tel", str(src), teleop.TeleopOptions(frame_codec=codec))
            assert not summary.partial, summary.quarantined

        ingest_s, decode_s, _, _ = best_pair(ingest, lambda: teleop_decode(files), repeats,
                                             setup=lambda: shutil.rmtree(root, ignore_errors=True))
        store = EpisodeStore(str(root), "tel")
        ours_s, clip_bare_s, ours, bare_clips = best_pair(
            lambda: [store.read_frames(f"episode_{ep}", cam, slice(t, t + CLIP)) for ep, cam, t in picks],
            lambda: teleop_clip_decode(src, picks), repeats)
        rows.append({"source": "teleop jpeg 480x640 x3", "codec": codec, "frames": total,
                     "store_vs_source": folder_bytes(root / "datasets/tel") / folder_bytes(src),
                     "frames_vs_source": frame_array_bytes(root) / jpeg_bytes,
                     "ingest_vs_decode": decode_s / ingest_s, "decode_fps": total / decode_s,
                     "ingest_fps": total / ingest_s, "clip_vs_decode": clip_bare_s / ours_s,
                     "clip_fps": clips * CLIP / ours_s, "bare_clip_fps": clips * CLIP / clip_bare_s,
                     "exact": all(np.array_equal(a, b) for a, b in zip(ours, bare_clips))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lerobot", type=Path, action="append",
                        help="LeRobot v3.0 folder(s) (default: the checked-in 96x128 and 240x320 recordings).")
    parser.add_argument("--episodes", type=int, default=2, help="Teleop episodes.")
    parser.add_argument("--frames", type=int, default=60, help="Frames per teleop episode and camera.")
    parser.add_argument("--clips", type=int, default=40, help="16-frame clips read per store.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    av.logging.set_level(av.logging.ERROR)
    sources = args.lerobot or [HERE / "data/lerobot_v30_av1_96x128", HERE / "data/lerobot_v30_av1_240x320"]
    with tempfile.TemporaryDirectory(prefix="bench-frame-store-") as tmp:
        rows = [row for src in sources for row in bench_lerobot(src, Path(tmp), args.clips, args.repeats)]
        rows += bench_teleop(Path(tmp), args.episodes, args.frames, args.clips, args.repeats)
    print("| source | codec | frames | store/source (all files) | frame arrays/source frames | ingest/bare decode "
          "| 16-frame clip read/bare decode | exact |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['codec']} | {r['frames']} | {r['store_vs_source']:.2f}x | "
              f"{r['frames_vs_source']:.2f}x | **{r['ingest_vs_decode']:.2f}x** ({r['ingest_fps']:.0f} vs "
              f"{r['decode_fps']:.0f} frames/s) | **{r['clip_vs_decode']:.2f}x** ({r['clip_fps']:.0f} vs "
              f"{r['bare_clip_fps']:.0f} frames/s) | {'yes' if r['exact'] else 'no'} |")


if __name__ == "__main__":
    main()
