"""Issue 21: the teacher build through Dask with one worker per GPU, scaling and a killed worker.

Builds one small teleop dataset, a plan and a `text` version once, then, for each worker count
in ``--workers-list``, copies that store and runs ``foresight generate`` and ``foresight teachers``
(DINOv2 and DA3) over ``--dask-local N`` in it, timing each whole command (process start-up,
model load, compile, shard claims and finalize included). Printed per N:

- clips/hour of each stage and the scaling efficiency ``rate(N) / (N x rate(1))`` where N
  workers have N GPUs; with fewer GPUs than workers, workers share GPUs round-robin and the
  printed ratio is ``rate(N) / (gpus_used x rate(1))`` (on one GPU: the cost of sharing it);
- the time to the first finished shard (first ``_done`` marker seen);
- whether every shard of every version is byte-identical (sha256 recorded in the manifest) to
  the 1-worker build.

With ``--kill``, one more generate run on ``max(workers-list)`` workers SIGKILLs one GPU worker
process right after the first shard is done; the Nanny restarts it, the lost shard is re-run,
and the version must still be byte-identical to the 1-worker build. The time the kill cost is
printed against one shard's time.

    python bench/bench_dask_gpus.py --model random --clips 64 --batch 16 --workers-list 1,2 --kill
    python bench/bench_dask_gpus.py --model tiny --device cpu --clips 8 --size 32 --steps 2  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from foresight.storage.fs import Root  # noqa: E402
from foresight.storage.targets import TargetStore  # noqa: E402

CLI = "import sys; from foresight.flows.cli import main; sys.argv[0] = 'foresight'; main()"
ID = re.compile(r"\b((?:plan|text|video|teacher)-[0-9a-f]{6,})\b")


def foresight(root: Path, *args: str, env: dict | None = None) -> tuple[str, float]:
    """Run one CLI command; return the first version/plan id it printed and its wall time."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CLI, *args, "--root", str(root)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"foresight {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    found = ID.findall(proc.stdout)
    return (found[0] if found else ""), wall


def write_teleop_episode(path: Path, length: int, size: tuple[int, int]) -> None:
    """One ALOHA-layout HDF5 episode (one raw camera, qpos/qvel/action) of moving gradients.

    Written here rather than with the tests' factory, which imports PyAV (not on the GPU image).
    """
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.stack([np.stack([(xx * 3 + t) % 256, (yy * 3 + 5 * t) % 256, (xx + yy) % 256], axis=-1)
                       for t in range(length)]).astype(np.uint8)
    vectors = np.sin(0.1 * np.arange(length)[:, None] + np.arange(14)[None, :]).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as root:
        root.attrs["sim"], root.attrs["compress"] = False, False
        images = root.create_group("observations").create_group("images")
        images.create_dataset("cam_high", data=frames, chunks=(1, h, w, 3))
        for name in ("observations/qpos", "observations/qvel", "action"):
            root.create_dataset(name, data=vectors)


def build_base(work: Path, clips: int, frames: int, text_model: str, device: str) -> tuple[Path, str, str]:
    """A store with the dataset, the plan and the text version (CLIP ``text_model``) every build starts from."""
    src, root = work / "src", work / "base"
    episodes = max(1, -(-clips // 4))
    for index in range(episodes):
        write_teleop_episode(src / f"episode_{index}.hdf5", length=frames + 3 * 8, size=(96, 128))
    foresight(root, "ingest", "teleop", str(src), "--dataset", "toy", "--fps", "10",
              "--instruction", "put the block in the drawer")
    plan, _ = foresight(root, "plan", "--dataset", "toy", "--frames", str(frames), "--stride", "1",
                        "--every", "8", "--limit", str(clips))
    text, _ = foresight(root, "text", "--plan", plan, "--model", text_model, "--device", device)
    return root, plan, text


class FirstShard(threading.Thread):
    """Polls a root for the first ``_done`` marker of a kind of version; records when it appeared."""

    def __init__(self, root: Path, prefix: str):
        super().__init__(daemon=True)
        self.root, self.prefix, self.start_t = root, prefix, time.perf_counter()
        self.seen_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.seen_at is None:
            if any(p.is_file() for p in self.root.glob(f"targets/{self.prefix}*/_done/*")):
                self.seen_at = time.perf_counter() - self.start_t
            time.sleep(0.2)


def gpu_pids() -> list[int]:
    """PIDs of processes holding a CUDA context (nvidia-smi), empty without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(p) for p in out.split() if p.strip().isdigit()]


def shard_prints(root: Path, version: str) -> list:
    """The per-shard checksums a complete version's manifest records."""
    store = TargetStore(Root(str(root)))
    manifest = store.manifest(version)
    assert manifest.status == "complete", f"{version} is {manifest.status}"
    return store.shard_sums(manifest).by_shard()


def generate_args(a: argparse.Namespace, plan: str, text: str) -> list[str]:
    args = ["generate", "--plan", plan, "--text", text, "--model", a.model, "--steps", str(a.steps),
            "--size", str(a.size), "--batch", str(a.batch), "--shard-size", str(a.batch),
            "--compile", a.compile, "--device", a.device]
    return args + (["--dtype", a.dtype] if a.dtype else [])


def teacher_args(a: argparse.Namespace, video: str, teacher: str) -> list[str]:
    return ["teachers", "--video", video, "--teacher", teacher, "--model", a.model, "--batch", str(a.teacher_batch),
            "--device", a.device, "--dtype", "bf16" if a.device == "cuda" else "fp32"]


def run_build(a: argparse.Namespace, work: Path, base: Path, plan: str, text: str, workers: int) -> dict:
    """One whole build (generate, then each teacher) over ``--dask-local workers`` in a copy of base."""
    root = work / f"w{workers}"
    shutil.copytree(base, root)
    dask = ["--dask-local", str(workers)]
    watch = FirstShard(root, "video-")
    watch.start()
    video, t_gen = foresight(root, *generate_args(a, plan, text), *dask)
    watch.stop.set()
    row = {"workers": workers, "generate_s": t_gen, "first_shard_s": watch.seen_at, "video": video,
           "prints": {"generate": shard_prints(root, video)}}
    for teacher in a.teachers:
        version, wall = foresight(root, *teacher_args(a, video, teacher), *dask)
        row[f"{teacher}_s"] = wall
        row["prints"][teacher] = shard_prints(root, version)
    return row


def kill_run(a: argparse.Namespace, work: Path, base: Path, plan: str, text: str, workers: int) -> dict:
    """Generate over ``workers`` Dask workers, SIGKILL one GPU worker after the first shard."""
    root = work / f"kill{workers}"
    shutil.copytree(base, root)
    cmd = [sys.executable, "-c", CLI, *generate_args(a, plan, text), "--dask-local", str(workers),
           "--root", str(root)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = FirstShard(root, "video-")
    watch.start()
    killed = None
    while proc.poll() is None and killed is None:
        if watch.seen_at is not None:
            pids = [p for p in gpu_pids() if p != proc.pid]
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed = {"pid": pids[-1], "at_s": time.perf_counter() - start}
        time.sleep(0.2)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"killed run failed ({proc.returncode}):\n{out}\n{err}")
    video = ID.findall(out)[0]
    return {"workers": workers, "wall_s": wall, "killed": killed, "video": video,
            "prints": shard_prints(root, video)}


def report(a: argparse.Namespace, rows: list[dict], gpus: int, kill: dict | None) -> dict:
    base = rows[0]
    clips = a.clips
    print(f"\n{clips} clips, model {a.model}, {a.steps} steps, {a.size}px, B={a.batch}, {gpus} GPU(s) visible")
    print("| workers | GPUs used | stage | wall s | clips/hour | efficiency vs 1 worker | first shard s | identical to 1 worker |")
    print("|---:|---:|---|---:|---:|---:|---:|---|")
    figures = {}
    for row in rows:
        used = max(1, min(row["workers"], gpus)) if gpus else 1
        for stage in ["generate", *a.teachers]:
            wall = row[f"{stage}_s"]
            rate = clips * 3600 / wall
            eff = (base[f"{stage}_s"] / wall) / used
            same = row["prints"][stage] == base["prints"][stage]
            first = f"{row['first_shard_s']:.1f}" if stage == "generate" and row["first_shard_s"] else ""
            print(f"| {row['workers']} | {used} | {stage} | {wall:.1f} | {rate:,.0f} | {eff:.3f} | {first} | {same} |")
            figures[f"{stage}_w{row['workers']}_efficiency"] = round(eff, 4)
            figures[f"{stage}_w{row['workers']}_identical"] = same
    if kill is not None:
        same = kill["prints"] == base["prints"]["generate"]
        shard_s = base["generate_s"] / max(1, -(-clips // a.batch))
        extra = kill["wall_s"] - next(r["generate_s"] for r in rows if r["workers"] == kill["workers"])
        print(f"\nkilled worker: {kill['killed']}, wall {kill['wall_s']:.1f} s, extra {extra:.1f} s "
              f"= {extra / shard_s:.2f} x one shard's time at 1 worker ({shard_s:.1f} s); identical to 1 worker: {same}")
        figures.update(kill_extra_shards=round(extra / shard_s, 3), kill_identical=same)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None)
    p.add_argument("--compile", default="none")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--teacher-batch", type=int, default=16)
    p.add_argument("--teachers", default="dinov2,da3")
    p.add_argument("--workers-list", default="1,2")
    p.add_argument("--kill", action="store_true")
    p.add_argument("--work", default=None, help="Scratch folder (default: a temporary one).")
    p.add_argument("--json", default=None, help="Write the headline figures here.")
    a = p.parse_args()
    a.teachers = [t for t in a.teachers.split(",") if t]
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-dask-gpus-"))
    base, plan, text = build_base(work, a.clips, a.frames, a.model, a.device)
    gpus = _gpu_count() if a.device == "cuda" else 0
    counts = [int(n) for n in a.workers_list.split(",")]
    rows = []
    for n in counts:
        rows.append(run_build(a, work, base, plan, text, n))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "prints"}), flush=True)
    kill = kill_run(a, work, base, plan, text, max(counts)) if a.kill else None
    figures = report(a, rows, gpus, kill)
    if a.json:
        Path(a.json).write_text(json.dumps({"gpus": gpus, **figures}, indent=2))


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


if __name__ == "__main__":
    main()
