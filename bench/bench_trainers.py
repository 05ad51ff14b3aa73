"""Trainer throughput fed by ShardStream from local disk vs the same step fed from GPU-resident tensors.

For the S-VAM decoupler (full size: C_in 2560, 16x16x16 tokens, hidden 1024, bf16) and the action expert
(two frozen full-size decouplers + Uni-Perceiver + diffusion policy), in one run:

- resident: the training step on batches already on the GPU (the ceiling the loader must not lower);
- stream:   the same step fed by trainers.loop's pipeline (ShardStream in DataLoader workers ->
            background copy thread -> side stream) from a synthetic export written to local disk;
- loader:   the host pipeline alone (DataLoader batches per second, no GPU work).

The export is written with the export stage's own writer (storage.exports + pipelines.export), so the
bytes, codecs and tar layout are those of a real export. Prints a markdown table; ``--small`` runs tiny
shapes on the CPU to check the script.

    python bench/bench_trainers.py --clips 96 --batch 16 --steps 30 --workers 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from foresight.pipelines.export import column_stats, encode_sample, sample_key  # noqa: E402
from foresight.storage.exports import ExportBuild, ExportField, ExportRecipe, ExportStore  # noqa: E402
from foresight.storage.fs import Root  # noqa: E402
from foresight.trainers.action_expert import ActionExpertTask, FrozenDecouplers  # noqa: E402
from foresight.trainers.decoupler import DecouplerTask  # noqa: E402
from foresight.trainers.batching import batch_iterator  # noqa: E402
from foresight.trainers.config import DataConfig, LoopConfig, OptimConfig  # noqa: E402
from foresight.trainers.distributed import DistInfo  # noqa: E402
from foresight.trainers.exports import open_export  # noqa: E402
from foresight.trainers.loop import Trainer  # noqa: E402
from foresight.trainers.prefetch import DevicePrefetcher  # noqa: E402
from foresight.trainers.models.decoupler import Decoupler, DecouplerConfig  # noqa: E402
from foresight.trainers.models.denoiser import DenoiserConfig  # noqa: E402
from foresight.trainers.models.objectives import ObjectiveConfig  # noqa: E402
from foresight.trainers.models.video_former import VideoFormerConfig  # noqa: E402
from foresight.trainers.models.policy import ActionExpert, PolicyConfig  # noqa: E402
from foresight.trainers.models.uniperceiver import UniPerceiverConfig  # noqa: E402
from headline import write_headline  # noqa: E402  (bench/headline.py, beside this script)

RAW = ("actions", "actions_mask")


def shapes(small: bool) -> dict[str, tuple[int, ...]]:
    """Per-sample field shapes (reference sizes, or tiny ones for --small)."""
    t, h, c, dino, da3, text = (4, 4, 32, 8, 12, 16) if small else (16, 16, 2560, 768, 2048, 512)
    return {"onestep": (t, h, h, c), "dinov2.target": (t, h, h, dino), "dinov2.reference": (1, h, h, dino),
            "da3.reference": (1, h, h, da3), "text": (20, text), "actions": (10, 7), "actions_mask": (10,)}


def make_export(root: Root, clips: int, small: bool, codec: str) -> str:
    """A synthetic export with the real writer: random float16 features (varied per clip)."""
    rng = np.random.default_rng(0)
    field_shapes = shapes(small)
    base = {f: rng.standard_normal(s).astype(np.float32).astype(np.float16) for f, s in field_shapes.items()
            if f not in RAW}
    versions = {"onestep": "video-00000000be01", "dinov2.target": "teacher-00000000be02",
                "dinov2.reference": "teacher-00000000be02", "da3.reference": "teacher-00000000be03",
                "text": "text-00000000be04"}
    recipe = ExportRecipe(plan_id="plan-00000000be00", split=None, codec=codec, shard_bytes=1 << 30, action_chunk=10,
                          sources={f: f"{versions.get(f, 'episode')}:{f}" for f in field_shapes})
    export_id = recipe.export_id()
    store = ExportStore(root)
    if store.exists(export_id):
        return export_id
    actions = rng.standard_normal((clips, 10, 7)).astype(np.float32)
    per_shard = max(1, (1 << 30) // _sample_bytes(field_shapes))
    shard_clips = [list(range(i, min(i + per_shard, clips))) for i in range(0, clips, per_shard)]
    fields = {f: ExportField(source=recipe.sources[f], version=versions.get(f), codec="raw" if f in RAW else codec,
                             dtype="bool" if f == "actions_mask" else ("float32" if f in RAW else "float16"),
                             shape=list(s)) for f, s in field_shapes.items()}
    stats = {"actions": column_stats(actions.reshape(-1, 7))}
    store.begin(ExportBuild(export_id=export_id, recipe=recipe, dataset="bench", fields=fields,
                            shard_clips=shard_clips, stats=stats))
    for number, members_of in enumerate(shard_clips):
        writer = store.shard_writer(export_id, number)
        for clip in members_of:
            arrays = {f: (a * np.float16(1 + clip / clips)) for f, a in base.items()}
            arrays["actions"], arrays["actions_mask"] = actions[clip], np.ones(10, dtype=bool)
            meta = {"clip_index": clip, "clip_id": f"bench_{clip}", "dataset": "bench", "episode_id": f"ep{clip}",
                    "camera": "front", "start": 0, "num_frames": field_shapes["onestep"][0], "stride": 1,
                    "instruction": "bench", "split": "train", "plan_id": recipe.plan_id, "export_id": export_id,
                    "versions": versions}
            writer.add_sample(clip, encode_sample(sample_key(clip), meta, arrays, codec, RAW)[0])
        store.record_shard(export_id, number, writer.publish())
    store.finalize(export_id)
    return export_id


def _sample_bytes(field_shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(int(np.prod(s)) * 2 for f, s in field_shapes.items())


def decoupler_task(small: bool) -> DecouplerTask:
    s = shapes(small)
    t, h, w, c = s["onestep"]
    size = "tiny" if small else "full"
    return DecouplerTask(Decoupler(DecouplerConfig.preset(size, in_channels=c, teacher_channels=s["dinov2.target"][-1],
                                                          frames=t, height=h, width=w)), "dinov2")


def action_expert_task(small: bool, arch: str = "release") -> ActionExpertTask:
    s = shapes(small)
    t, h, w, c = s["onestep"]
    size = "tiny" if small else "full"
    decs = [Decoupler(DecouplerConfig.preset(size, in_channels=c, teacher_channels=s[f"{n}.reference"][-1], frames=t,
                                             height=h, width=w)) for n in ("dinov2", "da3")]
    frozen = FrozenDecouplers(decs, ["dinov2", "da3"])
    if arch == "release":
        former = VideoFormerConfig.preset(size, in_channels=c + frozen.channels, frames=t)
        denoiser = DenoiserConfig.preset(size, action_dim=7, chunk=10, goal_dim=s["text"][-1],
                                         cond_tokens=former.num_latents, obs_dim=former.dim)
        return ActionExpertTask(ActionExpert(former, denoiser), frozen)
    perceiver = UniPerceiverConfig.preset(size, in_channels=c + frozen.channels, frames=t)
    policy = PolicyConfig.preset(size, action_dim=7, chunk=10, text_dim=s["text"][-1],
                                 cond_tokens=perceiver.num_latents, cond_dim=perceiver.dim)
    return ActionExpertTask(ActionExpert(perceiver, policy, ObjectiveConfig.for_kind("edm")), frozen)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer: Trainer, next_batch, steps: int, warmup: int) -> float:
    """Samples per second of ``steps`` training steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        trainer.train_step(next_batch())
    sync(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = trainer.train_step(next_batch())
    float(loss)  # one sync at the end: the loop itself never waits on the GPU
    sync(trainer.device)
    return steps * trainer.loop.batch_size / (time.perf_counter() - start)


def bench_one(name: str, task, root: Root, export_id: str, fields: list[str], args, device) -> list[dict]:
    """Resident baseline once, then loader-alone and stream-fed throughput for each worker count."""
    loop = LoopConfig(steps=10**6, batch_size=args.batch, num_workers=0, device=device.type)
    data = DataConfig(shuffle_buffer=0, fp8_on_device=True)
    trainer = Trainer(task, loop, OptimConfig(lr=1e-4), DistInfo(), device)
    # Resident baseline: two distinct batches already on the device, alternated.
    stream, _ = open_export(root, export_id, fields, data, seed=0)
    samples = [s for _, s in zip(range(args.batch * 2), stream)]
    resident = [_to(task.collate(samples[i:i + args.batch]), device) for i in (0, args.batch)]
    counter = iter(range(10**9))
    resident_sps = time_steps(trainer, lambda: resident[next(counter) % 2], args.steps, args.warmup)
    del resident
    mb = sum(np.asarray(samples[0][f]).nbytes for f in fields) / 1e6
    print(f"{name}: resident {resident_sps:.1f} samples/s ({resident_sps * mb / 1e3:.2f} GB/s needed), "
          f"{mb:.1f} MB/sample", flush=True)
    rows = []
    runs = [(w, bool(int(r))) for r in args.reuse.split(",") for w in args.workers.split(",")]
    for workers, reuse in [(int(w), r) for w, r in runs]:
        loop = LoopConfig(steps=10**6, batch_size=args.batch, num_workers=workers, prefetch_factor=args.prefetch,
                          device=device.type, pin_memory=args.pin, reuse_buffers=reuse)
        pin = args.pin and device.type == "cuda"
        # Warm up past everything the workers and the copy thread hold ready, so the timed steps measure
        # the sustained rate and not batches read before the clock started.
        warmup = max(args.warmup, workers * args.prefetch + 3)
        stream, _ = open_export(root, export_id, fields, data, seed=1)
        host = batch_iterator(task.collate_fn(), stream, loop, pin, None, reuse=reuse, pin_buffers=device.type == "cuda")
        for _ in range(warmup):
            next(host)
        start = time.perf_counter()
        for _ in range(args.steps):
            next(host)
        loader_sps = args.steps * args.batch / (time.perf_counter() - start)
        host.close()
        # The trainer fed by the stream, exactly as trainers.loop.fit feeds it.
        stream, _ = open_export(root, export_id, fields, data, seed=2)
        fed = DevicePrefetcher(batch_iterator(task.collate_fn(), stream, loop, pin, None, reuse=reuse,
                                              pin_buffers=device.type == "cuda"), device)
        stream_sps = time_steps(trainer, lambda: next(fed)[0], args.steps, warmup)
        fed.close()
        row = {"workers": workers, "reuse": reuse, "resident": resident_sps, "stream": stream_sps, "loader": loader_sps,
               "ratio": stream_sps / resident_sps, "mb_per_sample": mb}
        print(f"{name}, {workers} workers, reused buffers {reuse}: stream {stream_sps:.1f} samples/s ({100 * row['ratio']:.1f}% of "
              f"resident), loader alone {loader_sps:.1f} samples/s ({loader_sps * mb / 1e3:.2f} GB/s)", flush=True)
        rows.append(row)
    return rows


def _to(value, device):
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", default="8", help="DataLoader workers; a comma list runs each.")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--pin", action="store_true", help="Pin host batches in the DataLoader.")
    parser.add_argument("--reuse", default="1", help="Reusable page-locked batch buffers: 1 on, 0 off, '0,1' both.")
    parser.add_argument("--codec", default="f16", choices=["f16", "bf16", "fp8"])
    parser.add_argument("--only", default="decoupler,action-expert")
    parser.add_argument("--root", default=None, help="Local folder for the export (default: a temp dir).")
    parser.add_argument("--small", action="store_true", help="Tiny shapes on the CPU (checks the script).")
    parser.add_argument("--results", type=Path, default=None, help="Headline JSON (default bench/results/bench_trainers.json).")
    parser.add_argument("--arch", default="release", choices=["release", "foresight"],
                        help="Action-expert architecture (Video_Former_3D + GCDenoiser, or foresight's).")
    args = parser.parse_args()
    device = torch.device("cpu") if args.small or not torch.cuda.is_available() else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, cpus {os.cpu_count()}")
    folder = Path(args.root or tempfile.mkdtemp(prefix="foresight-bench-"))
    root = Root(folder)
    started = time.perf_counter()
    export_id = make_export(root, args.clips, args.small, args.codec)
    index = ExportStore(root).index(export_id)
    print(f"export {export_id}: {index.num_samples} samples, {len(index.shards)} shards, "
          f"{index.total_bytes / 1e9:.2f} GB, codec {args.codec}, written in {time.perf_counter() - started:.1f} s",
          flush=True)
    rows = {}
    wanted = args.only.split(",")
    if "decoupler" in wanted:
        rows["decoupler"] = bench_one("decoupler", decoupler_task(args.small), root, export_id,
                                      ["onestep", "dinov2.target", "dinov2.reference"], args, device)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    if "action-expert" in wanted:
        rows["action-expert"] = bench_one("action-expert", action_expert_task(args.small, args.arch), root, export_id,
                                          ["onestep", "dinov2.reference", "da3.reference", "text", "actions",
                                           "actions_mask"], args, device)
    print(f"\n| trainer | batch | workers | reused buffers | codec | MB/sample | resident samples/s | stream samples/s | "
          f"stream/resident | loader alone samples/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        for r in runs:
            print(f"| {name} | {args.batch} | {r['workers']} | {'yes' if r['reuse'] else 'no'} | {args.codec} | {r['mb_per_sample']:.1f} | "
                  f"{r['resident']:.1f} | {r['stream']:.1f} | {100 * r['ratio']:.1f}% | {r['loader']:.1f} |")
    write_headline("bench_trainers", headline_figures(rows), out=args.results,
                   args={k: str(v) for k, v in vars(args).items()})
    if not args.root:
        shutil.rmtree(folder, ignore_errors=True)


def headline_figures(rows: dict[str, list[dict]]) -> dict[str, float]:
    """Per trainer, the best stream / resident ratio over the worker counts run (the goal's figure:
    ``action_expert_fed``, ``decoupler_fed``) and the resident samples/s it is measured against."""
    figures = {}
    for name, runs in rows.items():
        best = max(runs, key=lambda r: r["ratio"])
        key = name.replace("-", "_")
        figures[f"{key}_fed"] = round(best["ratio"], 4)
        figures[f"{key}_resident_samples_per_s"] = round(best["resident"], 2)
        figures[f"{key}_fed_workers"] = best["workers"]
    return figures


if __name__ == "__main__":
    main()
