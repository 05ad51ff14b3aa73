"""Where one LeRobot ingest's time goes: per-part wall times of ``ingest_lerobot`` (video codec).

The fixed per-dataset cost of a small recording (bench/RESULTS.md, issue 16) is spread over the
metadata read, the segment checks, the episode writes and syncs, the statistics, dataset.json and
the lineage event. This wraps those functions with timers (parts that run on a background thread
are marked ``[bg]``: they overlap the main thread), ingests the recording ``--runs`` times, each
followed by a bare PyAV decode of the same mp4, and prints the fastest run's parts and every part's
median. Parts the code under test does not have are left out, so the same script times older
commits (``git archive <commit> | tar -x -C dir`` and run it there).

    OMP_NUM_THREADS=1 python bench/profile_lerobot_ingest.py [--src bench/data/lerobot_v30_av1_96x128] [--runs 12]
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import foresight.flows.ingest_sources as ingest_sources  # noqa: E402
import foresight.storage.episodes as episodes  # noqa: E402
import foresight.storage.fs as fs  # noqa: E402
from bench.bench_frame_store import lerobot_mp4, pyav_decode_all  # noqa: E402
from foresight.pipelines.ingest import lerobot  # noqa: E402

HERE = Path(__file__).resolve().parent
PARTS = [  # (owner, function, label)
    (lerobot, "load_meta", "metadata (load_meta)"),
    (ingest_sources, "_lerobot_checksum", "source checksums"),
    (lerobot.PacketCursor, "_episode_packets", "demux"),
    (lerobot.PacketCursor, "_check_segment", "segment checks (decode each alone)"),
    (episodes.EpisodeWriter, "_array", "zarr arrays (encoded cameras)"),
    (episodes.EpisodeWriter, "_pass_through_array", "zarr metadata (pass-through)"),
    (episodes.EpisodeWriter, "_write_shard", "shard writes"),
    (episodes.EpisodeWriter, "commit", "commit (caller's share)"),
    (fs.Root, "fsync_tree", "fsync of each staged episode"),
    (episodes.EpisodeWriter, "_publish", "publish (rename + marker)"),
    (fs.Root, "write_bytes_atomic", "atomic writes (marker, segments, dataset.json, lineage)"),
    (ingest_sources, "_write_episode", "episodes, caller's wall time"),
    (ingest_sources, "dataset_stats", "statistics"),
    (episodes.EpisodeStore, "write_segments", "segments.parquet"),
    (episodes.EpisodeStore, "write_info", "dataset.json"),
    (ingest_sources, "_finish", "dataset finish, wall time"),
    (ingest_sources, "_emit", "lineage event"),
]


def instrument(spans: dict[str, float]) -> None:
    """Wrap every part that exists in the code under test with a timer adding to ``spans``."""
    for owner, name, label in PARTS:
        fn = getattr(owner, name, None)
        if fn is None:
            continue

        @functools.wraps(fn)
        def timed(*args, _fn=fn, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                background = threading.current_thread() is not threading.main_thread()
                spans[_label + (" [bg]" if background else "")] += time.perf_counter() - start

        setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=HERE / "data/lerobot_v30_av1_96x128")
    parser.add_argument("--runs", type=int, default=12)
    args = parser.parse_args()
    spans: dict[str, float] = collections.defaultdict(float)
    instrument(spans)
    mp4 = lerobot_mp4(args.src)
    runs = []
    with tempfile.TemporaryDirectory(prefix="profile-lerobot-") as tmp:
        for i in range(args.runs + 1):  # the first run warms imports and caches; not counted
            root = Path(tmp) / "root"
            shutil.rmtree(root, ignore_errors=True)
            spans.clear()
            start = time.perf_counter()
            ingest_sources.ingest_lerobot(str(root), "lr", str(args.src), lerobot.LeRobotOptions(frame_codec="video"))
            ingest_s = time.perf_counter() - start
            start = time.perf_counter()
            pyav_decode_all(mp4)
            decode_s = time.perf_counter() - start
            if i:
                runs.append((ingest_s, decode_s, dict(spans)))
    fastest = min(runs, key=lambda run: run[0])
    best_decode = min(run[1] for run in runs)
    print(f"{args.src.name}: ingest best {fastest[0] * 1e3:.0f} ms (median "
          f"{statistics.median(r[0] for r in runs) * 1e3:.0f}), bare decode best {best_decode * 1e3:.0f} ms "
          f"(median {statistics.median(r[1] for r in runs) * 1e3:.0f}); best/best {best_decode / fastest[0]:.2f}x")
    print("| part | fastest run (ms) | median (ms) |\n|---|---:|---:|")
    labels = sorted({k for run in runs for k in run[2]}, key=lambda k: -fastest[2].get(k, 0.0))
    for label in labels:
        median = statistics.median(run[2].get(label, 0.0) for run in runs)
        print(f"| {label} | {fastest[2].get(label, 0.0) * 1e3:.1f} | {median * 1e3:.1f} |")


if __name__ == "__main__":
    main()
