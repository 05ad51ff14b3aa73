"""Teacher throughput end to end from the store against the bare model forward, same batch, same run.

For each teacher (DINOv2 ViT-B/14 with registers, DA3-LARGE stage 0; ``random`` real-size weights):

- bare: ``teacher.encode_pixels`` on one batch already preprocessed on the device (the target
  call, then target + reference call), timed over repeats after a warm-up; also the
  preprocessing alone and ``teacher.encode_clips`` (all the GPU work of a batch: preprocess,
  forwards, float16 casts), so a gap can be told apart from the GPU work e2e adds;
- end to end: ``flows.teachers_engine.encode_shards`` over a `video` version in a target store
  on local disk: read uint8 frames, upload, preprocess on the device, forward, copy back,
  compress and write the `teacher` version, all overlapped; with the loop's own diagnostics
  (GPU busy/idle from CUDA events, start-up, tail) and a check that the first and last stored
  batches equal ``encode_clips`` of the same batch.

Frames/s count the generated frames (T per clip); the reference frame each clip also needs is
part of the work, which is why the ratio is taken against "bare target+reference".

On CUDA the loop runs with and without CUDA graphs (``--graphs on,off``, TeachersConfig.cuda_graphs:
each batch's device work replayed as one graph), and the bare figures include ``encode_clips_graphed``
(the same work replayed from one graph) beside the eager ``encode_clips``.

The store codecs (``--store-codec f16,bf16,fp8``, TeachersConfig.store_codec) each run end to end
in the same call, against the same bare figures; ``--root`` puts the store on a given folder (the
machine's own disk, e.g. /tmp on the device machine, instead of tmpfs). Headline figures go to
``--results`` (default bench/results/bench_teachers.json): card, torch, commit, date, the store's
file system and its fsync'd write rate (``--disk-probe-gb``: each run's ``disk_cap_ratio`` is the
e2e / bare the disk alone allows for its bytes a clip), and ``teachers_disk_ratio`` (the worst teacher's best e2e / bare target+ref over the
codecs run) with ``<teacher>_<codec>_ratio`` per run.

    python bench/bench_teachers.py [--device cuda] [--dtype bf16] [--clips 512] [--batch 16]
                                   [--teachers dinov2,da3] [--writers 12] [--model random]
                                   [--store-codec f16,fp8] [--root /tmp/bt] [--size tiny]

``--size tiny`` is a CPU smoke check (tiny models, a few clips, 2 writers).

On the device tool (its image has torch; the project's other packages travel as wheels, carry
".whl"): ``python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD`` first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ContextManager

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torch and the project are imported inside the functions: I/O worker processes re-import this
# script as their __main__ and should not pay for torch.

T = 16
SIZE = 256  # SVD output frames
VIDEO_WRITE_THREADS = 8  # the input version is set up, not measured: write shards in parallel
RESULTS_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_teachers.json")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/headline.py
TINY = {"model": "tiny", "clips": 16, "clips_da3": 16, "batch": 4, "shard": 4, "writers": "2", "readers": 1,
        "repeats": 2, "disk_probe_gb": 0.05}
"""``--size tiny``: the smoke-check sizes (CPU, seconds)."""


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
    from foresight.schemas.target import ArraySpec, TargetRecipe
    from foresight.storage.targets import TargetStore

    arrays = [ArraySpec(name="frames", shape=[clips, T, SIZE, SIZE, 3], dtype="uint8"),
              ArraySpec(name="observed", shape=[clips, SIZE, SIZE, 3], dtype="uint8")]
    recipe = TargetRecipe(kind="video", stage="bench.synthetic", stage_version=1, params={"clips": clips})
    if TargetStore(root).status(recipe.version_id()) == "complete":  # a kept --root from an earlier call
        return recipe.version_id()
    writer = TargetStore(root).begin(recipe, arrays, clips, shard_size=shard)

    def write(index: int) -> None:
        frames = synthetic_clips(len(writer.shard_clips(index)), seed=index)
        writer.write_shard(index, {"frames": frames, "observed": frames[:, 0]})

    with ThreadPoolExecutor(VIDEO_WRITE_THREADS) as pool:
        list(pool.map(write, range(writer.num_shards)))
    writer.finalize()
    return writer.version_id


def disk_write_rate(folder: str, gigabytes: float, block_mb: int = 16) -> float:
    """GB/s of one sequential, fsync'd write of ``gigabytes`` into ``folder`` (what ``dd ... conv=fsync``
    measures): the store's disk rate the e2e rows are set against; 0.0 when skipped."""
    if gigabytes <= 0:
        return 0.0
    block = np.random.default_rng(0).integers(0, 256, block_mb << 20, dtype=np.uint8).tobytes()
    count = max(1, int(gigabytes * 1e9 / len(block)))
    path = os.path.join(folder, ".disk-probe")
    start = time.perf_counter()
    try:
        with open(path, "wb") as handle:
            for _ in range(count):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        return count * len(block) / 1e9 / (time.perf_counter() - start)
    finally:
        os.unlink(path)


def add_disk_caps(rows: list[dict], bare_target_ref: float, disk_gbps: float) -> None:
    """Per e2e row: the GB/s its bytes a clip would need at the bare forward's speed, and the ratio
    the disk alone caps it at (``disk_cap_ratio``: disk rate / that need, at most 1)."""
    for e2e in rows:
        gb_per_frame = e2e["written_gb"] / max(e2e["clips"] * T, 1)
        e2e["needed_gbps_at_bare"] = gb_per_frame * bare_target_ref
        if disk_gbps > 0:
            e2e["disk_cap_ratio"] = min(1.0, disk_gbps / max(e2e["needed_gbps_at_bare"], 1e-12))


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
    frames = pixels.shape[0] * pixels.shape[1]
    calls = {"target": [lambda: teacher.encode_pixels(pixels)],
             "target+ref": [lambda: teacher.encode_pixels(pixels), lambda: teacher.encode_pixels(ref_pixels)],
             # the work e2e adds on the GPU: uint8 -> resized, normalised pixels of the clips and references
             "preprocess": [lambda: teacher.pixels(frames_BTHWC), lambda: teacher.pixels(frames_BTHWC[:, :1])],
             # everything e2e runs on the GPU for one batch (preprocess, forwards, float16 casts)
             "encode_clips": [lambda: teacher.encode_clips(frames_BTHWC, frames_BTHWC[:, 0])]}
    if teacher.device.type == "cuda":  # the same, replayed from one CUDA graph (what the loop runs by default)
        from foresight.pipelines.teachers.graphs import GraphedBatches

        graphed = GraphedBatches(lambda f, o: dict(zip(("target", "reference"), teacher.encode_clips(f, o))), copies=1)
        calls["encode_clips_graphed"] = [lambda: graphed(frames_BTHWC, frames_BTHWC[:, 0])]
    return {name: frames / _seconds_per_call(teacher, fns, repeats) for name, fns in calls.items()}


def _seconds_per_call(teacher, fns, repeats: int) -> float:
    for _ in range(2):
        for fn in fns:
            fn()
    sync(teacher.device)
    start = time.perf_counter()
    for _ in range(repeats):
        for fn in fns:
            fn()
    sync(teacher.device)
    return (time.perf_counter() - start) / repeats


def end_to_end(teacher, root: str, video_id: str, clips: int, batch: int, writers: int, readers: int,
               processes: bool, compression: str, store_codec: str, tag: str, cuda_graphs: bool = True,
               around: Callable[[], ContextManager] = contextlib.nullcontext,
               compile_codec: bool = True) -> dict[str, float]:
    """Frames/s of encode_shards over the first ``clips`` clips into a fresh teacher version
    (``encode_shards`` alone runs inside ``around()``: a profiler sees the loop, not the checks).
    ``compile_codec``: as the teachers flow does (TeachersConfig.compile_codec), compile and check
    the fp8 encoding first, outside the timed loop (``codec_check_s``)."""
    from foresight.flows.teachers_engine import (batch_plan, compiled_codec, encode_shards, teacher_arrays,
                                                 teacher_recipe)
    from foresight.flows.teachers_io import ObservedFrames, open_video
    from foresight.storage.targets import TargetStore

    video = open_video(root, video_id)
    recipe = teacher_recipe(teacher, video_id, store_codec=store_codec)
    recipe.params = {**recipe.params, "bench": tag}  # a fresh version per measurement
    store = TargetStore(root)
    n = min(clips, video.manifest.num_clips)
    writer = store.begin(recipe, teacher_arrays(n, T, teacher, compression, store_codec), n,
                         video.manifest.shard_size)
    observed = ObservedFrames(root, video)
    checking = time.perf_counter()
    backend = compiled_codec(writer, teacher.device, batch) if compile_codec else None
    codec_check_s = time.perf_counter() - checking
    with around():
        result = encode_shards(teacher, video, observed, writer, list(range(writer.num_shards)),
                               batch, writers, readers, io_processes=processes, cuda_graphs=cuda_graphs,
                               codec_backend=backend)
    writer.finalize()
    written = store.root.du(f"targets/{writer.version_id}")
    plan = batch_plan(writer, list(range(writer.num_shards)), batch)
    max_diff, rel_l2, eager_bytes = check_written(teacher, video, observed, store.open(writer.version_id),
                                                  [plan[0][1], plan[-1][1]])
    store.delete(writer.version_id)
    steady = result.frames / max(result.seconds - result.startup_s, 1e-9)
    return {"frames_per_s": result.frames / result.seconds, "steady_frames_per_s": steady,
            "startup_s": result.startup_s, "seconds": result.seconds, "tail_s": result.tail_s,
            "open_s": result.open_s, "close_s": result.close_s,
            "first_read_s": result.first_read_s, "first_pin_s": result.first_pin_s,
            "host_busy_s": result.host_busy_s, "gpu_busy_s": result.gpu_busy_s, "gpu_idle_s": result.gpu_idle_s,
            "wait_read_s": result.wait_read_s, "wait_write_s": result.wait_write_s, "written_gb": written / 1e9,
            "written_gb_per_s": written / 1e9 / result.seconds, "max_abs_diff": max_diff, "rel_l2": rel_l2,
            "stored_equal_eager_encoding": eager_bytes, "codec_backend": backend, "codec_check_s": codec_check_s,
            "graph_replays": result.graph_replays, "graphs_failed": result.graphs_failed}


def check_written(teacher, video, observed, written, batches: list[range]) -> tuple[float, float, bool]:
    """Largest |stored - direct| and the worst relative L2 over the given batches of clips: the
    pipelined, overlapped copies must store what ``teacher.encode_clips`` gives for the same batch
    (f16: exactly; bf16/fp8: within the codec's error). Third: whether the stored values equal, bit
    for bit, the eager encoding (on the device) of the direct outputs, decoded."""
    import torch

    from foresight.pipelines.float_codecs import relative_l2
    from foresight.storage.targets import decode_parts, encode_part_tensors, host_parts

    worst = worst_l2 = 0.0
    same = True
    for clips in batches:
        frames = torch.from_numpy(video.read("frames", slice(clips.start, clips.stop))).to(teacher.device)
        obs = torch.from_numpy(observed.read(clips)).to(teacher.device)
        with torch.inference_mode():
            direct = dict(zip(("target", "reference"), teacher.encode_clips(frames, obs), strict=True))
        for name, values in direct.items():
            spec = written.manifest.array_spec(name)
            eager = decode_parts(spec, host_parts(spec, encode_part_tensors(spec, values)), f"bench {name}")
            stored = written.read(name, slice(clips.start, clips.stop))
            same = same and np.array_equal(stored.view(np.uint16), eager.astype(stored.dtype).view(np.uint16))
            stored, direct_f32 = stored.astype(np.float32), values.float().cpu().numpy()
            worst = max(worst, float(np.abs(stored - direct_f32).max()))
            worst_l2 = max(worst_l2, relative_l2(stored, direct_f32))
    return worst, worst_l2, same


def bench_teacher(name: str, args, root: str, video_id: str) -> dict:
    """Bare forward before and after the end-to-end runs (a GPU kept busy for seconds may clock
    lower than one timed for one second), end-to-end runs, ratios against the faster bare figure."""
    import torch

    from foresight.flows.teachers_io import open_video
    from foresight.pipelines.teachers import load_teacher

    started = time.perf_counter()
    teacher = load_teacher(name, args.model, None, args.device, args.dtype)
    load_s = time.perf_counter() - started
    frames = torch.from_numpy(open_video(root, video_id).read("frames", slice(0, args.batch))).to(teacher.device)
    bare_before = bare_forward(teacher, frames, args.repeats)
    clips = args.clips_da3 if name == "da3" else args.clips
    runs = [(writers, compression, codec, graphs, compiled) for codec in args.store_codec
            for compression in args.compression for writers in args.writers for graphs in args.graphs
            for compiled in args.codec_compile]
    rows = [end_to_end(teacher, root, video_id, clips, args.batch, writers, args.readers, args.io == "processes",
                       compression, codec, f"run{run}-w{writers}-{compression}-{codec}-{graphs}-{compiled}",
                       graphs == "on", compile_codec=compiled == "on")
            | {"writers": writers, "clips": clips, "compression": compression, "store_codec": codec, "graphs": graphs,
               "codec_compile": compiled}
            for run, (writers, compression, codec, graphs, compiled) in enumerate(runs)]
    bare_after = bare_forward(teacher, frames, args.repeats)
    profiled = profile_teacher(name, teacher, args, root, video_id, frames) if args.profile else None
    bare = {key: max(bare_before[key], bare_after[key]) for key in bare_before}
    for e2e in rows:
        sustained = e2e["frames_per_s"] * e2e["seconds"] / max(e2e["seconds"] - e2e["startup_s"] - e2e["tail_s"], 1e-9)
        e2e.update(ratio_vs_bare_target_ref=e2e["frames_per_s"] / bare["target+ref"],
                   steady_ratio_vs_bare_target_ref=e2e["steady_frames_per_s"] / bare["target+ref"],
                   sustained_ratio_vs_bare_target_ref=sustained / bare["target+ref"],
                   ratio_vs_bare_target=e2e["frames_per_s"] / bare["target"],
                   ratio_vs_encode_clips=e2e["frames_per_s"] / bare["encode_clips"])
        if "encode_clips_graphed" in bare:
            e2e["ratio_vs_encode_clips_graphed"] = e2e["frames_per_s"] / bare["encode_clips_graphed"]
    add_disk_caps(rows, bare["target+ref"], args.disk_gbps)
    del teacher
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"teacher": name, "load_s": load_s, "bare": bare, "bare_before": bare_before, "bare_after": bare_after,
            "e2e": rows, "out_shape": [T, *frames.shape[2:4]], "profile": profiled}


def profile_teacher(name: str, teacher, args, root: str, video_id: str, frames) -> dict:
    """Where the device time of the teacher loop goes: one end-to-end run (the first writer,
    compression and codec settings) and one bare ``encode_clips`` call under torch.profiler, as
    device ms per frame per kernel class, so the work e2e adds on the device (copies, codec
    encoding, preprocessing of other shapes) shows beside the model's; the e2e's device-busy
    share of its wall time tells a device-bound loop from a host- or I/O-bound one. ``frames``: the
    bare forward's batch of uint8 clips on the device."""
    import torch
    from profiling import class_totals_us, device_busy_us, device_kernels, top_kernels  # bench/profiling.py
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if teacher.device.type == "cuda" else [])
    observed = frames[:, 0]
    with torch.inference_mode():
        teacher.encode_clips(frames, observed)
        sync(teacher.device)
        with profile(activities=activities) as bare_prof:
            teacher.encode_clips(frames, observed)
            sync(teacher.device)
    clips = min(args.clips_da3 if name == "da3" else args.clips, args.profile_clips)
    e2e_prof = profile(activities=activities)
    e2e = end_to_end(teacher, root, video_id, clips, args.batch, args.writers[0], args.readers,
                     args.io == "processes", args.compression[0], args.store_codec[0], "profile",
                     args.graphs[0] == "on", around=lambda: e2e_prof)
    e2e_frames, bare_frames = e2e["frames_per_s"] * e2e["seconds"], frames.shape[0] * frames.shape[1]
    e2e_kernels, bare_kernels = device_kernels(e2e_prof), device_kernels(bare_prof)
    per_frame = {"e2e": {k: us / 1e3 / e2e_frames for k, us in class_totals_us(e2e_kernels).items()},
                 "bare": {k: us / 1e3 / bare_frames for k, us in class_totals_us(bare_kernels).items()}}
    busy_s = device_busy_us(e2e_prof) / 1e6
    codec = codec_timing(teacher, frames, observed, args.store_codec[0], args.repeats)
    return {"clips": clips, "codec_name": args.store_codec[0], "device_ms_per_frame": per_frame,
            "e2e_device_busy_share": busy_s / max(e2e["seconds"], 1e-9), "e2e_seconds": e2e["seconds"],
            "e2e_top": top_kernels(e2e_kernels), "bare_top": top_kernels(bare_kernels), "codec": codec}


def codec_timing(teacher, frames, observed, store_codec: str, repeats: int) -> dict:
    """Device ms per frame of the store codec's encoding of one batch's outputs (what the loop adds to
    the forward for bf16/fp8) eagerly; for fp8 also compiled (``float_codecs.compiled_fp8_encode_core``,
    what the loop runs by default on CUDA), and whether those codes are the eager ones byte for byte."""
    import torch

    from foresight.flows.teachers_engine import teacher_arrays
    from foresight.storage.targets import encode_part_tensors

    with torch.inference_mode():
        outputs = dict(zip(("target", "reference"), teacher.encode_clips(frames, observed)))
    specs = teacher_arrays(frames.shape[0], frames.shape[1], teacher, "none", store_codec)
    per_frame = 1e3 / (frames.shape[0] * frames.shape[1])
    with torch.inference_mode():
        eager_s = _seconds_per_call(teacher, [lambda: [encode_part_tensors(s, outputs[s.name]) for s in specs]],
                                    repeats)
    timing = {"eager_ms_per_frame": eager_s * per_frame}
    if store_codec != "fp8":
        return timing
    with torch.inference_mode():
        equal = all(torch.equal(a, b) for s in specs for a, b in
                    zip(encode_part_tensors(s, outputs[s.name]).values(),
                        encode_part_tensors(s, outputs[s.name], "inductor").values()))
        compiled_s = _seconds_per_call(
            teacher, [lambda: [encode_part_tensors(s, outputs[s.name], "inductor") for s in specs]], repeats)
    return timing | {"compiled_ms_per_frame": compiled_s * per_frame, "compiled_bytes_equal": equal}


def report_profile(name: str, prof: dict) -> None:
    """Print one teacher's profile: device ms per frame per class, e2e against bare."""
    classes = sorted(set(prof["device_ms_per_frame"]["e2e"]) | set(prof["device_ms_per_frame"]["bare"]))
    if not classes:
        print(f"profile {name}: no device kernels recorded (a CPU run: the profile measures CUDA device time)")
        return
    print(f"profile {name}: {prof['clips']} clips, store {prof['codec_name']}; device busy "
          f"{prof['e2e_device_busy_share']:.0%} of the e2e's {prof['e2e_seconds']:.2f}s; device ms per frame:")
    for label in classes:
        e2e, bare = (prof["device_ms_per_frame"][k].get(label, 0.0) for k in ("e2e", "bare"))
        print(f"  {label:<15} e2e {e2e:8.4f}  bare {bare:8.4f}  added {e2e - bare:+8.4f}")
    print("  e2e top kernels: " + "; ".join(f"{n} {ms} ms x{c}" for n, ms, c in prof["e2e_top"][:6]))
    codec = prof["codec"]
    compiled = (f", compiled {codec['compiled_ms_per_frame']:.4f} (codes equal: {codec['compiled_bytes_equal']})"
                if "compiled_ms_per_frame" in codec else "")
    print(f"  store codec {prof['codec_name']} encode, device ms per frame: eager {codec['eager_ms_per_frame']:.4f}"
          + compiled)


def report(results: list[dict], args) -> None:
    import torch

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {device}, dtype {args.dtype}, model {args.model}, {args.clips} clips x {T} frames "
          f"of {SIZE}x{SIZE}, batch {args.batch} clips ({args.batch * T} frames), shard {args.shard} clips, "
          f"store I/O in {args.io} ({args.readers} readers), {os.cpu_count()} cores")
    print("bare f/s (frames of the clips per second): target = forward of the clips, target+ref = with the "
          "reference forward, preprocess = uint8 -> pixels alone, encode_clips = all GPU work of a batch")
    for r in results:
        for when in ("before", "after"):
            print(f"{r['teacher']:<8} {when:<6} " + "  ".join(f"{k} {v:,.0f}" for k, v in r[f"bare_{when}"].items()))
    print("ratios against the faster of the two; steady: without the start-up; sustained: without start-up and tail")
    print(f"{'teacher':<8} {'clips':>5} {'writers':>7} {'zstd?':>5} {'store':>5} {'graphs':>6} {'codec':>8} {'e2e f/s':>9} {'e2e/bare':>8} {'e2e/tgt':>8} "
          f"{'e2e/clips':>9} {'steady/bare':>11} {'sustained':>9} {'seconds':>7} {'start s':>7} {'open s':>6} {'tail s':>6} {'close s':>7} {'host s':>6} "
          f"{'gpu s':>6} {'gpu idle':>8} {'wait rd':>7} {'wait wr':>7} {'GB out':>7} {'GB/s':>5} {'max|diff|':>9} "
          f"{'rel L2':>7} {'eager bytes':>11}")
    for r in results:
        if r.get("profile"):
            report_profile(r["teacher"], r["profile"])
    for r in results:
        for e in r["e2e"]:
            print(f"{r['teacher']:<8} {e['clips']:>5} {e['writers']:>7} {e['compression']:>5} {e['store_codec']:>5} "
                  f"{e['graphs'] + ('!' if e['graphs_failed'] else ''):>6} {e['codec_backend'] or 'eager':>8} "
                  f"{e['frames_per_s']:>9.0f} "
                  f"{e['ratio_vs_bare_target_ref']:>8.2f} {e['ratio_vs_bare_target']:>8.2f} "
                  f"{e['ratio_vs_encode_clips']:>9.2f} {e['steady_ratio_vs_bare_target_ref']:>11.2f} "
                  f"{e['sustained_ratio_vs_bare_target_ref']:>9.2f} "
                  f"{e['seconds']:>7.2f} {e['startup_s']:>7.2f} {e['open_s']:>6.2f} {e['tail_s']:>6.2f} {e['close_s']:>7.2f} {e['host_busy_s']:>6.2f} "
                  f"{e['gpu_busy_s']:>6.2f} {e['gpu_idle_s']:>8.2f} {e['wait_read_s']:>7.2f} {e['wait_write_s']:>7.2f} "
                  f"{e['written_gb']:>7.2f} {e['written_gb_per_s']:>5.2f} {e['max_abs_diff']:>9.2g} "
                  f"{e['rel_l2']:>7.4f} {'yes' if e['stored_equal_eager_encoding'] else 'NO':>11}")
    for r in results:
        for e in r["e2e"]:
            if "disk_cap_ratio" in e:
                print(f"{r['teacher']} {e['store_codec']} graphs {e['graphs']}: at bare speed its bytes need "
                      f"{e['needed_gbps_at_bare']:.2f} GB/s; the disk alone caps e2e/bare at {e['disk_cap_ratio']:.2f}")
            if e["first_read_s"]:
                print(f"{r['teacher']} codec {e['codec_backend'] or 'eager'}: start-up {e['startup_s']:.2f} s = open "
                      f"{e['open_s']:.2f} + first batch read {e['first_read_s']:.2f} + page-locked copy "
                      f"{e['first_pin_s']:.2f} + the rest; fp8 compile and check before the run "
                      f"{e['codec_check_s']:.2f} s")
            if e["graphs_failed"]:
                print(f"{r['teacher']}: CUDA graphs given up, the run went on eagerly ({e['graphs_failed']})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, apply ``--size tiny`` to the options left at their defaults, split the comma lists."""
    args = parser.parse_args()
    if args.size == "tiny":
        for key, value in TINY.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    args.writers = [int(w) for w in str(args.writers).split(",")]
    args.compression = args.compression.split(",")
    args.store_codec = args.store_codec.split(",")
    args.graphs = args.graphs.split(",") if args.device.startswith("cuda") else ["off"]
    if not set(args.graphs) <= {"on", "off"}:
        parser.error(f"--graphs {','.join(args.graphs)}: expected a comma list of on, off")
    args.codec_compile = args.codec_compile.split(",")
    if not set(args.codec_compile) <= {"on", "off"}:
        parser.error(f"--codec-compile {','.join(args.codec_compile)}: expected a comma list of on, off")
    from foresight.flows.teachers_engine import check_store_codec

    for codec in args.store_codec:
        check_store_codec(codec)
    return args


def store_file_system(folder: str) -> str:
    """The file system type holding ``folder`` (from /proc/mounts: the longest mount point above it)."""
    path, best, kind = os.path.realpath(folder), "", "unknown"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and (path == fields[1] or path.startswith(fields[1].rstrip("/") + "/")) \
                        and len(fields[1]) > len(best):
                    best, kind = fields[1], f"{fields[2]} at {fields[1]}"
    except OSError:
        pass
    return kind


def headline(results: list[dict]) -> dict[str, float]:
    """Named figures: ``<teacher>_<codec>_ratio`` (e2e / bare target+ref; the best of repeated runs),
    the same per CUDA-graphs setting and without start-up and tail (``_sustained_ratio``: what a run
    long enough to amortise them approaches), and ``teachers_disk_ratio`` /
    ``teachers_disk_sustained_ratio``, the worst teacher's best ratio over the codecs run."""
    figures: dict[str, float] = {}
    for r in results:
        for e in r["e2e"]:
            for key in (f"{r['teacher']}_{e['store_codec']}_ratio",
                        f"{r['teacher']}_{e['store_codec']}_graphs_{e['graphs']}_ratio",
                        f"{r['teacher']}_{e['store_codec']}_codec_compile_{e['codec_compile']}_ratio"):
                figures[key] = max(figures.get(key, 0.0), round(e["ratio_vs_bare_target_ref"], 4))
            rate = f"{r['teacher']}_{e['store_codec']}_frames_per_s"
            figures[rate] = max(figures.get(rate, 0.0), round(e["frames_per_s"], 1))
            if "disk_cap_ratio" in e:
                figures[f"{r['teacher']}_{e['store_codec']}_disk_cap_ratio"] = round(e["disk_cap_ratio"], 4)
            sustained = f"{r['teacher']}_{e['store_codec']}_sustained_ratio"
            figures[sustained] = max(figures.get(sustained, 0.0), round(e["sustained_ratio_vs_bare_target_ref"], 4))
    best = [max(e["ratio_vs_bare_target_ref"] for e in r["e2e"]) for r in results if r["e2e"]]
    if best:
        figures["teachers_disk_ratio"] = round(min(best), 4)
        figures["teachers_disk_sustained_ratio"] = round(min(
            max(e["sustained_ratio_vs_bare_target_ref"] for e in r["e2e"]) for r in results if r["e2e"]), 4)
    return figures


def save_headline(results: list[dict], args, root: str) -> None:
    """bench/results/bench_teachers.json (bench/headline.py): what was run where, and the named figures."""
    from headline import write_headline  # bench/headline.py, beside this script

    path = write_headline("bench_teachers", headline(results), out=args.results, command=" ".join(sys.argv),
                          store={"root": root, "file_system": store_file_system(root),
                                 "fsync_write_gbps": round(args.disk_gbps, 3)}, size=args.size,
                          model=args.model, bare_target_ref_frames_per_s={r["teacher"]: round(r["bare"]["target+ref"], 1)
                                                                          for r in results})
    print(f"headline figures -> {path}: {headline(results)}")


def command_line() -> argparse.Namespace:
    """The benchmark's options, checked (:func:`parse_args`)."""
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
    parser.add_argument("--writers", default="12", help="comma list: writer threads/processes to try (a "
                                                         "value repeated runs again: first vs warm run)")
    parser.add_argument("--readers", type=int, default=3, help="reader threads/processes")
    parser.add_argument("--compression", default="zstd", help="comma list of stored chunk codecs to try: zstd,none")
    parser.add_argument("--store-codec", default="f16", help="comma list of store codecs to try: f16,bf16,fp8")
    parser.add_argument("--codec-compile", default="on",
                        help="comma list: the fp8 store codec compiled (TeachersConfig.compile_codec, the "
                             "default; CUDA only, checked to give the eager bytes) and/or eager")
    parser.add_argument("--graphs", default="off,on", help="comma list: the loop with CUDA graphs on/off "
                                                             "(CUDA only; TeachersConfig.cuda_graphs)")
    parser.add_argument("--size", choices=["real", "tiny"], default="real",
                        help="tiny: CPU smoke-check sizes (tiny models, few clips); explicit options still win")
    parser.add_argument("--results", default=RESULTS_JSON, help="headline figures (JSON); '' to skip")
    parser.add_argument("--io", choices=["processes", "threads"], default="processes", help="store I/O workers")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--root", default=None, help="store root (default: a temp folder, removed after)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one e2e run and one bare encode_clips per teacher (device ms per "
                             "frame per kernel class, e2e vs bare)")
    parser.add_argument("--profile-clips", type=int, default=256, help="clips of the profiled e2e run")
    parser.add_argument("--disk-probe-gb", type=float, default=2.0,
                        help="GB of one fsync'd sequential write into the store root first (the disk's rate, "
                             "against which each run's bytes are set: disk_cap_ratio); 0 to skip")
    return parse_args(parser)


def main() -> None:
    args = command_line()
    root = args.root or tempfile.mkdtemp(prefix="bench-teachers-")
    if args.io == "processes":
        from foresight.flows.teachers_engine import start_fork_server

        start_fork_server()  # as the teachers flow does: it boots while the data and teacher load
    try:
        started = time.perf_counter()
        video_id = write_video_version(root, args.clips, args.shard)
        print(f"video version {video_id}: {args.clips} clips written in {time.perf_counter() - started:.1f}s")
        args.disk_gbps = disk_write_rate(root, args.disk_probe_gb)
        if args.disk_gbps:
            print(f"store disk: {args.disk_gbps:.2f} GB/s, one sequential fsync'd write of {args.disk_probe_gb} GB")
        results = []
        for name in args.teachers.split(","):
            try:
                results.append(bench_teacher(name, args, root, video_id))
            except Exception as err:  # noqa: BLE001 - report and go on with the other teacher
                import traceback

                traceback.print_exc()
                print(f"{name}: FAILED: {err}")
        report(results, args)
        if args.results:
            save_headline(results, args, root)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
