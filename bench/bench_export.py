"""Export/streaming read throughput against a raw read and S-VAM's released layout, same data, same run.

Builds, in a temporary root, N full-size clips (frames 16x256x256x3 uint8, one-step features
16x16x16x2560 float16, DINOv2-size teacher maps 16x16x16x768 + reference), exports them with the f16
and fp8 codecs, and writes the same clips in S-VAM's layout (one folder per sample of float32 .npy:
full_video_frames.npy, one_step_features.npy 16x256x2560). Frames are real MetaWorld renders
(`--frames metaworld`, the default: 16-frame windows of scripted drawer-open rollouts, corner2
camera, rendered at 256x256 with osmesa) or uniform noise (`--frames noise`); features are random.
Then, on warm page cache, times:

- raw:        a sequential read of the f16 export's shard files (the bytes ShardStream reads)
- ShardStream: f16 (in-process; 1 and 2 DataLoader workers, per sample through collate_zero_copy and
              in batches of one through collate_samples; with checksum verification) and fp8
- ZarrClips:   random access to the same fields straight from the target store
- S-VAM:      np.load of both float32 files per sample, without and with recomputing the teacher
              maps from the frames with the tiny DINOv2 teacher (what S-VAM does at every step)

It prints samples/s, MB/s, the ratios the issue sets goals for, bytes per sample (S-VAM's side:
its real .npy file sizes, headers included) and the fp8 error against float16 on real-size random
features (Gaussian and Student-t(3)) and on tiny-model (SVD and DINOv2) features, for the codec's
companding exponent and the alternatives it was chosen over.

    python bench/bench_export.py [--samples 6] [--epochs 3] [--frames metaworld] [--results bench/RESULTS.md]
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

from foresight.flows.export import RAW_FIELDS, ExportConfig, export_recipe, plan_export, write_shard  # noqa: E402
from foresight.pipelines.export import FP8_POWER, decode_fp8, encode_fp8, encode_sample, relative_l2, sample_key  # noqa: E402
from foresight.schemas.dataset import DatasetInfo, EpisodeRecord, FeatureSpec  # noqa: E402
from foresight.schemas.model import ModelIdentity  # noqa: E402
from foresight.schemas.plan import ClipRow, PlanInfo  # noqa: E402
from foresight.schemas.target import ArraySpec, TargetRecipe, content_id  # noqa: E402
from foresight.storage.episodes import EpisodeStore  # noqa: E402
from foresight.storage.exports import ClipSource, ExportStore  # noqa: E402
from foresight.storage.fs import Root  # noqa: E402
from foresight.storage.plans import PlanStore  # noqa: E402
from foresight.storage.targets import TargetStore  # noqa: E402
from foresight.trainers.data import ShardStream, ZarrClips, collate_samples, collate_zero_copy  # noqa: E402

T, SIZE, GRID, ONESTEP_C, TEACHER_C = 16, 256, 16, 2560, 768
POWERS = (1.0, 1.25, FP8_POWER, 1.75, 2.0)
"""Companding exponents compared in the fp8 error table (1.0 = plain e4m3)."""
ZERO_COPY_1 = "ShardStream f16, DataLoader 1 worker, collate_zero_copy"
ZERO_COPY_2 = "ShardStream f16, DataLoader 2 workers, collate_zero_copy"
COPIED_1 = "ShardStream f16, DataLoader 1 worker, collate_samples (copies)"
COPIED_2 = "ShardStream f16, DataLoader 2 workers, collate_samples (copies)"
SECTION = "## Issue 7: export and streaming (ShardStream, ZarrClips) vs a raw read and S-VAM's layout"


# building the data ------------------------------------------------------------------------------
def rendered_clips(samples: int) -> np.ndarray:
    """(samples, T, 256, 256, 3) uint8 windows (stride 8) of MetaWorld drawer-open expert rollouts,
    one more seed per 10 windows: real renders, so lossless compression means something."""
    from foresight.pipelines.ingest.metaworld import collect_demonstration

    windows, seed = [], 0
    while len(windows) < samples:
        frames = collect_demonstration("drawer-open", seed=seed, size=SIZE).frames_THWC
        windows += [frames[s:s + T] for s in range(0, len(frames) - T + 1, 8)][:10]
        seed += 1
    return np.stack(windows[:samples])


def build_root(folder: str, samples: int, frames_kind: str, compression: str = "zstd") -> dict[str, str]:
    """Dataset, plan, video and teacher versions of ``samples`` full-size clips (random features;
    frames rendered or noise, see ``--frames``)."""
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
    rendered = rendered_clips(samples) if frames_kind == "metaworld" else None
    video = write_version(root, "video", "svd.generate", {"plan": plan_id}, compression, {
        "frames": lambda r, c: rendered[c] if rendered is not None else noise_frames(r, len(c)),
        "onestep": lambda r, c: gaussian(r, (len(c), T, GRID, GRID, ONESTEP_C)),
        "seed": lambda r, c: np.asarray(c, dtype=np.int64)}, samples)
    teacher = write_version(root, "teacher", "teachers.dinov2", {"video": video}, compression, {
        "target": lambda r, c: gaussian(r, (len(c), T, GRID, GRID, TEACHER_C)),
        "reference": lambda r, c: gaussian(r, (len(c), 1, GRID, GRID, TEACHER_C))},
        samples)
    return {"root": root.url, "plan": plan_id, "video": video, "teacher": teacher, "frames": frames_kind}


def gaussian(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(np.float16)


def noise_frames(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, T, SIZE, SIZE, 3), dtype=np.uint8)


def write_version(root: Root, kind: str, stage: str, inputs: dict[str, str], compression: str,
                  makers: dict[str, Callable[[np.random.Generator, list[int]], np.ndarray]], samples: int) -> str:
    """A complete version written shard by shard (2 clips per shard) through the real TargetStore;
    each maker returns the arrays of the given clips."""
    rng = np.random.default_rng(len(kind))
    probes = {name: make(rng, [0]) for name, make in makers.items()}
    specs = [ArraySpec(name=n, shape=[samples, *a.shape[1:]], dtype=str(a.dtype), compression=compression)
             for n, a in probes.items()]
    recipe = TargetRecipe(kind=kind, stage=stage, stage_version=1, params={"bench": True}, inputs=inputs,
                          model=ModelIdentity(spec="random", family=stage, source="random", seed=0))
    writer = TargetStore(root).begin(recipe, specs, num_clips=samples, shard_size=2)
    for shard in writer.pending_shards():
        clips = list(writer.shard_clips(shard))
        writer.write_shard(shard, {n: make(rng, clips) for n, make in makers.items()})
    writer.finalize()
    return writer.version_id


def export(world: dict[str, str], codec: str, shard_size: str = "64MB") -> str:
    config = ExportConfig(plan=world["plan"], targets=[world["video"], world["teacher"]], codec=codec,
                          shard_size=shard_size)
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


def loader_samples(dataset, workers: int, zero_copy: bool = False) -> Iterable[dict]:
    """DataLoader over ``dataset``: per-sample with ``collate_zero_copy`` (mapped arrays cross from the
    workers as views of the shard file), else batches of one through ``collate_samples`` (copied into
    shared memory)."""
    if zero_copy:
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                           collate_fn=collate_zero_copy, persistent_workers=workers > 0,
                                           prefetch_factor=2 if workers else None)
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
def fp8_feature_sets(world: dict[str, str]) -> dict[str, np.ndarray]:
    """float16 features the fp8 error is measured on: real-size random ones (Gaussian, as exported here;
    heavy-tailed Student-t(3) and t(2); Gaussian with 8 of the 4096 token rows 100x larger, like the
    massive activations of ViTs) and tiny-model features (SVD one-step, DINOv2 maps of the clip's frames)."""
    from foresight.pipelines.svd.loading import load_svd
    from foresight.pipelines.svd.sampler import SVDParams, one_step_features
    from foresight.pipelines.teachers import load_teacher

    rng = np.random.default_rng(5)
    video = TargetStore(world["root"]).open(world["video"])
    shape = (T, GRID, GRID, ONESTEP_C)
    spiky = rng.standard_normal(shape, dtype=np.float32)
    spiky.reshape(-1, ONESTEP_C)[rng.choice(T * GRID * GRID, 8, replace=False)] *= 100
    sets = {"random one-step features 16x16x16x2560 (Gaussian)": video.read("onestep", 0),
            "random Student-t(3) features 16x16x16x2560": rng.standard_t(3, shape).astype(np.float16),
            "random Student-t(2) features 16x16x16x2560": rng.standard_t(2, shape).astype(np.float16),
            "Gaussian 16x16x16x2560, 8 token rows x100": spiky.astype(np.float16)}
    svd = load_svd("tiny")
    text = rng.standard_normal((20, svd.unet.config.cross_attention_dim // 2)).astype(np.float32)
    frame = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    tiny = one_step_features(svd, SVDParams(size=64, steps=2), frame, text, 0)
    sets[f"tiny SVD one-step features {'x'.join(map(str, tiny.shape))}"] = np.asarray(tiny, dtype=np.float16)
    teacher = load_teacher("dinov2", "tiny")
    frames = torch.from_numpy(video.read("frames", 0))[None]
    maps = teacher.encode_frames(frames)[0].float().numpy().astype(np.float16)
    sets[f"tiny DINOv2 maps {'x'.join(map(str, maps.shape))} ({world['frames']} frames)"] = maps
    return sets


def fp8_errors(sets: dict[str, np.ndarray]) -> dict[str, dict[float, float]]:
    """Relative L2 error against float16 of each feature set, per companding exponent (decoded to float16)."""
    return {name: {p: relative_l2(decode_fp8(*encode_fp8(values, power=p), power=p), values) for p in POWERS}
            for name, values in sets.items()}


def member_field(name: str) -> str:
    """Field of a tar member ('c000000000.onestep.fp8scale.npy' -> 'onestep'; '.json' -> 'json')."""
    rest = name.split(".", 1)[1]
    for suffix in (".gz", ".npy", ".fp8scale", ".fp8", ".bf16"):
        rest = rest.removesuffix(suffix)
    return rest


def field_bytes(world: dict[str, str], codec: str, noise: bool = False) -> dict[str, int]:
    """Tar bytes (header + payload + padding) per field of sample 0; 'json' = metadata member.
    ``noise``: the same sample with its frames replaced by uniform noise (which does not compress)."""
    recipe = export_recipe(world["root"], ExportConfig(plan=world["plan"], targets=[world["video"], world["teacher"]],
                                                       codec=codec))
    source = ClipSource(world["root"], world["plan"], recipe.sources, recipe.action_chunk)
    arrays = source.read([0])[0]
    if noise:
        arrays["frames"] = noise_frames(np.random.default_rng(9), 1)[0]
    members, _ = encode_sample(sample_key(0), source.meta(0, recipe.export_id()), arrays, codec, RAW_FIELDS)
    sizes: dict[str, int] = {}
    for name, payload in members:
        field = member_field(name)
        sizes[field] = sizes.get(field, 0) + 512 + -(-len(payload) // 512) * 512
    return sizes


# the run ---------------------------------------------------------------------------------------
def member_bytes(store: ExportStore, export_id: str, field: str) -> int:
    """Stored bytes (tar header + payload + padding) of one field's members over a whole export."""
    index, total = store.index(export_id), 0
    for position, shard in enumerate(index.shards):
        for _, members in store.read_samples(index, position, 0, shard.samples):
            total += sum(512 + -(-len(p) // 512) * 512 for name, p in members if member_field(name) == field)
    return total


def measure(world: dict[str, str], folders: list[str], exports: dict[str, str], epochs: int) -> list[tuple]:
    """(name, seconds per epoch, samples, bytes read per epoch) of every reader."""
    from foresight.pipelines.teachers import load_teacher

    store = ExportStore(world["root"])
    pins = [world["video"], world["teacher"]]
    shard_paths = {codec: [store.root.path(f"exports/{e}/{s.name}") for s in store.index(e).shards]
                   for codec, e in exports.items()}
    shard_bytes = {codec: sum(os.path.getsize(p) for p in paths) for codec, paths in shard_paths.items()}
    zarr_bytes = sum(store.root.du(f"targets/{v}") for v in pins)
    svam_bytes = sum(os.path.getsize(os.path.join(f, n)) for f in folders
                     for n in ("full_video_frames.npy", "one_step_features.npy"))
    teacher = load_teacher("dinov2", "tiny")

    def stream(codec: str, verify: bool = False, decode_fp8: bool = True, fields=None) -> ShardStream:
        return ShardStream(world["root"], exports[codec], pins, verify=verify, decode_fp8=decode_fp8, fields=fields)

    # What the decoupler / action-expert trainers read: everything but the frames.
    no_frames = [f for f in store.index(exports["fp8"]).fields if f != "frames"]
    streams = {name: stream(*args) for name, args in [("f16", ("f16",)), ("f16 verify", ("f16", True)),
                                                      ("fp8", ("fp8",)), ("fp8 codes", ("fp8", False, False)),
                                                      ("fp8 codes, no frames", ("fp8", False, False, no_frames))]}
    frames_bytes = member_bytes(store, exports["fp8"], "frames")

    zarr = ZarrClips(world["root"], world["plan"], pins)
    cases = [
        ("raw read, f16 shards", lambda: iter([raw_read(shard_paths["f16"])]), shard_bytes["f16"]),
        ("raw read, fp8 shards", lambda: iter([raw_read(shard_paths["fp8"])]), shard_bytes["fp8"]),
        ("ShardStream f16, in-process", lambda: iter(streams["f16"]), shard_bytes["f16"]),
        ("ShardStream f16, in-process, verify", lambda: iter(streams["f16 verify"]), shard_bytes["f16"]),
        ("ShardStream fp8, in-process (CPU decode)", lambda: iter(streams["fp8"]), shard_bytes["fp8"]),
        ("ShardStream fp8, in-process, codes kept for GPU decode", lambda: iter(streams["fp8 codes"]),
         shard_bytes["fp8"]),
        ("ShardStream fp8, in-process, codes kept, all fields but frames",
         lambda: iter(streams["fp8 codes, no frames"]),
         shard_bytes["fp8"] - frames_bytes),
        (ZERO_COPY_1, None, shard_bytes["f16"]),
        (ZERO_COPY_2, None, shard_bytes["f16"]),
        (COPIED_1, None, shard_bytes["f16"]),
        (COPIED_2, None, shard_bytes["f16"]),
        ("ShardStream fp8, DataLoader 2 workers, collate_samples", None, shard_bytes["fp8"]),
        ("ZarrClips, in-process", lambda: (zarr[i] for i in range(len(zarr))), zarr_bytes),
        ("ZarrClips, DataLoader 2 workers", None, zarr_bytes),
        ("S-VAM float32 .npy folders", lambda: svam_samples(folders, None), svam_bytes),
        ("S-VAM + tiny teacher recomputed", lambda: svam_samples(folders, teacher), svam_bytes),
    ]
    loaders = {ZERO_COPY_1: loader_samples(stream("f16"), 1, zero_copy=True),
               ZERO_COPY_2: loader_samples(stream("f16"), 2, zero_copy=True),
               COPIED_1: loader_samples(stream("f16"), 1),
               COPIED_2: loader_samples(stream("f16"), 2),
               "ShardStream fp8, DataLoader 2 workers, collate_samples": loader_samples(stream("fp8"), 2),
               "ZarrClips, DataLoader 2 workers": loader_samples(zarr, 2)}
    results = []
    for name, make, nbytes in cases:
        make = make or (lambda loader=loaders[name]: iter(loader))
        seconds, count = timed(make, epochs)
        count = len(folders) if name.startswith("raw") else count
        results.append((name, seconds, count, nbytes))
        print(f"  {name:<62} {count / seconds:8.2f} samples/s {nbytes / seconds / 1e6:9.1f} MB/s", flush=True)
    return results


def report(results: list[tuple], sizes: dict[str, float], errors: dict[str, dict[float, float]], samples: int,
           frames_kind: str) -> str:
    rate = {name: count / seconds for name, seconds, count, _ in results}
    frames_text = ("real MetaWorld renders: drawer-open expert rollouts, corner2 camera, 256x256, osmesa"
                   if frames_kind == "metaworld" else "uniform random noise")
    lines = [SECTION, "", f"`python bench/bench_export.py --samples {samples} --frames {frames_kind}` on this CPU "
             "machine (2 cores shared with other jobs, so figures are noisy; warm page cache; best of the timed "
             f"epochs). Each sample: frames 16x256x256x3 ({frames_text}), random one-step features 16x16x16x2560, "
             "DINOv2-size teacher target 16x16x16x768 + reference, actions, state. Every byte of every reader's "
             "samples is read once by the CPU (an XOR reduction, standing in for the copy to pinned memory or the "
             "GPU), so memory-mapped reads are not free; the raw read copies the shard files through a reused "
             "1 MiB buffer and makes the same pass over each chunk.", "",
             "| reader | samples/s | MB/s read |", "|---|---:|---:|"]
    lines += [f"| {n} | {c / s:.2f} | {b / s / 1e6:.0f} |" for n, s, c, b in results]
    ratios = speed_ratios(rate)
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {n} | {v:.2f}x |" for n, v in ratios]
    lines += ["", "| bytes per sample | MB | vs S-VAM |", "|---|---:|---:|"]
    svam_bytes = sizes["S-VAM float32 (frames + one-step), real .npy file sizes"]
    lines += [f"| {n} | {b / 1e6:.3f} | {b / svam_bytes:.2%} |" for n, b in sizes.items()]
    lines += ["", "| fp8 vs float16, relative L2 | " + " | ".join(power_label(p) for p in POWERS) + " |",
              "|---|" + "---:|" * len(POWERS)]
    lines += [f"| {n} | " + " | ".join(f"{e[p]:.2%}" for p in POWERS) + " |" for n, e in errors.items()]
    lines += ["| **worst of the above** | " + " | ".join(f"{worst_error(errors, p):.2%}" for p in POWERS) + " |"]
    lines += ["", "Goals:"] + goal_lines(rate, ratios, sizes, errors)
    return "\n".join(lines) + "\n"


def worst_error(errors: dict[str, dict[float, float]], power: float) -> float:
    return max(e[power] for e in errors.values())


def power_label(power: float) -> str:
    label = f"p = {power:g}" + (" (plain e4m3)" if power == 1.0 else "")
    return f"**{label} (codec)**" if power == FP8_POWER else label


def speed_ratios(rate: dict[str, float]) -> list[tuple[str, float]]:
    svam_teacher = rate["S-VAM + tiny teacher recomputed"]
    return [
        ("ShardStream f16 in-process / raw read of the same bytes (goal >= 0.90)",
         rate["ShardStream f16, in-process"] / rate["raw read, f16 shards"]),
        ("ShardStream f16, 1 worker, collate_zero_copy / raw read (goal >= 0.90)",
         rate[ZERO_COPY_1] / rate["raw read, f16 shards"]),
        ("ShardStream f16, 2 workers, collate_zero_copy / raw read (goal >= 0.90)",
         rate[ZERO_COPY_2] / rate["raw read, f16 shards"]),
        ("ShardStream f16, 1 worker, collate_samples (copies) / raw read",
         rate[COPIED_1] / rate["raw read, f16 shards"]),
        ("ShardStream f16, 2 workers, collate_samples (copies) / raw read",
         rate[COPIED_2] / rate["raw read, f16 shards"]),
        ("ShardStream f16 with verify / raw read",
         rate["ShardStream f16, in-process, verify"] / rate["raw read, f16 shards"]),
        ("ShardStream fp8 in-process, CPU decode / raw read of the fp8 bytes",
         rate["ShardStream fp8, in-process (CPU decode)"] / rate["raw read, fp8 shards"]),
        ("ShardStream fp8 in-process, codes kept / raw read of the fp8 bytes",
         rate["ShardStream fp8, in-process, codes kept for GPU decode"] / rate["raw read, fp8 shards"]),
        ("ShardStream fp8 in-process, codes kept, all fields but frames / raw read of all the fp8 bytes",
         rate["ShardStream fp8, in-process, codes kept, all fields but frames"] / rate["raw read, fp8 shards"]),
        ("ShardStream f16 in-process / S-VAM layout, no recompute",
         rate["ShardStream f16, in-process"] / rate["S-VAM float32 .npy folders"]),
        ("ShardStream f16 in-process / S-VAM layout + teacher recompute (goal >= 5)",
         rate["ShardStream f16, in-process"] / svam_teacher),
        ("ShardStream f16 2 workers, collate_zero_copy / S-VAM + teacher recompute",
         rate[ZERO_COPY_2] / svam_teacher),
        ("ZarrClips in-process / S-VAM + teacher recompute", rate["ZarrClips, in-process"] / svam_teacher),
    ]


def goal_lines(rate: dict[str, float], ratios: list[tuple[str, float]], sizes: dict[str, float],
               errors: dict[str, dict[float, float]]) -> list[str]:
    return speed_goal_lines(ratios) + fp8_goal_lines(rate, sizes, errors)


def speed_goal_lines(ratios: list[tuple[str, float]]) -> list[str]:
    named = dict(ratios)
    raw = named["ShardStream f16 in-process / raw read of the same bytes (goal >= 0.90)"]
    one = named["ShardStream f16, 1 worker, collate_zero_copy / raw read (goal >= 0.90)"]
    two = named["ShardStream f16, 2 workers, collate_zero_copy / raw read (goal >= 0.90)"]
    copied = [named[f"ShardStream f16, {n}, collate_samples (copies) / raw read"] for n in ("1 worker", "2 workers")]
    teacher = named["ShardStream f16 in-process / S-VAM layout + teacher recompute (goal >= 5)"]
    met = "met" if min(raw, one, two) >= 0.9 else "not met"
    return [
        f"- ShardStream >= 90% of the raw read: {met}; {raw:.0%} in-process, {one:.0%} with 1 DataLoader worker "
        f"and {two:.0%} with 2 (per-sample loading, `collate_fn=collate_zero_copy`). Shards are memory-mapped, "
        "so in-process samples are views of the page cache; from a worker, each mapped array crosses as a "
        "descriptor (file, offset, dtype, shape, file identity) and the main process maps the same bytes "
        "again, so nothing is copied either. Through `collate_samples` each 31 MB sample is copied into "
        f"fresh shared memory in the worker: {copied[0]:.0%} (1 worker) and {copied[1]:.0%} (2 workers) "
        "of the raw read.",
        f"- >= 5x the samples/s of the S-VAM layout with the teacher recomputed: {teacher:.1f}x in-process, "
        f"{named['ShardStream f16 2 workers, collate_zero_copy / S-VAM + teacher recompute']:.1f}x with 2 "
        f"workers; ZarrClips {named['ZarrClips in-process / S-VAM + teacher recompute']:.1f}x (the tiny "
        "teacher's speed on the shared cores varies several-fold between runs).",
    ]


def fp8_goal_lines(rate: dict[str, float], sizes: dict[str, float], errors: dict[str, dict[float, float]]) -> list[str]:
    svam = sizes["S-VAM float32 (frames + one-step), real .npy file sizes"]
    fp8_share = sizes["export fp8, S-VAM's fields (frames + one-step + json)"] / svam
    noise_share = sizes["export fp8, S-VAM's fields, frames of uniform noise (stored plain)"] / svam
    worst = worst_error(errors, FP8_POWER)
    under = ", ".join(f"{p:g}" for p in POWERS if worst_error(errors, p) <= 0.02) or "none"
    relative, absolute = 1 - (1 - 2 ** -4) ** (1 / FP8_POWER), (2 ** -10 / 448) ** (1 / FP8_POWER)
    frames_ms = 1e3 * (1 / rate["ShardStream fp8, in-process, codes kept for GPU decode"]
                       - 1 / rate["ShardStream fp8, in-process, codes kept, all fields but frames"])
    met = lambda ok: "met" if ok else "not met"  # noqa: E731
    return [
        f"- fp8 bytes <= 25% of S-VAM's: {met(fp8_share <= 0.25)}, {fp8_share:.2%} for the same fields (S-VAM's "
        "side counted as its real .npy files, headers included). uint8 frames and 1-byte codes alone are exactly "
        "25% of float32, so tar headers, .npy headers, the E8M0 scales (1 byte per channel) and the JSON can "
        "only fit by compressing something losslessly: fp8 exports store frames as a gzip'd .npy when that "
        "saves >= 1/8 of their bytes. Frames of uniform noise do not compress and stay plain: then "
        f"{noise_share:.2%} (over by the packaging overhead).",
        f"- fp8 relative L2 <= 2%: {met(worst <= 0.02)}, {worst:.2%} at most with the codec's companding "
        f"exponent p = {FP8_POWER:g} (plain e4m3, p = 1: {worst_error(errors, 1.0):.2%}). Exponents with every "
        f"set under 2% here: {under}. A larger p shrinks the relative step (error ~ 2.65% / p) but also the "
        "dynamic range: on heavy tails and outlier tokens the bulk of a channel falls into e4m3's subnormal "
        "band, so p = 1.75 and 2 win on light tails and lose on t(2) and outlier rows; the lowest worst case "
        f"is at p = {min(POWERS, key=lambda p: worst_error(errors, p)):g}. Tested per-element bound: "
        f"|x - x'| <= (1 - (1 - 2^-4)^(1/p)) |x| + (2^-10 / 448)^(1/p) S_c ({relative:.2%} |x| + "
        f"{absolute:.1e} S_c at p = {FP8_POWER:g}) plus output rounding; derivation in pipelines/export.py.",
        "- fp8 decode on the CPU costs one table lookup + multiply per value (~14 M values per sample); "
        "`ShardStream(decode_fp8=False)` keeps the uint8 codes (and the uint8 E8M0 scales) and "
        "`trainers.data.fp8_to_float` decodes a batch on the GPU. gzip'd frames are inflated on the CPU, "
        f"only when the frames field is selected: {frames_ms:.1f} ms per sample here (codes kept, with vs "
        "without frames).",
    ]


def sample_sizes(world, exports, folders) -> dict[str, float]:
    """Mean stored bytes per sample: S-VAM's real files, whole exports, and the fields S-VAM stores."""
    store = ExportStore(world["root"])
    n = len(folders)
    svam = sum(os.path.getsize(os.path.join(f, x)) for f in folders
               for x in ("full_video_frames.npy", "one_step_features.npy")) / n
    same = {codec: sum(member_bytes(store, export_id, f) for f in ("frames", "onestep", "json")) / n
            for codec, export_id in exports.items()}
    noise = field_bytes(world, "fp8", noise=True)
    return {"S-VAM float32 (frames + one-step), real .npy file sizes": svam,
            "export f16, whole sample (incl. teacher maps, actions)": store.index(exports["f16"]).total_bytes / n,
            "export fp8, whole sample (incl. teacher maps, actions)": store.index(exports["fp8"]).total_bytes / n,
            "export f16, S-VAM's fields (frames + one-step + json)": same["f16"],
            "export fp8, S-VAM's fields (frames + one-step + json)": same["fp8"],
            "export fp8, S-VAM's fields, frames of uniform noise (stored plain)":
                sum(v for k, v in noise.items() if k in ("frames", "onestep", "json"))}


def write_results(path: str, text: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving other sections alone."""
    old = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("\n" + old[end + 1:] if end >= 0 else "")
    with open(path, "w") as handle:
        handle.write(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=6, help="Full-size clips (~31 MB each as f16).")
    parser.add_argument("--store-compression", choices=["zstd", "none"], default="zstd",
                        help="Chunk codec of the target versions ZarrClips reads (and the export is made from).")
    parser.add_argument("--epochs", type=int, default=5, help="Timed epochs per reader (after one warm-up).")
    parser.add_argument("--results", default=None, help="Write the markdown section into this RESULTS.md.")
    parser.add_argument("--keep", default=None, help="Build under this folder and keep it (default: temp, removed).")
    parser.add_argument("--frames", choices=["metaworld", "noise"], default="metaworld",
                        help="Frames of the clips: real MetaWorld renders or uniform noise.")
    args = parser.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="bench-export-")
    try:
        print(f"building {args.samples} full-size clips under {folder} ...", flush=True)
        world = build_root(os.path.join(folder, "root"), args.samples, args.frames, args.store_compression)
        exports = {codec: export(world, codec) for codec in ("f16", "fp8")}
        folders = write_svam(os.path.join(folder, "svam"), world)
        print("timing (samples/s, MB/s of stored bytes read):", flush=True)
        results = measure(world, folders, exports, args.epochs)
        sizes = sample_sizes(world, exports, folders)
        errors = fp8_errors(fp8_feature_sets(world))
        text = report(results, sizes, errors, args.samples, args.frames)
        print("\n" + text)
        if args.results:
            write_results(args.results, text)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
