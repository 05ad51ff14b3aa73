"""Shallow-π benchmark: action-chunk latency of a π0 teacher against its layer-subsampled student,
measured side by side in one run, and the teacher-target caching throughput.

Latency = one action chunk at batch 1: the prefix (SigLIP + VLM over images and instruction) and
10 Euler steps of the action expert. Three implementations of the same maths are timed:
- ``hf``: transformers' ``PI0ForConditionalGeneration.sample_actions`` (eager PyTorch);
- ``static``: pipelines.pi0_static.sample_chunk (no dynamic cache or mask builders), eager;
- ``graph``: the static chunk captured once in a CUDA graph and replayed (GPU only).

Caching throughput = samples/s of pipelines.pi0.compute_targets (K pairs, head-averaged attention at
the default middle layers), alone and including the zarr shard writes of a TargetStore.

    python bench/bench_pi0.py --device cuda --model random --dtype bfloat16        # H100
    python bench/bench_pi0.py --device cpu --model tiny --student-layers 2 --iters 3   # smoke test

Prints a JSON record (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from foresight.pipelines import pi0, pi0_static  # noqa: E402
from foresight.trainers.shallow_pi import build_student  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, iters: int, warmup: int) -> dict[str, float]:
    """Median / p10 / p90 wall time in ms of ``fn()`` (synchronised before and after each call)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p10_ms": times[len(times) // 10],
            "p90_ms": times[min(len(times) - 1, (len(times) * 9) // 10)]}


def example_samples(params: pi0.Pi0TargetParams, count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        images = rng.integers(0, 256, size=(len(params.cameras), 256, 256, 3), dtype=np.uint8)
        samples.append(pi0.assemble_sample(images, f"pick up the red block and put it in drawer {i}",
                                           rng.normal(size=14), rng.uniform(-1, 1, (50, 14)), params, None))
    return pi0.stack_samples(samples)


def chunk_inputs(model, params: pi0.Pi0TargetParams, device: torch.device, dtype: torch.dtype) -> dict:
    batch = pi0.make_batch(example_samples(params, 1, 0), model.config, device, dtype)
    noise = torch.randn(1, 50, 32, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return dict(state=batch.state, input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                pixel_attention_mask=batch.pixel_attention_mask, attention_mask=batch.attention_mask, noise=noise)


def latency(models: dict, inputs: dict, device: torch.device, args) -> dict:
    """Per model: hf, static and (CUDA) graph latencies, with either attention of the static chunk,
    and the largest deviation of each from hf's chunk."""
    out: dict[str, dict] = {}
    for name, model in models.items():
        hf = lambda m=model: m.sample_actions(num_steps=10, **{**inputs, "noise": inputs["noise"].clone()})  # noqa: E731
        record: dict = {"hf": time_calls(hf, device, args.iters, args.warmup)}
        reference = hf().float()
        record["finite"] = bool(torch.isfinite(reference).all())
        record["reference_max_abs"] = float(reference.abs().max())
        for attention in pi0_static.ATTENTION:
            tag = "" if attention == "matmul" else f"_{attention}"
            static = lambda m=model, a=attention: pi0_static.sample_chunk(m, num_steps=10, attention=a, **inputs)  # noqa: E731
            record[f"static{tag}"] = time_calls(static, device, args.iters, args.warmup)
            record[f"static{tag}_max_abs_diff"] = float((static().float() - reference).abs().max())
            if device.type != "cuda":
                continue
            started = time.perf_counter()
            graphed = pi0_static.GraphedChunkSampler(model, num_steps=10, attention=attention, **inputs)
            record[f"graph{tag}_capture_s"] = time.perf_counter() - started
            record[f"graph{tag}"] = time_calls(lambda g=graphed: g(**inputs), device, args.iters, args.warmup)
            record[f"graph{tag}_max_abs_diff"] = float((graphed(**inputs).float() - reference).abs().max())
            del graphed
        out[name] = record
        print(f"{name}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in record.items()
                                       if isinstance(v, dict)), flush=True)
    return out


def profile_chunk(model, inputs: dict, device: torch.device, rows: int = 14) -> str:
    """Top GPU kernels of one static chunk (where the time of a chunk goes)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        pi0_static.sample_chunk(model, num_steps=10, **inputs)
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
    except (AttributeError, KeyError, ValueError):
        return prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60)


def caching_throughput(teacher, params: pi0.Pi0TargetParams, device: torch.device, args) -> dict:
    """samples/s of compute_targets, alone and with the shard writes of a TargetStore (local zarr)."""
    from foresight.schemas.target import ArraySpec, TargetRecipe
    from foresight.storage.targets import TargetStore

    samples = example_samples(params, args.targets_batch, 1)
    ids = [f"clip{i}" for i in range(args.targets_batch)]

    def compute() -> dict:
        arrays = pi0.compute_targets(teacher, samples, ids, "pi0-bench0000000", params, device)
        synchronize(device)
        return arrays

    compute()  # warm-up (eager attention switch, kernel choice)
    started = time.perf_counter()
    for _ in range(args.targets_rounds):
        compute()
    compute_s = time.perf_counter() - started
    total = args.targets_batch * args.targets_rounds
    shapes = pi0.array_shapes(params, teacher.config)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = TargetRecipe(kind="pi0", stage=pi0.STAGE, stage_version=pi0.STAGE_VERSION,
                              params=params.model_dump(mode="json"), inputs={"plan": "bench"})
        arrays = [ArraySpec(name=n, shape=[total, *s], dtype=d) for n, (s, d) in shapes.items()]
        writer = TargetStore(tmp).begin(recipe, arrays, total, args.targets_batch)
        started = time.perf_counter()
        for shard in range(writer.num_shards):
            writer.write_shard(shard, compute())
        writer.finalize()
        stored_s = time.perf_counter() - started
        stored_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 1e6
    record = {"samples": total, "batch": args.targets_batch, "pairs": params.pairs,
              "attn_layers": params.attn_layers, "prefix_keys": shapes["attn"][0][-1] if "attn" in shapes else 0,
              "compute_samples_per_s": total / compute_s, "stored_samples_per_s": total / stored_s,
              "stored_MB_per_sample": stored_mb / total}
    print(f"targets: {record['compute_samples_per_s']:.2f} samples/s compute, "
          f"{record['stored_samples_per_s']:.2f} samples/s stored ({record['stored_MB_per_sample']:.2f} MB/sample)",
          flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="random", help="π0 spec (random = full size).")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--cameras", type=int, default=2, help="Camera images per observation.")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--targets-batch", type=int, default=8)
    parser.add_argument("--targets-rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="Print the top GPU kernels of one chunk.")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    loaded = pi0.load_pi0(args.model, args.device, args.dtype)
    teacher = loaded.model
    student, layer_map = build_student(teacher, args.student_layers)
    student.eval()
    load_s = time.perf_counter() - started
    params = pi0.Pi0TargetParams(cameras=[f"cam{i}" for i in range(args.cameras)], tokenizer="bytes",
                                 image_size=pi0.image_size(teacher.config), pairs=args.pairs,
                                 attn_layers=pi0.default_attn_layers(pi0.num_layers(teacher)), dtype=args.dtype)
    dtype = next(teacher.parameters()).dtype
    inputs = chunk_inputs(teacher, params, device, dtype)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "model": args.model, "dtype": args.dtype, "cameras": args.cameras,
              "prefix_tokens": int(inputs["input_ids"].shape[1]), "teacher_layers": pi0.num_layers(teacher),
              "student_layers": args.student_layers, "layer_map": layer_map, "load_s": load_s,
              "params_M": {"teacher": sum(p.numel() for p in teacher.parameters()) / 1e6,
                           "student": sum(p.numel() for p in student.parameters()) / 1e6}}
    with torch.inference_mode():
        result["latency"] = latency({"teacher": teacher, "student": student}, inputs, device, args)
        if args.profile:
            for name, model in (("teacher", teacher), ("student", student)):
                print(f"--- profile of one static chunk ({name}) ---\n" + profile_chunk(model, inputs, device),
                      flush=True)
    kinds = [k for k, v in result["latency"]["teacher"].items() if isinstance(v, dict)]
    result["speedup"] = {k: result["latency"]["teacher"][k]["median_ms"] / result["latency"]["student"][k]["median_ms"]
                         for k in kinds}
    print("speedup teacher/student: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["speedup"].items()), flush=True)
    del student
    with torch.inference_mode():
        result["targets"] = caching_throughput(teacher, params, device, args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
