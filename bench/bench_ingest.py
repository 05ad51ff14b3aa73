"""Ingest throughput against the bare cost of decoding the same inputs, measured in the same run.

CALVIN: frames/s of ``ingest_calvin`` (checksum, np.load, zarr write, stats) with N worker
processes, against a bare single-process ``np.load`` of the same npz files reading the same keys
(and, for reference, every key). Teleop: frames/s (images of all cameras) of ``ingest_teleop``
against bare h5py reads + ``cv2.imdecode`` of the same JPEG frames. Inputs are generated at the
real sizes (CALVIN 200x200 static + 84x84 gripper camera; ALOHA 480x640 JPEG).

    python bench/bench_ingest.py [--calvin-episodes 4] [--calvin-frames 250] [--workers 2] [--repeats 3]
                                 [--prefect]

``--prefect`` also times the CALVIN Prefect flow on a local Dask cluster of ``--workers`` workers
(its figure excludes the embedded server's start-up).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import h5py
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import fixtures_sources as fx  # noqa: E402
from foresight.flows import ingest_sources as flows_ingest  # noqa: E402
from foresight.pipelines.ingest import calvin, teleop  # noqa: E402


def _call_task(task_name: str, kwargs: dict):
    return getattr(flows_ingest, task_name).fn(**kwargs)


def _warm() -> None:
    """Worker initializer: import the ingest stack once (prefect, zarr, ...), as a long-lived worker has."""
    import foresight.flows.ingest_sources  # noqa: F401


def process_map(pool: ProcessPoolExecutor):
    """A TaskMap running each task function in a pool of worker processes (no orchestrator)."""
    def run(task_fn, calls):
        return list(pool.map(_call_task, [task_fn.fn.__name__] * len(calls), calls))
    return run


def start_pool(workers: int) -> tuple[ProcessPoolExecutor, float]:
    """A warmed pool of worker processes and the seconds it took to start (reported, not in the rates)."""
    start = time.perf_counter()
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_warm)
    list(pool.map(time.sleep, [0.2] * workers))
    return pool, time.perf_counter() - start


def make_calvin(folder: Path, episodes: int, frames: int) -> None:
    ranges, start = [], fx.CALVIN_DEBUG_START
    for _ in range(episodes):
        ranges.append((start, start + frames - 1))
        start += frames
    fx.make_calvin_split(folder / "training", ranges)


def bare_calvin(folder: Path, keys: list[str]) -> int:
    """np.load every frame file and materialise ``keys``; returns frames read."""
    count = 0
    for path in sorted((folder / "training").glob("episode_*.npz")):
        with np.load(path) as npz:
            for key in keys:
                npz[key]
        count += 1
    return count


def make_teleop(folder: Path, episodes: int, frames: int) -> None:
    for index in range(episodes):
        fx.make_teleop_episode(folder / f"episode_{index}.hdf5", length=frames,
                               cameras=("cam_high", "cam_left_wrist", "cam_right_wrist"), size=(480, 640),
                               compress=True)


def bare_teleop(folder: Path) -> int:
    """h5py-read and cv2.imdecode every JPEG frame of every camera; returns images decoded."""
    count = 0
    for path in sorted(folder.glob("episode_*.hdf5")):
        with h5py.File(path, "r") as h5:
            for cam in h5["observations/images"]:
                data = h5[f"observations/images/{cam}"]
                for start in range(0, len(data), 64):
                    for buffer in data[start:start + 64]:
                        cv2.imdecode(buffer, cv2.IMREAD_COLOR)
                        count += 1
    return count


def _cpu_seconds(pool: ProcessPoolExecutor | None) -> float:
    """CPU seconds (all threads) of this process plus, from /proc, of the pool's workers."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in (pool._processes if pool is not None else {}):  # noqa: SLF001 - bench introspection
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def timed(fn, pool: ProcessPoolExecutor | None = None) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds, result) of one call."""
    start, cpu = time.perf_counter(), _cpu_seconds(pool)
    result = fn()
    return time.perf_counter() - start, _cpu_seconds(pool) - cpu, result


def bench_calvin(work: Path, args, pool: ProcessPoolExecutor) -> dict[str, float]:
    src = work / "calvin"
    make_calvin(src, args.calvin_episodes, args.calvin_frames)
    total = args.calvin_episodes * args.calvin_frames
    options = calvin.CalvinOptions(splits=["training"])
    keys = [*options.cameras, *calvin.LOWDIM_SHAPES]
    every_key = [*fx.CALVIN_IMAGE_SHAPES, *fx.CALVIN_VECTORS]
    runs: dict[str, list[tuple[float, float]]] = {"bare np.load, same keys (1 process)": [],
                                                  "bare np.load, every key (1 process)": [],
                                                  f"ingest, {args.workers} worker processes": []}
    names = list(runs)
    for repeat in range(args.repeats):
        runs[names[0]].append(timed(lambda: bare_calvin(src, keys))[:2])
        runs[names[1]].append(timed(lambda: bare_calvin(src, every_key))[:2])
        root = work / f"root-calvin-{repeat}"
        wall, cpu, summary = timed(lambda: flows_ingest.ingest_calvin(str(root), "cal", str(src), options,
                                                                       map_tasks=process_map(pool)), pool)
        assert summary.frames_written == total and not summary.partial
        runs[names[2]].append((wall, cpu))
        shutil.rmtree(root)
    out = {name: _rates(values, total) for name, values in runs.items()}
    if args.prefect:
        out[f"Prefect flow, dask {args.workers} workers"] = (
            prefect_calvin(work, src, options, total, args.workers), float("nan"))
    return out


def prefect_calvin(work: Path, src: Path, options: calvin.CalvinOptions, total: int, workers: int) -> float:
    from foresight.flows.runtime import RunnerChoice, run_flow

    summary = run_flow(flows_ingest.ingest_calvin_flow, RunnerChoice(dask_local=workers),
                       root_url=str(work / "root-prefect"), dataset="cal", src=str(src), options=options)
    assert summary.frames_written == total
    return total / summary.seconds


def bench_teleop(work: Path, args, pool: ProcessPoolExecutor) -> dict[str, float]:
    src = work / "teleop"
    make_teleop(src, args.teleop_episodes, args.teleop_frames)
    total = args.teleop_episodes * args.teleop_frames * 3
    bare, ingest = [], []
    for repeat in range(args.repeats):
        bare.append(timed(lambda: bare_teleop(src))[:2])
        root = work / f"root-teleop-{repeat}"
        wall, cpu, summary = timed(lambda: flows_ingest.ingest_teleop(str(root), "tel", str(src),
                                                                       teleop.TeleopOptions(),
                                                                       map_tasks=process_map(pool)), pool)
        assert summary.frames_written * 3 == total and not summary.partial
        ingest.append((wall, cpu))
        shutil.rmtree(root)
    return {"bare h5py + cv2.imdecode (1 process)": _rates(bare, total),
            f"ingest, {args.workers} worker processes": _rates(ingest, total)}


def _rates(runs: list[tuple[float, float]], frames: int) -> tuple[float, float]:
    """Median frames/s and median CPU milliseconds per frame."""
    return (statistics.median(frames / wall for wall, _ in runs),
            statistics.median(1000 * cpu / frames for _, cpu in runs))


def report(title: str, figures: dict[str, tuple[float, float]], workers: int) -> None:
    """Markdown table: frames/s and its ratio to the first row; CPU ms/frame and the ratio that
    ``workers`` uncontended cores would give (workers x baseline CPU / ingest CPU)."""
    baseline_fps, baseline_cpu = next(iter(figures.values()))
    print(f"\n{title}")
    print(f"| | frames/s | ratio | CPU ms/frame | ratio on {workers} free cores |")
    print("|---|---:|---:|---:|---:|")
    for name, (fps, cpu) in figures.items():
        bound = min(workers, workers if "worker" in name else 1) * baseline_cpu / cpu
        print(f"| {name} | {fps:.0f} | {fps / baseline_fps:.2f}x | {cpu:.2f} | {bound:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calvin-episodes", type=int, default=4)
    parser.add_argument("--calvin-frames", type=int, default=250)
    parser.add_argument("--teleop-episodes", type=int, default=4)
    parser.add_argument("--teleop-frames", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefect", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    pool, startup = start_pool(args.workers)
    print(f"{args.workers} worker processes started and warmed in {startup:.1f} s (not counted below)")
    try:
        calvin_figures = bench_calvin(work, args, pool)
        report(f"CALVIN ({args.calvin_episodes} x {args.calvin_frames} frames, median of {args.repeats})",
               calvin_figures, args.workers)
        teleop_figures = bench_teleop(work, args, pool)
        report(f"Teleop JPEG 480x640 ({args.teleop_episodes} x {args.teleop_frames} steps x 3 cameras, "
               f"median of {args.repeats})", teleop_figures, args.workers)
    finally:
        pool.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
