"""How the cost grows with the number of clips: the whole chain on ``null`` models (issue 24).

The chain (plan, text, generate, teachers dinov2 + da3, export, pi0) runs with ``--model null``
(pipelines/null_models.py: correctly shaped, deterministic arrays at memory speed) over a
synthetic dataset, so what is measured is everything but the models: Prefect, Dask, claims,
shard writes, ``_done`` markers, finalize, manifests, lineage, exports. Each (store, runner,
clips) cell runs in its own process (its peak RSS is the driver's memory), stage by stage
through ``flows.pipeline.run_pipeline`` (each run adds one stage; the stages already complete are
skipped), then times the maintenance commands (``targets verify --all``, ``targets gc
--dry-run``, ``foresight info``), export indexing and ShardStream start-up. On S3 (moto's server on
loopback, tests/cluster_servers.py) the requests of each stage are counted from the server's
access log (one line per request, every process included).

Ratios printed against baselines of the same run: orchestration per shard / the null compute of
one shard, per shard / the goal (5% of an H100 shard: 0.75 s generate, 2 ms teachers), and the
growth slope time(10n) / (10 time(n)) (1.0 = linear). Writes bench/results/bench_scale.json::

    python bench/bench_scale.py --sizes 1000,10000,100000 --stores local,s3 --runners threads,dask
    python bench/bench_scale.py --sizes 1000 --stores local --runners threads   # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from procmem import status_mb  # noqa: E402  (bench/procmem.py)

RESULTS = REPO / "bench" / "results" / "bench_scale.json"
DATASET = "sim"
CAMERA = "cam"
FRAME_SIZE = 8
EPISODE_FRAMES = 1001
"""Frames per synthetic episode: 1000 two-frame clips each (a clip starts at every frame)."""
GENERATE_SIZE, CLIP_FRAMES = 16, 2
TEACHER_INPUT = 28
"""Teacher input side: a 2x2 patch grid for the tiny patch sizes (14)."""
GOALS_S = {"generate": 0.75, "teachers": 0.002}
"""Goal for orchestration per 16-clip shard: 5% of its H100 compute (15 s generate; 40 ms teachers)."""
BUCKET = "foresight-scale"
STAGES = ("text", "generate", "teachers:dinov2", "teachers:da3", "export", "pi0")


# ---------------------------------------------------------------- the synthetic world
def make_world(root_url: str, clips: int) -> str:
    """A dataset of ceil(clips / 1000) episodes (8x8 frames, action 4, state 6); returns nothing
    but leaves the dataset ``sim`` under ``root_url``."""
    from foresight.schemas.dataset import DatasetInfo, EpisodeRecord, FeatureSpec
    from foresight.storage.episodes import EpisodeStore

    features = {"action": FeatureSpec(dtype="float32", shape=[4]), "state": FeatureSpec(dtype="float32", shape=[6])}
    store = EpisodeStore(root_url, DATASET)
    store.write_info(DatasetInfo(name=DATASET, source_kind="synthetic", source="bench_scale", source_fingerprint="s0",
                                 fps=10.0, cameras={CAMERA: [FRAME_SIZE, FRAME_SIZE, 3]}, features=features))
    for index in range(math.ceil(clips / (EPISODE_FRAMES - 1))):
        rng = np.random.default_rng(index)
        record = EpisodeRecord(episode_id=f"ep{index:05d}", task="reach", instructions=[f"reach target {index % 7}"],
                               length=EPISODE_FRAMES, success=True, source_path=f"sim://{index}",
                               source_checksum=f"s{index}")
        with store.writer(record, features) as writer:
            writer.append_frames(CAMERA, rng.integers(0, 256, (EPISODE_FRAMES, FRAME_SIZE, FRAME_SIZE, 3), np.uint8))
            writer.set_lowdim({"action": rng.uniform(-1, 1, (EPISODE_FRAMES, 4)).astype(np.float32),
                               "state": rng.normal(size=(EPISODE_FRAMES, 6)).astype(np.float32)})
    return DATASET


def chain_sections(clips: int, shard_size: int, workers: int) -> dict[str, Any]:
    """Every stage's pipeline section on null models (small shapes: the bytes are not the point)."""
    teacher = {"model": "null", "batch": shard_size, "workers": workers,
               "settings": {"preprocess": {"height": TEACHER_INPUT, "width": TEACHER_INPUT}}}
    return {
        "plan": {"source": "episodes", "frames": CLIP_FRAMES, "stride": 1, "every": 1, "limit": clips},
        "text": {"model": "null", "shard_size": shard_size, "workers": workers},
        "generate": {"model": "null", "shard_size": shard_size, "workers": workers, "batch": shard_size,
                     "params": {"num_frames": CLIP_FRAMES, "size": GENERATE_SIZE, "steps": 1}},
        "teachers": [{"teacher": "dinov2", **teacher}, {"teacher": "da3", **teacher}],
        "export": {"codec": "f16", "shard_size": "16MB", "allow_null": True, "workers": workers},
    }


def pipeline_upto(stage: str, sections: dict[str, Any]) -> Any:
    """The pipeline config running the chain up to ``stage`` (the earlier stages are skipped once done)."""
    from foresight.flows.pipeline import PipelineConfig

    order = ["text", "generate", "teachers:dinov2", "teachers:da3", "export"]
    upto = order[: order.index(stage) + 1]
    config: dict[str, Any] = {"name": "scale", "dataset": DATASET, "plan": sections["plan"],
                              "text": sections["text"]}
    if "generate" in upto:
        config["generate"] = sections["generate"]
    config["teachers"] = [t for t, name in zip(sections["teachers"], order[2:4]) if name in upto]
    if "export" in upto:
        config["export"] = sections["export"]
    return PipelineConfig.model_validate(config)


# ---------------------------------------------------------------- measuring
class RequestLog:
    """Requests the S3 server answered, by kind, from its access log (every process's requests)."""

    LINE = re.compile(r'"(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP')

    def __init__(self, path: Path | None):
        self.path, self.offset = path, 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size if self.path else 0

    def requests_since_mark(self) -> list[tuple[str, str]]:
        """(method, target) of every request since :meth:`mark`, in order."""
        if self.path is None:
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            return self.LINE.findall(handle.read().decode(errors="replace"))

    def since_mark(self) -> dict[str, int]:
        """Requests since :meth:`mark` by kind: PUT, GET, LIST (a GET with list-type), HEAD, ..."""
        if self.path is None:
            return {}
        counts = {"PUT": 0, "GET": 0, "LIST": 0, "HEAD": 0, "DELETE": 0, "POST": 0}
        for method, target in self.requests_since_mark():
            listing = method == "GET" and "list-type" in target
            counts["LIST" if listing else method] += 1
        return counts


class Timed:
    """Wall time of every call of a method, summed (finalize of targets and exports, in the driver)."""

    def __init__(self, owner: type, name: str):
        self.owner, self.name, self.seconds, self.calls = owner, name, 0.0, 0
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        setattr(owner, name, timed)

    def take(self) -> float:
        seconds, self.seconds, self.calls = self.seconds, 0.0, 0
        return round(seconds, 4)


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB."""
    return status_mb("VmRSS"), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def null_compute_per_shard(shard_size: int) -> dict[str, float]:
    """Seconds of the null models' own work for one shard of each stage (the baseline the
    orchestration is compared with)."""
    import torch

    from foresight.pipelines import null_models, pi0
    from foresight.pipelines.svd.sampler import SVDParams
    from foresight.pipelines.teachers import load_teacher
    from foresight.pipelines.svd import load_svd, generate_clips

    def best(call, repeats: int = 5) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times)

    text = null_models.null_text_model()
    svd = load_svd("null")
    params = SVDParams(num_frames=CLIP_FRAMES, size=GENERATE_SIZE, steps=1)
    seeds = np.arange(shard_size, dtype=np.int64)
    frames = torch.zeros(shard_size, CLIP_FRAMES, GENERATE_SIZE, GENERATE_SIZE, 3, dtype=torch.uint8)
    settings = {"preprocess": {"height": TEACHER_INPUT, "width": TEACHER_INPUT}}
    dino = load_teacher("dinov2", "null", settings)
    loaded = pi0.load_pi0("null")
    seeds_BK = np.arange(shard_size * 4, dtype=np.int64).reshape(shard_size, 4)
    prefix = pi0.prefix_length(loaded.model.config, 1, 48)
    return {
        "text": best(lambda: null_models.null_text_states([f"reach {i % 7}" for i in range(shard_size)], 20, text.width)),
        "generate": best(lambda: generate_clips(svd, params, None, None, seeds)),
        "teachers": best(lambda: dino.encode_clips(frames, frames[:, 0])),
        "pi0": best(lambda: null_models.null_pi0_outputs(seeds_BK, 50, 32, [1, 2, 3], prefix, "float16")),
    }


def prefect_task_overhead(runner: Any, tasks: int = 200) -> float:
    """Seconds per no-op Prefect task submitted and resolved through ``runner`` (the same kind as
    the stages use): the per-task cost that shard grouping amortises."""
    from prefect import flow, task

    from foresight.flows.runtime import gather, shared_api, stage_runners

    @task
    def noop(index: int) -> int:
        return index

    @flow(name="scale-prefect-overhead")
    def many(count: int) -> float:
        start = time.perf_counter()
        gather([noop.submit(i) for i in range(count)])
        return time.perf_counter() - start

    with shared_api(), stage_runners(runner) as make_runner:
        many.with_options(task_runner=make_runner())(min(tasks, 20))  # warm-up: runner start, task registration
        seconds = many.with_options(task_runner=make_runner())(tasks)
    return seconds / tasks


def folder_bytes(root: Any, rel: str) -> int:
    try:
        return int(root.du(rel))
    except (FileNotFoundError, OSError):
        return 0


def cli_seconds(args: list[str]) -> tuple[float, int, str]:
    """Wall time, exit code and last output line of a foresight command run in this process."""
    from typer.testing import CliRunner

    from foresight.flows.cli import app

    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    tail = (result.output or "").strip().splitlines()[-1:] or [""]
    return round(time.perf_counter() - start, 3), result.exit_code, tail[0][:200]


# ---------------------------------------------------------------- one cell
def run_cell(root_url: str, clips: int, shard_size: int, runner_name: str, dask_address: str | None,
             moto_log: Path | None) -> dict[str, Any]:
    """The chain at ``clips`` clips on one store and runner; every figure of that cell."""
    from foresight.flows.pi0 import Pi0TargetsConfig, run_pi0_targets
    from foresight.flows.pipeline import run_pipeline
    from foresight.flows.runtime import RunnerChoice
    from foresight.storage.exports import ExportStore
    from foresight.storage.fs import open_root
    from foresight.storage.targets import TargetWriter

    runner = {"threads": RunnerChoice(workers=2), "dask-local": RunnerChoice(dask_local=2),
              "dask": RunnerChoice(dask_address=dask_address)}[runner_name]
    workers = 2
    root = open_root(root_url)
    requests = RequestLog(moto_log)
    finalize_targets, finalize_exports = Timed(TargetWriter, "finalize"), Timed(ExportStore, "finalize")
    cell: dict[str, Any] = {"clips": clips, "shard_size": shard_size, "runner": runner_name,
                            "store": "s3" if root_url.startswith("s3://") else "local", "stages": {}}
    start = time.perf_counter()
    requests.mark()
    make_world(root_url, clips)
    cell["world_s"] = round(time.perf_counter() - start, 2)
    cell["world_requests"] = requests.since_mark()
    sections = chain_sections(clips, shard_size, workers)
    ids: dict[str, str] = {}
    for stage in STAGES[:-1]:
        requests.mark()
        summary = run_pipeline(pipeline_upto(stage, sections), root=root_url, runner=runner)
        row = next(r for r in summary.stages if r.stage == stage)
        ids.update({r.stage: r.output for r in summary.stages})
        cell["stages"][stage] = stage_figures(row.seconds, row.status, clips, shard_size, requests.since_mark(),
                                              finalize_targets.take() + finalize_exports.take(), summary.seconds)
        cell["stages"][stage]["rss_after_mb"], cell["stages"][stage]["peak_rss_after_mb"] = rss_mb()
    requests.mark()
    started = time.perf_counter()
    result = run_pi0_targets(root_url, Pi0TargetsConfig(plan=ids["plan"], model="null", pairs=2,
                                                        attn_layers=[1, 2], shard_size=shard_size, batch=shard_size,
                                                        workers=workers),
                             runner)
    ids["pi0"] = result.version
    seconds = time.perf_counter() - started
    cell["stages"]["pi0"] = stage_figures(seconds, "ran", clips, shard_size, requests.since_mark(),
                                          finalize_targets.take(), seconds)
    cell["stages"]["pi0"]["rss_after_mb"], cell["stages"]["pi0"]["peak_rss_after_mb"] = rss_mb()
    cell["ids"] = ids
    cell.update(metadata_figures(root, ids, requests))
    cell["rss_mb"], cell["peak_rss_mb"] = rss_mb()
    cell["prefect_task_s"] = round(prefect_task_overhead(runner), 5)
    return cell


def stage_figures(seconds: float, status: str, clips: int, shard_size: int, requests: dict[str, int],
                  finalize_s: float, run_s: float) -> dict[str, Any]:
    shards = math.ceil(clips / shard_size)
    figures = {"status": status, "seconds": seconds, "run_s": round(run_s, 3), "shards": shards,
               "per_shard_s": round(seconds / shards, 5), "finalize_s": finalize_s}
    if requests:
        figures["requests"] = requests
        figures["requests_per_shard"] = {k: round(v / shards, 2) for k, v in requests.items() if v}
    return figures


def metadata_figures(root: Any, ids: dict[str, str], requests: RequestLog) -> dict[str, Any]:
    """Sizes of manifests, plan, export index and lineage; times of the maintenance commands,
    export indexing and ShardStream start-up."""
    from foresight.storage import layout
    from foresight.storage.exports import ExportStore
    from foresight.trainers.data import ShardStream

    out: dict[str, Any] = {"manifest_bytes": {}, "shard_table_bytes": {}, "timings_s": {}}
    for stage, version in ids.items():
        if stage in ("plan", "export") or stage not in STAGES:
            continue
        out["manifest_bytes"][stage] = root.size(layout.target_dir(version), "manifest.json")
        table = layout.target_file(version, layout.TARGET_SHARDS)  # absent for versions made before it
        out["shard_table_bytes"][stage] = root.size(table) if root.file_exists(table) else 0
    out["plan_bytes"] = folder_bytes(root, f"plans/{ids['plan']}")
    out["export_index_bytes"] = root.size(layout.export_dir(ids["export"]), layout.EXPORT_INDEX)
    table = layout.export_file(ids["export"], layout.EXPORT_SAMPLES)  # the sample table (absent before it existed)
    out["export_samples_bytes"] = root.size(table) if root.file_exists(table) else 0
    out["lineage_bytes"] = root.du(layout.LINEAGE_EVENTS)  # one OpenLineage event object per stage run
    commands = {"targets verify --all": ["targets", "verify", "--all", "--root", root.url],
                "targets gc --dry-run": ["targets", "gc", "--dry-run", "--root", root.url],
                "foresight info": ["info", "--root", root.url]}
    for name, args in commands.items():
        requests.mark()
        seconds, code, tail = cli_seconds(args)
        out["timings_s"][name] = {"seconds": seconds, "exit_code": code, "tail": tail,
                                  "requests": requests.since_mark()}
    store = ExportStore(root)
    start = time.perf_counter()
    index = store.index(ids["export"])
    out["timings_s"]["export index load"] = round(time.perf_counter() - start, 4)
    out["rss_after_index_mb"] = rss_mb()[0]
    start = time.perf_counter()
    stream = ShardStream(root, ids["export"], index.versions, allow_null=True, shuffle_shards=True)
    next(iter(stream))
    out["timings_s"]["ShardStream first sample"] = round(time.perf_counter() - start, 4)
    out["export_samples"], out["export_shards"] = index.num_samples, len(index.shards)
    return out


# ---------------------------------------------------------------- the matrix
def cell_main(args: argparse.Namespace) -> None:
    """One cell in this process (what the driver spawns); prints its JSON on the last line."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    for noisy in ("prefect", "distributed", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    cell = run_cell(args.root, args.clips, args.shard_size, args.runner, args.dask_address,
                    Path(args.moto_log) if args.moto_log else None)
    print("CELL " + json.dumps(cell))


def spawn_cell(root: str, clips: int, shard_size: int, runner: str, env: dict[str, str], dask_address: str | None,
               moto_log: Path | None, timeout_s: float) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--cell", "--root", root, "--clips", str(clips), "--shard-size",
            str(shard_size), "--runner", runner]
    if dask_address:
        argv += ["--dask-address", dask_address]
    if moto_log:
        argv += ["--moto-log", str(moto_log)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"clips": clips, "runner": runner, "root": root, "error": f"timed out after {timeout_s:.0f} s"}
    line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("CELL ")), None)
    if proc.returncode != 0 or line is None:
        return {"clips": clips, "runner": runner, "root": root, "error": (proc.stderr or proc.stdout)[-3000:]}
    cell = json.loads(line[5:])
    cell["process_s"] = round(time.perf_counter() - start, 1)
    return cell


def growth(cells: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """time(10n) / (10 time(n)) per stage and metadata timing, between consecutive sizes of one
    (store, runner) (1.0 = linear, above = worse than linear)."""
    out: dict[str, dict[str, float]] = {}
    ok = sorted((c for c in cells if "error" not in c), key=lambda c: c["clips"])
    for small, large in zip(ok, ok[1:]):
        factor = large["clips"] / small["clips"]
        key = f"{small['clips']}->{large['clips']}"
        slopes = {stage: large["stages"][stage]["seconds"] / (factor * small["stages"][stage]["seconds"])
                  for stage in large["stages"] if small["stages"].get(stage, {}).get("seconds")}
        for stage in large["stages"]:
            if stage in small["stages"]:  # the cost of one more shard, fixed per-stage costs taken out
                extra = large["stages"][stage]["shards"] - small["stages"][stage]["shards"]
                spent = large["stages"][stage]["seconds"] - small["stages"][stage]["seconds"]
                slopes[f"{stage} marginal s/shard"] = spent / extra
        for name, value in large["timings_s"].items():
            small_value = small["timings_s"].get(name)
            seconds = value["seconds"] if isinstance(value, dict) else value
            small_seconds = small_value["seconds"] if isinstance(small_value, dict) else small_value
            if small_seconds:
                slopes[name] = seconds / (factor * small_seconds)
        out[key] = {k: round(v, 5) for k, v in slopes.items()}
    return out


def print_cell(cell: dict[str, Any], baseline: dict[str, float]) -> None:
    if "error" in cell:
        print(f"  {cell['clips']:>7} clips {cell['runner']}: FAILED {cell['error'][-400:]}")
        return
    print(f"  {cell['store']} {cell['runner']} {cell['clips']} clips ({cell['stages']['text']['shards']} shards/stage), "
          f"driver RSS {cell['rss_mb']} MB (peak {cell['peak_rss_mb']} MB)")
    for stage, figures in cell["stages"].items():
        kind = stage.split(":")[0]
        compute = baseline.get(kind, 0.0)
        ratio = figures["per_shard_s"] / compute if compute else float("nan")
        goal = GOALS_S.get(kind)
        goal_text = f", {figures['per_shard_s'] / goal:.2f}x goal" if goal else ""
        reqs = figures.get("requests_per_shard", {})
        print(f"    {stage:16} {figures['seconds']:8.2f} s  {figures['per_shard_s'] * 1e3:8.2f} ms/shard "
              f"({ratio:7.1f}x null compute{goal_text}) finalize {figures['finalize_s']:.3f} s"
              + (f" requests/shard {reqs}" if reqs else "")
              + (f" RSS after {figures['rss_after_mb']} MB (peak {figures['peak_rss_after_mb']})"
                 if "rss_after_mb" in figures else ""))
    print(f"    metadata: manifests {cell['manifest_bytes']} B, shards.npy {cell.get('shard_table_bytes', {})} B, plan {cell['plan_bytes']} B, export index "
          f"{cell['export_index_bytes']} B + sample table {cell.get('export_samples_bytes', 0)} B, "
          f"lineage {cell['lineage_bytes']} B")
    for name, value in cell["timings_s"].items():
        seconds = value["seconds"] if isinstance(value, dict) else value
        print(f"    {name:28} {seconds:8.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--stores", default="local")
    parser.add_argument("--runners", default="threads")
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=3600.0, help="Seconds per cell.")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--work", default=None, help="Folder for the roots and server logs (default: a temp folder).")
    parser.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--clips", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--runner", help=argparse.SUPPRESS)
    parser.add_argument("--dask-address", help=argparse.SUPPRESS)
    parser.add_argument("--moto-log", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        cell_main(args)
        return
    run_matrix(args)


def run_matrix(args: argparse.Namespace) -> None:
    from cluster_servers import DaskCluster, MotoS3, child_env, start_prefect_server

    sizes = [int(s) for s in args.sizes.split(",")]
    baseline = null_compute_per_shard(args.shard_size)
    report: dict[str, Any] = {"command": " ".join(sys.argv), "shard_size": args.shard_size, "cpus": os.cpu_count(),
                              "null_compute_per_shard_s": baseline, "goals_per_shard_s": GOALS_S, "cells": [],
                              "prefect_task_s": {}}
    print(f"null compute per {args.shard_size}-clip shard: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in baseline.items()))
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.work))
    # One Prefect server (SQLite) for every cell and Dask worker: an embedded server per cell costs
    # a start-up each time and its state would not be shared with the workers.
    prefect, api_url = start_prefect_server(work / "prefect")
    servers: list[Any] = [prefect]
    try:
        for store in args.stores.split(","):
            (work / "moto").mkdir(exist_ok=True)
            moto = MotoS3(work / "moto") if store == "s3" else None
            if moto:
                servers.append(moto)
            prefect_env = {"PREFECT_API_URL": api_url, "PREFECT_HOME": str(work / "prefect-client")}
            env = child_env(**(moto.env if moto else {}), **prefect_env)
            if moto:
                os.environ.update(moto.env)
                import s3fs

                s3fs.S3FileSystem.clear_instance_cache()
                s3fs.S3FileSystem().mkdir(BUCKET)
            for runner in args.runners.split(","):
                cluster = DaskCluster(work / f"dask-{store}", 2, env={**(moto.env if moto else {}), **prefect_env}) \
                    if runner == "dask" else None
                if cluster:
                    servers.append(cluster)
                cells = []
                for clips in sizes:
                    root = (f"s3://{BUCKET}/{runner}-{clips}" if moto else str(work / f"{store}-{runner}-{clips}"))
                    print(f"{store} {runner} {clips} clips ...", flush=True)
                    cell = spawn_cell(root, clips, args.shard_size, runner, env,
                                      cluster.address if cluster else None, moto.server.log_path if moto else None,
                                      args.timeout)
                    print_cell(cell, baseline)
                    cells.append(cell)
                    report["cells"].append(cell)
                    save(report, args.out)
                report.setdefault("growth", {})[f"{store}/{runner}"] = growth(cells)
                print(f"  growth time(10n)/(10 time(n)): {report['growth'][f'{store}/{runner}']}")
                save(report, args.out)
                if cluster:
                    cluster.stop()
                    servers.remove(cluster)
            if moto:
                moto.stop()
                servers.remove(moto)
    finally:
        for server in servers:
            server.stop()
    save(report, args.out)
    print(f"wrote {args.out}")


def save(report: dict[str, Any], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
