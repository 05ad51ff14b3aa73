"""Teacher throughput end to end from the store against the bare model forward, same batch, same run.

For each teacher (DINOv2 ViT-B/14 with registers, DA3-LARGE stage 0; ``random`` real-size weights):

- bare: ``teacher.encode_pixels`` on one batch already preprocessed on the device (the target
  call, then target + reference call), timed over repeats after a warm-up;
- end to end: ``flows.teachers_engine.encode_shards`` over a `video` version in a target store
  on local disk: read uint8 frames, preprocess on the device, forward, copy back, compress and
  write the `teacher` version, all overlapped.

Frames/s count the generated frames (T per clip); the reference frame each clip also needs is
part of the work, which is why the ratio is taken against "bare target+reference".

    python bench/bench_teachers.py [--device cuda] [--dtype bf16] [--clips 512] [--batch 16]
                                   [--teachers dinov2,da3] [--writers 4] [--model random]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torch and the project are imported inside the functions: I/O worker processes re-import this
# script as their __main__ and should not pay for torch.

T = 16
SIZE = 256  # SVD output frames


def synthetic_clips(count: int, seed: int) -> np.ndarray:
    """Smooth moving frames (compress like video, unlike noise): (count, T, 256, 256, 3) uint8."""
    import torch

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
    images = torch.nn.functional.interpolate(torch.from_numpy(base).float(), size=(SIZE + 64, SIZE + 64),
                                             mode="bilinear", align_corners=False)
    frames = [images[:, :, 4 * t:4 * t + SIZE, 2 * t:2 * t + SIZE] for t in range(T)]  # a slow pan
    return torch.stack(frames, 1).permute(0, 1, 3, 4, 2).round().to(torch.uint8).numpy()


def write_video_version(root: str, clips: int, shard: int) -> str:
    """A complete `video` version with `frames` and `observed` (the conditioning frame)."""
    from schemas.target import ArraySpec, TargetRecipe
    from storage.targets import TargetStore

    arrays = [ArraySpec(name="frames", shape=[clips, T, SIZE, SIZE, 3], dtype="uint8"),
              ArraySpec(name="observed", shape=[clips, SIZE, SIZE, 3], dtype="uint8")]
    recipe = TargetRecipe(kind="video", stage="bench.synthetic", stage_version=1, params={"clips": clips})
    writer = TargetStore(root).begin(recipe, arrays, clips, shard_size=shard)
    for index in range(writer.num_shards):
        rows = writer.shard_clips(index)
        frames = synthetic_clips(len(rows), seed=index)
        writer.write_shard(index, {"frames": frames, "observed": frames[:, 0]})
    writer.finalize()
    return writer.version_id


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(teacher, frames_BTHWC, repeats: int) -> dict[str, float]:
    """Frames/s of the model forward alone on one preprocessed batch (target; target + reference)."""
    import torch

    with torch.inference_mode():
        return _bare_forward(teacher, frames_BTHWC, repeats)


def _bare_forward(teacher, frames_BTHWC, repeats: int) -> dict[str, float]:
    pixels = teacher.pixels(frames_BTHWC)
    ref_pixels = teacher.pixels(frames_BTHWC[:, :1])
    out = {}
    for name, calls in (("target", [pixels]), ("target+ref", [pixels, ref_pixels])):
        for _ in range(2):
            for p in calls:
                teacher.encode_pixels(p)
        sync(teacher.device)
        start = time.perf_counter()
        for _ in range(repeats):
            for p in calls:
                teacher.encode_pixels(p)
        sync(teacher.device)
        out[name] = repeats * pixels.shape[0] * pixels.shape[1] / (time.perf_counter() - start)
    return out


def end_to_end(teacher, root: str, video_id: str, clips: int, batch: int, writers: int, readers: int,
               processes: bool, tag: str) -> dict[str, float]:
    """Frames/s of encode_shards over the first ``clips`` clips into a fresh teacher version."""
    from flows.teachers_engine import encode_shards, teacher_arrays, teacher_recipe
    from flows.teachers_io import ObservedFrames, open_video
    from storage.targets import TargetStore

    video = open_video(root, video_id)
    recipe = teacher_recipe(teacher, video_id)
    recipe.params = {**recipe.params, "bench": tag}  # a fresh version per measurement
    store = TargetStore(root)
    n = min(clips, video.manifest.num_clips)
    writer = store.begin(recipe, teacher_arrays(n, T, teacher), n, video.manifest.shard_size)
    result = encode_shards(teacher, video, ObservedFrames(root, video), writer, list(range(writer.num_shards)),
                           batch, writers, readers, io_processes=processes)
    writer.finalize()
    written = store.root.du(f"targets/{writer.version_id}")
    store.delete(writer.version_id)
    steady = result.frames / max(result.seconds - result.startup_s, 1e-9)
    return {"frames_per_s": result.frames / result.seconds, "steady_frames_per_s": steady,
            "startup_s": result.startup_s, "seconds": result.seconds,
            "wait_read_s": result.wait_read_s, "wait_write_s": result.wait_write_s, "written_gb": written / 1e9}


def bench_teacher(name: str, args, root: str, video_id: str) -> dict:
    import torch

    from flows.teachers_io import open_video
    from pipelines.teachers import load_teacher

    started = time.perf_counter()
    teacher = load_teacher(name, args.model, None, args.device, args.dtype)
    load_s = time.perf_counter() - started
    frames = torch.from_numpy(open_video(root, video_id).read("frames", slice(0, args.batch)))
    bare = bare_forward(teacher, frames.to(teacher.device), args.repeats)
    rows = []
    clips = args.clips_da3 if name == "da3" else args.clips
    for writers in args.writers:
        e2e = end_to_end(teacher, root, video_id, clips, args.batch, writers, args.readers, args.io == "processes",
                         f"w{writers}")
        e2e.update(writers=writers, clips=clips, ratio_vs_bare_target_ref=e2e["frames_per_s"] / bare["target+ref"],
                   steady_ratio_vs_bare_target_ref=e2e["steady_frames_per_s"] / bare["target+ref"],
                   ratio_vs_bare_target=e2e["frames_per_s"] / bare["target"])
        rows.append(e2e)
    del teacher
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"teacher": name, "load_s": load_s, "bare": bare, "e2e": rows,
            "out_shape": [T, *frames.shape[2:4]]}


def report(results: list[dict], args) -> None:
    import torch

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {device}, dtype {args.dtype}, model {args.model}, {args.clips} clips x {T} frames "
          f"of {SIZE}x{SIZE}, batch {args.batch} clips ({args.batch * T} frames), shard {args.shard} clips, "
          f"store I/O in {args.io} ({args.readers} readers), {os.cpu_count()} cores")
    print(f"{'teacher':<8} {'bare tgt f/s':>12} {'bare tgt+ref':>12} {'clips':>5} {'writers':>7} {'e2e f/s':>9} "
          f"{'e2e/bare':>8} {'e2e/tgt':>8} {'start s':>7} {'steady/bare':>11} {'wait rd s':>9} {'wait wr s':>9} "
          f"{'GB out':>7}")
    for r in results:
        for e in r["e2e"]:
            print(f"{r['teacher']:<8} {r['bare']['target']:>12.0f} {r['bare']['target+ref']:>12.0f} {e['clips']:>5} "
                  f"{e['writers']:>7} {e['frames_per_s']:>9.0f} {e['ratio_vs_bare_target_ref']:>8.2f} "
                  f"{e['ratio_vs_bare_target']:>8.2f} {e['startup_s']:>7.2f} {e['steady_ratio_vs_bare_target_ref']:>11.2f} "
                  f"{e['wait_read_s']:>9.2f} {e['wait_write_s']:>9.2f} "
                  f"{e['written_gb']:>7.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--model", default="random", help="random (real size) or tiny")
    parser.add_argument("--teachers", default="dinov2,da3")
    parser.add_argument("--clips", type=int, default=512)
    parser.add_argument("--shard", type=int, default=16, help="clips per shard of the video/teacher versions")
    parser.add_argument("--batch", type=int, default=16, help="clips per forward (x16 frames)")
    parser.add_argument("--clips-da3", type=int, default=384, help="clips DA3 encodes end to end (1 MB/frame out)")
    parser.add_argument("--writers", default="4", help="comma list: writer threads to try")
    parser.add_argument("--readers", type=int, default=3, help="reader threads/processes")
    parser.add_argument("--io", choices=["processes", "threads"], default="processes", help="store I/O workers")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--root", default=None, help="store root (default: a temp folder, removed after)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    args.writers = [int(w) for w in args.writers.split(",")]
    root = args.root or tempfile.mkdtemp(prefix="bench-teachers-")
    try:
        started = time.perf_counter()
        video_id = write_video_version(root, args.clips, args.shard)
        print(f"video version {video_id}: {args.clips} clips written in {time.perf_counter() - started:.1f}s")
        results = []
        for name in args.teachers.split(","):
            try:
                results.append(bench_teacher(name, args, root, video_id))
            except Exception as err:  # noqa: BLE001 - report and go on with the other teacher
                import traceback

                traceback.print_exc()
                print(f"{name}: FAILED: {err}")
        report(results, args)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
