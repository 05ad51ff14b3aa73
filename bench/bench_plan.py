"""Memory and time of the plan stage at N clips (issue 24: the driver's per-clip transient).

For each size, a fresh process makes bench_scale's synthetic dataset (1000 one-frame-apart clips
per episode) on local disk, then a second fresh process makes the plan (``flows.generate.make_plan``,
as the pipeline's plan stage does: read the episode records, make the clips, write clips.parquet and
plan.json) and reports its resident memory before, its peak across the stage (VmHWM, reset just
before the stage through /proc/self/clear_refs), the stage's seconds and clips.parquet's sha256. A
plan of one clip an episode made first in the same process takes the one-time costs (lazy imports,
the first writes) out of it. ``--in-memory`` measures only the clip list and its parquet bytes
(``make_clips`` + ``parquet_bytes``) over episode records made in memory, with no dataset on disk
(quick at 10^6). Writes bench/results/bench_plan.json::

    python bench/bench_plan.py --sizes 10000,100000
    python bench/bench_plan.py --sizes 10000,100000,1000000 --in-memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from procmem import reset_peak, status_mb  # bench/procmem.py

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "bench_plan.json"


def measure_plan(root_url: str, clips: int) -> dict[str, Any]:
    """RSS before, peak across and seconds of making the ``clips``-clip plan of bench_scale's chain."""
    import gc

    from bench_scale import DATASET, chain_sections

    from foresight.flows.generate import PlanConfig, make_plan
    from foresight.storage.plans import PlanStore

    config = PlanConfig(dataset=DATASET, **chain_sections(clips, 16, 1)["plan"])
    make_plan(root_url, config.model_copy(update={"every": 1000, "limit": 10}))  # warm-up: imports, first writes
    gc.collect()
    reset_peak()
    before = status_mb("VmRSS")
    start = time.perf_counter()
    summary = make_plan(root_url, config)
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    return {"clips": summary.num_clips, "plan_id": summary.plan_id, "rss_before_mb": before,
            "peak_mb": peak, "peak_above_before_mb": round(peak - before, 1), "seconds": round(seconds, 3),
            "clips_sha256": PlanStore(root_url).info(summary.plan_id).clips_sha256}


def measure_clips(clips: int) -> dict[str, Any]:
    """RSS peak of making the clip list of bench_scale's plan and its parquet bytes, records in memory."""
    import gc
    import hashlib

    import pyarrow as pa
    from bench_scale import CAMERA, DATASET, EPISODE_FRAMES, chain_sections

    from foresight.pipelines.plan import PlanParams, make_clips
    from foresight.schemas.dataset import EpisodeRecord
    from foresight.storage.fs import parquet_bytes

    records = [EpisodeRecord(episode_id=f"ep{index:05d}", task="reach", instructions=[f"reach target {index % 7}"],
                             length=EPISODE_FRAMES, source_path=f"sim://{index}", source_checksum=f"s{index}")
               for index in range(-(-clips // (EPISODE_FRAMES - 1)))]
    params = PlanParams(camera=CAMERA, **chain_sections(clips, 16, 1)["plan"])
    parquet_bytes(make_clips(DATASET, records, [], params.model_copy(update={"every": 1000, "limit": 10})).table)
    gc.collect()
    reset_peak()
    before = status_mb("VmRSS")
    start = time.perf_counter()
    rows = make_clips(DATASET, records, [], params)
    clips_peak = status_mb("VmHWM")
    data = parquet_bytes(rows.table)
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    return {"clips": len(rows), "rss_before_mb": before, "clips_peak_above_before_mb": round(clips_peak - before, 1),
            "peak_above_before_mb": round(peak - before, 1), "table_mb": round(rows.table.nbytes / 2**20, 1),
            "arrow_max_mb": round(pa.default_memory_pool().max_memory() / 2**20, 1), "seconds": round(seconds, 3),
            "clips_sha256": hashlib.sha256(data).hexdigest()}


def run_size(clips: int, in_memory: bool) -> dict[str, Any]:
    """The dataset and the measurement, each in a fresh process, on a temporary root (in memory:
    the measurement alone, in a fresh process)."""
    python = [sys.executable, str(Path(__file__).resolve()), "--sizes", str(clips)]
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as work:
        root_url = str(Path(work) / "root")
        if not in_memory:
            subprocess.run([*python, "--world", root_url], check=True)
        done = subprocess.run([*python, "--measure", "" if in_memory else root_url], check=True,
                              capture_output=True, text=True)
        return json.loads(done.stdout.strip().splitlines()[-1])


def git_commit() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="Comma-separated clip counts.")
    parser.add_argument("--in-memory", action="store_true", help="Only make_clips and the parquet bytes, "
                                                                 "over records made in memory.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--world", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path[:0] = [str(REPO), str(REPO / "bench"), str(REPO / "tests")]
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.world:
        from bench_scale import make_world

        make_world(args.world, sizes[0])
        return
    if args.measure is not None:
        print(json.dumps(measure_plan(args.measure, sizes[0]) if args.measure else measure_clips(sizes[0])))
        return
    cells = []
    for clips in sizes:
        cells.append({"in_memory": args.in_memory, **run_size(clips, args.in_memory)})
        print(json.dumps(cells[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"commit": git_commit(), "cells": cells}, indent=2) + "\n")


if __name__ == "__main__":
    main()
