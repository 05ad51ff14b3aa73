"""Episode-store write/read throughput against plain per-frame .npy files, same frames, same run.

Frames are real MetaWorld renders (one expert rollout, tiled to the requested count) so the
compression ratio means something. Prints frames/s and MB/s of both, their ratios, and the
store's compression ratio.

    python bench/bench_episode_store.py [--frames 2000] [--size 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from foresight.schemas.dataset import DatasetInfo, EpisodeRecord, FeatureSpec  # noqa: E402
from foresight.storage.episodes import EpisodeStore  # noqa: E402

FEATURES = {"action": FeatureSpec(dtype="float32", shape=[4])}


def rendered_frames(count: int, size: int) -> np.ndarray:
    from foresight.pipelines.ingest.metaworld import collect_demonstration

    demo = collect_demonstration("drawer-open", seed=0, size=size)
    reps = -(-count // demo.length)
    return np.concatenate([demo.frames_THWC] * reps)[:count]


def store_write(root: str, frames: np.ndarray) -> None:
    store = EpisodeStore(root, "bench")
    store.write_info(DatasetInfo(name="bench", source_kind="synthetic", source="bench", source_fingerprint="b",
                                 fps=30, cameras={"cam": list(frames.shape[1:])}, features=FEATURES))
    record = EpisodeRecord(episode_id="e0", task="t", length=len(frames), source_path="bench", source_checksum="b")
    with store.writer(record, FEATURES) as writer:
        for start in range(0, len(frames), 100):
            writer.append_frames("cam", frames[start:start + 100])
        writer.set_lowdim({"action": np.zeros((len(frames), 4), np.float32)})


def store_read(root: str, count: int) -> np.ndarray:
    return EpisodeStore(root, "bench").read_frames("e0", "cam", slice(0, count))


def npy_write(folder: str, frames: np.ndarray) -> None:
    os.makedirs(folder, exist_ok=True)
    for index, frame in enumerate(frames):
        np.save(os.path.join(folder, f"{index:07d}.npy"), frame)


def npy_read(folder: str, count: int) -> np.ndarray:
    return np.stack([np.load(os.path.join(folder, f"{i:07d}.npy")) for i in range(count)])


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    frames = rendered_frames(args.frames, args.size)
    raw_mb = frames.nbytes / 1e6
    work = tempfile.mkdtemp(prefix="bench-episodes-")
    try:
        def fresh(name):
            path = os.path.join(work, name)
            shutil.rmtree(path, ignore_errors=True)
            return path

        t_store_w = timed(lambda: store_write(fresh("store"), frames), args.repeats)
        t_npy_w = timed(lambda: npy_write(fresh("npy"), frames), args.repeats)
        t_store_r = timed(lambda: store_read(os.path.join(work, "store"), len(frames)), args.repeats)
        t_npy_r = timed(lambda: npy_read(os.path.join(work, "npy"), len(frames)), args.repeats)
        assert np.array_equal(store_read(os.path.join(work, "store"), len(frames)), frames)
        stored = du(os.path.join(work, "store", "datasets", "bench", "episodes"))
        npy_bytes = du(os.path.join(work, "npy"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(frames)
    print(f"frames: {n} x {frames.shape[1]}x{frames.shape[2]}x3 uint8 ({raw_mb:.1f} MB raw), median of {args.repeats}")
    print(f"{'':16}{'frames/s':>12}{'MB/s (raw)':>12}")
    for label, secs in [("store write", t_store_w), ("npy write", t_npy_w), ("store read", t_store_r),
                        ("npy read", t_npy_r)]:
        print(f"{label:16}{n / secs:>12.0f}{raw_mb / secs:>12.1f}")
    print(f"write ratio store/npy: {t_npy_w / t_store_w:.2f}x")
    print(f"read ratio store/npy:  {t_npy_r / t_store_r:.2f}x")
    print(f"compression: store {stored / 1e6:.1f} MB vs npy {npy_bytes / 1e6:.1f} MB -> {npy_bytes / stored:.1f}x smaller")


if __name__ == "__main__":
    main()
