"""Memory, time and requests of ``targets gc --dry-run``'s plan on an object store (issue 24).

Starts moto's S3 server on loopback (tests/cluster_servers.py), uploads a local data root made by
bench_scale (``--source``, e.g. a ``local-threads-10000`` folder its ``--work`` left behind) under
``s3://foresight-gc/root``, and one target version of it alone under ``.../warm`` (to take the
one-time costs out: imports, the first connection). Then, in a fresh process per ``--tree`` (a
checkout of this repository, so two commits can be compared on one upload), it plans gc on the
warm prefix, resets the peak (/proc/self/clear_refs) and plans gc on the root: RSS before, the
peak above it, seconds and the LIST requests the server answered. Writes bench/results/bench_gc_s3.json::

    python bench/bench_gc_s3.py --source /tmp/bench-scale-xxxx/local-threads-10000 --tree . --tree ../base
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from procmem import reset_peak, status_mb  # bench/procmem.py

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "bench_gc_s3.json"
BUCKET = "foresight-gc"


def measure(log_path: str) -> dict[str, Any]:
    """In a fresh process (the tree to measure first on sys.path): gc's plan on the warm prefix,
    then on the root, with the peak memory and LIST requests of the second."""
    import gc

    from foresight.storage import references

    references.plan_gc(f"s3://{BUCKET}/warm")
    gc.collect()
    offset = os.path.getsize(log_path)
    reset_peak()
    before = status_mb("VmRSS")
    start = time.perf_counter()
    plan = references.plan_gc(f"s3://{BUCKET}/root")
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    with open(log_path, "rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").splitlines()
    lists = sum(1 for line in lines if '"GET ' in line and "list-type" in line)
    return {"rss_before_mb": before, "peak_above_before_mb": round(peak - before, 1), "seconds": round(seconds, 2),
            "lists": lists, "requests": sum(1 for line in lines if " HTTP/" in line),
            "remove": sorted(i.version_id for i in plan.remove), "keep": sorted(i.version_id for i in plan.keep),
            "bytes": {i.version_id: i.bytes for i in plan.remove + plan.keep}}


def upload(source: Path) -> int:
    """The local root under s3://BUCKET/root and its smallest target version under .../warm."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(source) + "/", f"{BUCKET}/root", recursive=True)
    versions = sorted((source / "targets").iterdir(), key=lambda p: sum(f.stat().st_size for f in p.rglob("*")))
    fs.put(str(versions[0]) + "/", f"{BUCKET}/warm/targets/{versions[0].name}", recursive=True)
    return sum(1 for path in source.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="A local data root to upload (bench_scale's).")
    parser.add_argument("--tree", action="append", default=[], help="Repository checkout to measure (repeat).")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    sys.path[:0] = [str(REPO / "tests")]
    from cluster_servers import moto_bucket

    cells = []
    with tempfile.TemporaryDirectory(prefix="bench-gc-s3-") as work, moto_bucket(Path(work), BUCKET) as server:
        objects = upload(args.source)
        for tree in args.tree or [str(REPO)]:
            tree = str(Path(tree).resolve())
            env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, __file__, "--measure", str(server.server.log_path)], env=env,
                                  check=True, capture_output=True, text=True, cwd=tree)
            commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
            cells.append({"tree": tree, "commit": commit.stdout.strip(), "objects": objects,
                          **json.loads(done.stdout.strip().splitlines()[-1])})
            print(json.dumps({k: v for k, v in cells[-1].items() if k != "bytes"}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"source": str(args.source), "cells": cells}, indent=2) + "\n")


if __name__ == "__main__":
    main()
