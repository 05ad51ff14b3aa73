"""Export/streaming read throughput against a raw read and S-VAM's released layout, same data, same run.

Builds, in a temporary root, N full-size clips (frames 16x256x256x3 uint8, one-step features
16x16x16x2560 float16, DINOv2-size teacher maps 16x16x16x768 + reference), exports them with the f16
and fp8 codecs, and writes the same clips in S-VAM's layout (one folder per sample of float32 .npy:
full_video_frames.npy, one_step_features.npy 16x256x2560). Then, on warm page cache, times:

- raw:        a sequential read of the f16 export's shard files (the bytes ShardStream reads)
- ShardStream: f16 (in-process, 1 and 2 DataLoader workers, with checksum verification) and fp8
- ZarrClips:   random access to the same fields straight from the target store
- S-VAM:      np.load of both float32 files per sample, without and with recomputing the teacher
              maps from the frames with the tiny DINOv2 teacher (what S-VAM does at every step)

It prints samples/s, MB/s, the ratios the issue sets goals for, bytes per sample and the fp8 error
against float16 on the real-size random features and on tiny-model (SVD and DINOv2) features.

    python bench/bench_export.py [--samples 6] [--epochs 3] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flows.export import ExportConfig, export_recipe, plan_export, write_shard  # noqa: E402
from pipelines.export import decode_fp8, encode_fp8, encode_sample, relative_l2, sample_key  # noqa: E402
from schemas.dataset import DatasetInfo, EpisodeRecord, FeatureSpec  # noqa: E402
from schemas.model import ModelIdentity  # noqa: E402
from schemas.plan import ClipRow, PlanInfo  # noqa: E402
from schemas.target import ArraySpec, TargetRecipe, content_id  # noqa: E402
from storage.episodes import EpisodeStore  # noqa: E402
from storage.exports import ClipSource, ExportStore  # noqa: E402
from storage.fs import Root  # noqa: E402
from storage.plans import PlanStore  # noqa: E402
from storage.targets import TargetStore  # noqa: E402
from trainers.data import ShardStream, ZarrClips, collate_samples  # noqa: E402

T, SIZE, GRID, ONESTEP_C, TEACHER_C = 16, 256, 16, 2560, 768
SECTION = "## Issue 7: export and streaming (ShardStream, ZarrClips) vs a raw read and S-VAM's layout"


# building the data ------------------------------------------------------------------------------
def build_root(folder: str, samples: int) -> dict[str, str]:
    """Dataset, plan, video and teacher versions of ``samples`` full-size random clips."""
    root = Root(folder)
    features = {"action": FeatureSpec(dtype="float32", shape=[7]), "state": FeatureSpec(dtype="float32", shape=[15])}
    episodes = EpisodeStore(root, "bench")
    episodes.write_info(DatasetInfo(name="bench", source_kind="synthetic", source="bench", source_fingerprint="b",
                                    fps=10, cameras={"cam": [32, 32, 3]}, features=features))
    rng = np.random.default_rng(0)
    record = EpisodeRecord(episode_id="e0", task="t", length=samples + 16, source_path="bench", source_checksum="b")
    with episodes.writer(record, features) as writer:
        writer.append_frames("cam", rng.integers(0, 256, (samples + 16, 32, 32, 3), dtype=np.uint8))
        writer.set_lowdim({"action": rng.standard_normal((samples + 16, 7)).astype(np.float32),
                           "state": rng.standard_normal((samples + 16, 15)).astype(np.float32)})
    rows = [ClipRow(clip_id=f"e0_{i}", dataset="bench", episode_id="e0", camera="cam", start=i, num_frames=T,
                    stride=1, instruction="open the drawer") for i in range(samples)]
    plan_id = content_id("plan", {"bench": samples})
    PlanStore(root).write(PlanInfo(plan_id=plan_id, dataset="bench", dataset_fingerprint="b", params={},
                                   num_clips=samples), rows)
    video = write_version(root, "video", "svd.generate", {"plan": plan_id}, {
        "frames": lambda r, n: r.integers(0, 256, (n, T, SIZE, SIZE, 3), dtype=np.uint8),
        "onestep": lambda r, n: r.standard_normal((n, T, GRID, GRID, ONESTEP_C), dtype=np.float32).astype(np.float16),
        "seed": lambda r, n: np.arange(n, dtype=np.int64)}, samples)
    teacher = write_version(root, "teacher", "teachers.dinov2", {"video": video}, {
        "target": lambda r, n: r.standard_normal((n, T, GRID, GRID, TEACHER_C), dtype=np.float32).astype(np.float16),
        "reference": lambda r, n: r.standard_normal((n, 1, GRID, GRID, TEACHER_C), dtype=np.float32).astype(np.float16)},
        samples)
    return {"root": root.url, "plan": plan_id, "video": video, "teacher": teacher}


def write_version(root: Root, kind: str, stage: str, inputs: dict[str, str],
                  makers: dict[str, Callable[[np.random.Generator, int], np.ndarray]], samples: int) -> str:
    """A complete version written shard by shard (2 clips per shard) through the real TargetStore."""
    rng = np.random.default_rng(len(kind))
    probes = {name: make(rng, 1) for name, make in makers.items()}
    specs = [ArraySpec(name=n, shape=[samples, *a.shape[1:]], dtype=str(a.dtype)) for n, a in probes.items()]
    recipe = TargetRecipe(kind=kind, stage=stage, stage_version=1, params={"bench": True}, inputs=inputs,
                          model=ModelIdentity(spec="random", family=stage, source="random", seed=0))
    writer = TargetStore(root).begin(recipe, specs, num_clips=samples, shard_size=2)
    for shard in writer.pending_shards():
        clips = writer.shard_clips(shard)
        writer.write_shard(shard, {n: make(rng, len(clips)) for n, make in makers.items()})
    writer.finalize()
    return writer.version_id


def export(world: dict[str, str], codec: str) -> str:
    config = ExportConfig(plan=world["plan"], targets=[world["video"], world["teacher"]], codec=codec,
                          shard_size="64MB")
    recipe = export_recipe(world["root"], config)
    store = ExportStore(world["root"])
    store.begin(plan_export(world["root"], recipe))
    for shard in store.pending_shards(recipe.export_id()):
        write_shard(world["root"], recipe.export_id(), shard)
    store.finalize(recipe.export_id())
    return recipe.export_id()


def write_svam(folder: str, world: dict[str, str]) -> list[str]:
    """S-VAM's released cache: one folder per sample, float32 .npy files."""
    video = TargetStore(world["root"]).open(world["video"])
    folders = []
    for clip in range(video.manifest.num_clips):
        sample = os.path.join(folder, f"sample_{clip:06d}")
        os.makedirs(sample, exist_ok=True)
        np.save(os.path.join(sample, "full_video_frames.npy"), video.read("frames", clip).astype(np.float32))
        onestep = video.read("onestep", clip).astype(np.float32).reshape(T, GRID * GRID, ONESTEP_C)
        np.save(os.path.join(sample, "one_step_features.npy"), onestep)
        folders.append(sample)
    return folders


# readers ---------------------------------------------------------------------------------------
def raw_read(paths: list[str]) -> int:
    """Sequential read of whole files through one reused 1 MiB buffer, each chunk read once by the CPU
    (the same pass ``touch`` makes over every other reader's samples); returns bytes."""
    buffer, total = np.empty(1 << 20, dtype=np.uint8), 0
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                np.bitwise_xor.reduce(buffer[:count // 8 * 8].view(np.uint64))
                total += count
    return total


def loader_samples(dataset, workers: int) -> Iterable[dict]:
    return torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=workers, collate_fn=collate_samples,
                                       persistent_workers=workers > 0, prefetch_factor=2 if workers else None)


def svam_samples(folders: list[str], teacher) -> Iterable[dict]:
    for folder in folders:
        frames = np.load(os.path.join(folder, "full_video_frames.npy"))
        onestep = np.load(os.path.join(folder, "one_step_features.npy"))
        sample = {"frames": frames, "onestep": onestep}
        if teacher is not None:
            clip = torch.from_numpy(frames.astype(np.uint8))[None]
            sample["target"], sample["reference"] = teacher.encode_clips(clip, clip[:, 0])
        yield sample


def touch(sample) -> int:
    """Read every byte of every array of a sample once (as a copy to pinned memory or the GPU would),
    so zero-copy (memory-mapped) readers pay for bringing their data in like everyone else."""
    total = 0
    if not isinstance(sample, dict):
        return total
    for value in sample.values():
        array = value.numpy() if isinstance(value, torch.Tensor) else value
        if isinstance(array, np.ndarray) and array.size and array.flags.c_contiguous:
            total += int(np.bitwise_xor.reduce(_words(array)))
    return total


def _words(array: np.ndarray) -> np.ndarray:
    raw = array.reshape(-1).view(np.uint8)
    usable = len(raw) // 8 * 8
    return raw[:usable].view(np.uint64) if usable else raw


def timed(make_iter: Callable[[], Iterable], epochs: int) -> tuple[float, int]:
    """Best seconds per epoch over ``epochs`` timed epochs after one warm-up epoch, and samples per
    epoch; every sample's pages are touched (see ``touch``)."""
    count = sum(1 for _ in make_iter())
    best = float("inf")
    for _ in range(epochs):
        start = time.perf_counter()
        for sample in make_iter():
            touch(sample)
        best = min(best, time.perf_counter() - start)
    return best, count


# error of fp8 ----------------------------------------------------------------------------------
def fp8_errors(world: dict[str, str]) -> dict[str, float]:
    from pipelines.svd.loading import load_svd
    from pipelines.svd.sampler import SVDParams, one_step_features
    from pipelines.teachers import load_teacher

    rng = np.random.default_rng(5)
    errors = {}
    video = TargetStore(world["root"]).open(world["video"])
    real = video.read("onestep", 0)
    errors["random one-step features 16x16x16x2560"] = relative_l2(decode_fp8(*encode_fp8(real)), real)
    svd = load_svd("tiny")
    text = rng.standard_normal((20, svd.unet.config.cross_attention_dim // 2)).astype(np.float32)
    frame = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    tiny = one_step_features(svd, SVDParams(size=64, steps=2), frame, text, 0)
    errors[f"tiny SVD one-step features {'x'.join(map(str, tiny.shape))}"] = relative_l2(
        decode_fp8(*encode_fp8(tiny)), tiny)
    teacher = load_teacher("dinov2", "tiny")
    frames = torch.from_numpy(video.read("frames", 0))[None]
    maps = teacher.encode_frames(frames)[0].float().numpy().astype(np.float16)
    errors[f"tiny DINOv2 maps {'x'.join(map(str, maps.shape))}"] = relative_l2(decode_fp8(*encode_fp8(maps)), maps)
    return errors


def field_bytes(world: dict[str, str], codec: str) -> dict[str, int]:
    """Tar bytes (header + payload + padding) per field of one sample; 'json' = metadata member."""
    store = ExportStore(world["root"])
    recipe = export_recipe(world["root"], ExportConfig(plan=world["plan"], targets=[world["video"], world["teacher"]],
                                                       codec=codec))
    source = ClipSource(world["root"], world["plan"], recipe.sources, recipe.action_chunk)
    members, _ = encode_sample(sample_key(0), source.meta(0, "export-000000000000"), source.read([0])[0], codec,
                               ("actions", "actions_mask", "state"))
    sizes: dict[str, int] = {}
    for name, payload in members:
        field = name.split(".", 1)[1].removesuffix(".npy").removesuffix(".fp8scale").removesuffix(".fp8")
        sizes[field] = sizes.get(field, 0) + 512 + -(-len(payload) // 512) * 512
    del store
    return sizes


# the run ---------------------------------------------------------------------------------------
def measure(world: dict[str, str], folders: list[str], exports: dict[str, str], epochs: int) -> list[tuple]:
    """(name, seconds per epoch, samples, bytes read per epoch) of every reader."""
    from pipelines.teachers import load_teacher

    store = ExportStore(world["root"])
    pins = [world["video"], world["teacher"]]
    shard_paths = {codec: [store.root.path(f"exports/{e}/{s.name}") for s in store.index(e).shards]
                   for codec, e in exports.items()}
    shard_bytes = {codec: sum(os.path.getsize(p) for p in paths) for codec, paths in shard_paths.items()}
    zarr_bytes = sum(store.root.du(f"targets/{v}") for v in pins)
    svam_bytes = sum(os.path.getsize(os.path.join(f, n)) for f in folders
                     for n in ("full_video_frames.npy", "one_step_features.npy"))
    teacher = load_teacher("dinov2", "tiny")

    def stream(codec: str, verify: bool = False, decode_fp8: bool = True) -> ShardStream:
        return ShardStream(world["root"], exports[codec], pins, verify=verify, decode_fp8=decode_fp8)

    streams = {name: stream(*args) for name, args in [("f16", ("f16",)), ("f16 verify", ("f16", True)),
                                                      ("fp8", ("fp8",)), ("fp8 codes", ("fp8", False, False))]}

    zarr = ZarrClips(world["root"], world["plan"], pins)
    cases = [
        ("raw read, f16 shards", lambda: iter([raw_read(shard_paths["f16"])]), shard_bytes["f16"]),
        ("raw read, fp8 shards", lambda: iter([raw_read(shard_paths["fp8"])]), shard_bytes["fp8"]),
        ("ShardStream f16, in-process", lambda: iter(streams["f16"]), shard_bytes["f16"]),
        ("ShardStream f16, in-process, verify", lambda: iter(streams["f16 verify"]), shard_bytes["f16"]),
        ("ShardStream fp8, in-process (CPU decode)", lambda: iter(streams["fp8"]), shard_bytes["fp8"]),
        ("ShardStream fp8, in-process, codes kept for GPU decode", lambda: iter(streams["fp8 codes"]),
         shard_bytes["fp8"]),
        ("ShardStream f16, DataLoader 1 worker", None, shard_bytes["f16"]),
        ("ShardStream f16, DataLoader 2 workers", None, shard_bytes["f16"]),
        ("ShardStream fp8, DataLoader 2 workers", None, shard_bytes["fp8"]),
        ("ZarrClips, in-process", lambda: (zarr[i] for i in range(len(zarr))), zarr_bytes),
        ("ZarrClips, DataLoader 2 workers", None, zarr_bytes),
        ("S-VAM float32 .npy folders", lambda: svam_samples(folders, None), svam_bytes),
        ("S-VAM + tiny teacher recomputed", lambda: svam_samples(folders, teacher), svam_bytes),
    ]
    loaders = {"ShardStream f16, DataLoader 1 worker": loader_samples(stream("f16"), 1),
               "ShardStream f16, DataLoader 2 workers": loader_samples(stream("f16"), 2),
               "ShardStream fp8, DataLoader 2 workers": loader_samples(stream("fp8"), 2),
               "ZarrClips, DataLoader 2 workers": loader_samples(zarr, 2)}
    results = []
    for name, make, nbytes in cases:
        make = make or (lambda loader=loaders[name]: iter(loader))
        seconds, count = timed(make, epochs)
        count = len(folders) if name.startswith("raw") else count
        results.append((name, seconds, count, nbytes))
        print(f"  {name:<44} {count / seconds:8.2f} samples/s {nbytes / seconds / 1e6:9.1f} MB/s", flush=True)
    return results


def report(results: list[tuple], sizes: dict[str, float], errors: dict[str, float], samples: int,
           field_sizes: dict[str, dict[str, int]]) -> str:
    rate = {name: count / seconds for name, seconds, count, _ in results}
    lines = [SECTION, "", f"`python bench/bench_export.py --samples {samples}` on this CPU machine (2 cores shared "
             "with other jobs, so figures are noisy; warm page cache; best of the timed epochs). Each sample: frames "
             "16x256x256x3, one-step features 16x16x16x2560, DINOv2-size teacher target 16x16x16x768 + reference, "
             "actions, state. Every byte of every reader's samples is read once by the CPU (an XOR reduction, standing in "
             "for the copy to pinned memory or the GPU), so memory-mapped reads are not free; the raw read copies "
             "the shard files through a reused 1 MiB buffer and makes the same pass over each chunk.", "",
             "| reader | samples/s | MB/s read |", "|---|---:|---:|"]
    lines += [f"| {n} | {c / s:.2f} | {b / s / 1e6:.0f} |" for n, s, c, b in results]
    svam = rate["S-VAM float32 .npy folders"]
    svam_teacher = rate["S-VAM + tiny teacher recomputed"]
    ratios = [
        ("ShardStream f16 in-process / raw read of the same bytes (goal >= 0.90)",
         rate["ShardStream f16, in-process"] / rate["raw read, f16 shards"]),
        ("ShardStream f16 with verify / raw read", rate["ShardStream f16, in-process, verify"] / rate["raw read, f16 shards"]),
        ("ShardStream fp8 in-process, CPU decode / raw read of the fp8 bytes",
         rate["ShardStream fp8, in-process (CPU decode)"] / rate["raw read, fp8 shards"]),
        ("ShardStream fp8 in-process, codes kept / raw read of the fp8 bytes",
         rate["ShardStream fp8, in-process, codes kept for GPU decode"] / rate["raw read, fp8 shards"]),
        ("ShardStream f16 in-process / S-VAM layout, no recompute", rate["ShardStream f16, in-process"] / svam),
        ("ShardStream f16 in-process / S-VAM layout + teacher recompute (goal >= 5)",
         rate["ShardStream f16, in-process"] / svam_teacher),
        ("ShardStream f16 2 workers / S-VAM + teacher recompute",
         rate["ShardStream f16, DataLoader 2 workers"] / svam_teacher),
        ("ZarrClips in-process / S-VAM + teacher recompute", rate["ZarrClips, in-process"] / svam_teacher),
    ]
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {n} | {v:.2f}x |" for n, v in ratios]
    lines += ["", "| bytes per sample | MB | vs S-VAM |", "|---|---:|---:|"]
    svam_bytes = sizes["S-VAM float32 (frames + one-step)"]
    lines += [f"| {n} | {b / 1e6:.3f} | {b / svam_bytes:.2%} |" for n, b in sizes.items()]
    lines += ["", "| fp8 (e4m3, per-channel scales) vs float16 | relative L2 |", "|---|---:|"]
    lines += [f"| {n} | {e:.2%} |" for n, e in errors.items()]
    fp8_share = sizes["export fp8, S-VAM's fields (frames + one-step + json)"] / svam_bytes
    lines += ["", "Goals:",
              f"- ShardStream >= 90% of the raw read: {ratios[0][1]:.0%} in-process (shards are memory-mapped: "
              "no copy). Through DataLoader worker processes it is far lower on this 2-core VM: each 31 MB "
              "sample is copied into fresh shared memory and handed over (torch's transport), which costs more "
              "than reading it; use num_workers=0 (or few workers) for f16 exports, workers pay off when "
              "there is per-sample CPU work (fp8 CPU decode, augmentation).",
              f"- >= 5x the samples/s of the S-VAM layout with the teacher recomputed: {ratios[5][1]:.0f}x "
              f"in-process, {ratios[6][1]:.1f}x with 2 workers; ZarrClips {ratios[7][1]:.1f}x.",
              f"- fp8 bytes <= 25% of S-VAM's: {fp8_share:.2%} for the same fields (uint8 frames and e4m3 "
              "features are exactly 25% of float32; tar headers, per-channel scales and the JSON add the rest).",
              f"- fp8 relative L2 <= 2%: not met, {max(errors.values()):.2%} at most. That is the floor of a "
              "3-bit mantissa with round-to-nearest (per-element error up to 2^-4 relative; scaling cannot "
              "lower it); the tested bound is |x - x'| <= 2^-4 |x| + 2^-10 s_c (+ float16 rounding), see "
              "pipelines/export.py. bf16 (0.2-0.4%) or f16 (exact) meet the error goal at 2x the bytes.",
              "- fp8 decode on the CPU is slow here (one table lookup + multiply per value, ~14 M values per "
              "sample); `ShardStream(decode_fp8=False)` keeps the uint8 codes and `trainers.data.fp8_to_float` "
              "decodes a batch on the GPU."]
    return "\n".join(lines) + "\n"


def sample_sizes(world, exports, folders, field_sizes) -> dict[str, float]:
    store = ExportStore(world["root"])
    n = len(folders)
    svam = sum(os.path.getsize(os.path.join(f, x)) for f in folders
               for x in ("full_video_frames.npy", "one_step_features.npy")) / n
    same = {codec: sum(v for k, v in sizes.items() if k in ("frames", "onestep", "json")) for codec, sizes in field_sizes.items()}
    return {"S-VAM float32 (frames + one-step)": svam,
            "export f16, whole sample (incl. teacher maps, actions)": store.index(exports["f16"]).total_bytes / n,
            "export fp8, whole sample (incl. teacher maps, actions)": store.index(exports["fp8"]).total_bytes / n,
            "export f16, S-VAM's fields (frames + one-step + json)": same["f16"],
            "export fp8, S-VAM's fields (frames + one-step + json)": same["fp8"]}


def write_results(path: str, text: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving other sections alone."""
    old = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + (old[end + 1:] if end >= 0 else "")
    with open(path, "w") as handle:
        handle.write(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=6, help="Full-size clips (~31 MB each as f16).")
    parser.add_argument("--epochs", type=int, default=5, help="Timed epochs per reader (after one warm-up).")
    parser.add_argument("--results", default=None, help="Write the markdown section into this RESULTS.md.")
    parser.add_argument("--keep", default=None, help="Build under this folder and keep it (default: temp, removed).")
    args = parser.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="bench-export-")
    try:
        print(f"building {args.samples} full-size clips under {folder} ...", flush=True)
        world = build_root(os.path.join(folder, "root"), args.samples)
        exports = {codec: export(world, codec) for codec in ("f16", "fp8")}
        folders = write_svam(os.path.join(folder, "svam"), world)
        field_sizes = {codec: field_bytes(world, codec) for codec in ("f16", "fp8")}
        print("timing (samples/s, MB/s of stored bytes read):", flush=True)
        results = measure(world, folders, exports, args.epochs)
        sizes = sample_sizes(world, exports, folders, field_sizes)
        errors = fp8_errors(world)
        text = report(results, sizes, errors, args.samples, field_sizes)
        print("\n" + text)
        if args.results:
            write_results(args.results, text)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
