"""SVD generation throughput: 30-step guided generation and one-step extraction vs the bare UNet,
and the drift and speed of the fast recipe against the 30-step reference (``--fast-drift``).

Every figure is measured against the bare UNet forward at the same batch in the same process
(end-to-end time / pure UNet time), plus MFU from a FLOP count of one UNet call.

    # GPU sweep (random full-size weights); each variant runs in its own time-boxed process
    python bench/bench_svd.py --sweep --out /tmp/svd-bench
    # the whole-graph fp16 and fp8 variants only (fp8 drift is measured against the fp16 run)
    python bench/bench_svd.py --sweep --only unet-fp16-b32,unet-fp8-b32
    # one variant
    python bench/bench_svd.py --variant '{"dtype": "fp16", "compile": "blocks", "batch": 16}'
    # CPU sanity run of the whole sweep on the tiny model
    python bench/bench_svd.py --sweep --tiny
    # the fast recipe against the 30-step fp16 reference on the same inputs (writes bench/results/bench_svd.json)
    python bench/bench_svd.py --fast-drift --size full --device cuda --compile unet --batch 32
    # CPU smoke check of that mode
    python bench/bench_svd.py --fast-drift --size tiny --device cpu --dtype fp32 --batch 2 --steps 4 \
        --fast-steps 2 --json /tmp/bench_svd.json
    # attention settings side by side on the whole-graph compiled fp16 UNet (one H100, ~6 minutes;
    # writes bench/results/bench_svd_attention_e2e.json)
    python bench/bench_svd.py --attention-compare default,short-flex --size full --device cuda --dtype fp16 \
        --compile unet --batch 32 --budget-s 500
    # CPU smoke check of that mode
    python bench/bench_svd.py --attention-compare default,short-math --size tiny --device cpu --dtype fp32 \
        --batch 2 --steps 2 --iters 2 --json /tmp/bench_svd_attention_e2e.json
    # the cross-attention keys projected once per clip (ATTENTION+CROSS_CONTEXT) against diffusers' repeat
    # (one H100, ~6.5 minutes)
    python bench/bench_svd.py --attention-compare default,default+folded --size full --device cuda --dtype fp16 \
        --compile unet --batch 32 --budget-s 400 --json bench/results/bench_svd_cross_context.json

A clip is 16 frames at 256x256 (32x32 latents); a guided step is two UNet calls of B clips
(conditional and unconditional), so 30 steps are 60 UNet calls per batch. The bare UNet call is
the split UNet the pipeline runs (head up to the last feature block, then tail); the bare head
call is what one-step extraction pays for the network alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

H100_DENSE_BF16_TFLOPS = 989.4  # H100 SXM dense fp16/bf16 tensor-core peak


# ---------------------------------------------------------------- one variant (child process)
def setup(spec: dict):
    import torch

    from foresight.pipelines.svd import SVDParams, load_svd
    from foresight.pipelines.svd.speed import SpeedOptions, apply_speedups

    torch.backends.cudnn.benchmark = bool(spec.get("cudnn_benchmark", False))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    if spec.get("inductor"):  # e.g. {"freezing": true}: inductor settings of this variant
        import torch._inductor.config as inductor_config

        for key, value in spec["inductor"].items():
            setattr(inductor_config, key, value)
    model = load_svd(spec["model"], spec["device"], spec["dtype"])
    apply_speedups(model, SpeedOptions(channels_last=spec.get("channels_last", False),
                                       compile=spec.get("compile") or "none", compile_mode=spec.get("compile_mode"),
                                       compile_backend=spec.get("compile_backend", "inductor"),
                                       freeze=spec.get("freeze", True), attention=spec.get("attention", "default"),
                                       cross_context=spec.get("cross_context", "repeat")))
    params = SVDParams(num_frames=spec["frames"], size=spec["size"], steps=spec["steps"])
    return model, params, time.perf_counter() - started


def inputs(model, params, batch: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    width = model.unet.config.cross_attention_dim // 2
    frames = rng.integers(0, 256, size=(batch, params.size, params.size, 3), dtype=np.uint8)
    text = rng.normal(size=(batch, 20, width)).astype(np.float32)
    seeds = np.arange(batch, dtype=np.int64) + seed * 1000
    return frames, text, seeds


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def unet_call_args(model, params, batch: int):
    """Random inputs of one bare UNet call (one guidance branch of ``batch`` clips)."""
    import torch

    side = params.size // model.vae_scale_factor
    g = torch.Generator(device="cpu").manual_seed(0)
    sample = torch.randn(batch, params.num_frames, model.unet.config.in_channels, side, side, generator=g)
    states = torch.randn(batch, 20, model.unet.config.cross_attention_dim, generator=g)
    ids = torch.tensor([[3.0, 127.0, 0.02]]).repeat(batch, 1)
    to = dict(device=model.device, dtype=model.dtype)
    return sample.to(**to), torch.tensor(1.5, device=model.device), states.to(**to), ids.to(**to)


def bare_call(model, params, batch: int, head_only: bool = False):
    """A no-argument closure running one bare UNet call (or only its head) on random inputs."""
    split = model.split(params.feature_blocks)
    sample, t, states, ids = unet_call_args(model, params, batch)
    if head_only:
        return lambda: split.features(sample, t, states, ids)
    return lambda: split(sample, t, states, ids)[0]


def time_call(call, device: str, iters: int) -> tuple[float, float]:
    """(median seconds of ``call()``, seconds of the first call: compilation) under no_grad."""
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        call()
        sync(device)
        first_s = time.perf_counter() - start
        call()
        times = []
        for _ in range(iters):
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], first_s


def time_unet(model, params, batch: int, iters: int) -> dict:
    """Median ms of a bare UNet forward at ``batch`` clips (first call timed separately: compile)."""
    median_s, first_s = time_call(bare_call(model, params, batch), str(model.device), iters)
    return {"unet_ms": 1e3 * median_s, "unet_first_s": first_s}


def time_head(model, params, batch: int, iters: int) -> dict:
    """Median ms of the bare head (UNet up to the last feature block) at ``batch`` clips."""
    median_s, first_s = time_call(bare_call(model, params, batch, head_only=True), str(model.device), iters)
    return {"head_ms": 1e3 * median_s, "head_first_s": first_s}


def count_flops(model, params) -> float:
    """FLOPs of one UNet call on one clip (matmuls, convolutions, SDPA attention) as the installed
    forward does them (eager, batch 1: a ``folded`` cross context's keys count once per clip)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sample, t, states, ids = unet_call_args(model, params, 1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.unet(sample, t, encoder_hidden_states=states, added_time_ids=ids, return_dict=False)
    return float(counter.get_total_flops())


def matmul_tflops(device: str) -> float:
    """Achieved dense fp16 TFLOP/s of an 8192^3 matmul (what the tensor cores give here)."""
    import torch

    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def time_onestep(model, params, batch: int, iters: int) -> dict:
    from foresight.pipelines.svd import one_step_features

    data = inputs(model, params, batch)
    one_step_features(model, params, *data)
    times = []
    for _ in range(iters):
        sync(str(model.device))
        start = time.perf_counter()
        one_step_features(model, params, *data)
        times.append(time.perf_counter() - start)
    times.sort()
    return {"onestep_s": times[len(times) // 2]}


def onestep_breakdown(model, params, batch: int) -> dict:
    """Seconds of each stage of ``one_step_features`` (run stage by stage, synchronised after
    each, second of two passes): where the time beyond the bare head call goes."""
    import torch

    from foresight.pipelines.svd import conditioning as cond
    from foresight.pipelines.svd.features import merge_features, to_host

    frames, text, seeds = inputs(model, params, batch)
    device = str(model.device)
    split = model.split(params.feature_blocks)
    side = params.size // model.vae_scale_factor
    stages: dict[str, float] = {}

    def stage(name, fn):
        sync(device)
        start = time.perf_counter()
        value = fn()
        sync(device)
        stages[name] = time.perf_counter() - start
        return value

    with torch.no_grad():
        for _ in range(2):
            scheduler = model.new_scheduler()
            scheduler.set_timesteps(params.steps, device=model.device)
            noise, image_noise = stage("noise", lambda: cond.clip_noise(
                seeds, (params.num_frames, 4, side, side), (3, params.size, params.size)))
            images = stage("preprocess", lambda: cond.preprocess_frames(frames, params.size))
            image_latents = stage("encode", lambda: cond.image_latents(
                model, images, image_noise, params.noise_aug_strength, params.num_frames))
            states = stage("text", lambda: cond.text_states(model, text, params.text_position_encoding))
            ids = cond.added_time_ids(model, params.fps, params.motion_bucket_id, params.noise_aug_strength, batch)
            t = scheduler.timesteps[0]
            sample = stage("scale", lambda: torch.cat([scheduler.scale_model_input(
                noise.to(model.device) * scheduler.init_noise_sigma, t).to(model.dtype), image_latents], dim=2))
            captured = stage("head", lambda: split.features(sample, t, states, ids))
            merged = stage("merge", lambda: merge_features(captured, params.feature_blocks, batch))
            stage("to_host", lambda: to_host(merged))
    return {f"onestep_{name}_s": value for name, value in stages.items()}


def time_generate(model, params, batch: int, repeats: int, spec: dict) -> dict:
    """Seconds of 30-step generation (best of ``repeats``); with ``check`` in the measures, whether
    its features equal the standalone extraction; keeps the last output for ``save_ref``/``drift``."""
    from foresight.pipelines.svd import generate_clips, one_step_features

    data = inputs(model, params, batch)
    start = time.perf_counter()
    generate_clips(model, params.model_copy(update={"steps": 2}), *data)  # warm-up: every code path once
    warm_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate_clips(model, params, *data, keep_latents=True)
        times.append(time.perf_counter() - start)
    row = {"generate_s": min(times), "generate_warm_s": warm_s}
    if "check" in spec["measure"]:
        row["capture_equals_standalone"] = bool((out.onestep == one_step_features(model, params, *data)).all())
    LAST_OUTPUT["generated"] = out
    return row


LAST_OUTPUT: dict = {}


def reference_arrays(model, params, batch: int) -> dict:
    """Outputs compared between precisions: one bare UNet call, the one-step features, the final
    latents and frames of the last timed generation (same inputs and weights in every process)."""
    import torch

    with torch.no_grad():
        call = bare_call(model, params, batch)().float().cpu().numpy()
    out = LAST_OUTPUT["generated"]
    return {"call": call, "onestep": out.onestep, "latents": out.latents, "frames": out.frames}


def save_reference(model, params, batch: int, scratch: Path) -> dict:
    """Write :func:`reference_arrays` under ``scratch`` (fp16 run) plus the drift of one compiled
    call from the same call in eager mode (the rounding floor of compilation alone)."""
    import numpy as np
    import torch

    from foresight.pipelines.svd.unet_split import UNetSplit

    arrays = reference_arrays(model, params, batch)
    scratch.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(scratch / f"ref_{name}.npy", array)
    sample, t, states, ids = unet_call_args(model, params, batch)
    with torch.no_grad():
        eager = UNetSplit(model.unet, max(params.feature_blocks))(sample, t, states, ids)[0].float().cpu().numpy()
    return {"ref_saved": str(scratch), "drift_call_compiled_vs_eager": rel_l2(arrays["call"], eager)}


def rel_l2(value, reference) -> float:
    import numpy as np

    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def drift(model, params, batch: int, scratch: Path) -> dict:
    """Relative L2 of this run's outputs against the fp16 reference saved by ``save_ref``, and the
    mean absolute difference of the decoded frames in uint8 levels."""
    import numpy as np

    arrays = reference_arrays(model, params, batch)
    row = {}
    for name, array in arrays.items():
        reference = np.load(scratch / f"ref_{name}.npy")
        if name == "frames":
            row["drift_frames_mean_abs"] = float(np.abs(array.astype(np.int16) - reference).mean())
        else:
            row[f"drift_{name}"] = rel_l2(array, reference)
    return row


def time_decode(model, params, batch: int) -> dict:
    import torch

    from foresight.pipelines.svd.sampler import decode_frames

    side = params.size // model.vae_scale_factor
    latents = torch.randn(batch, params.num_frames, 4, side, side, device=model.device)
    decode_frames(model, latents)
    sync(str(model.device))
    start = time.perf_counter()
    decode_frames(model, latents)
    return {"decode_s": time.perf_counter() - start}


def profile_unet(model, params, batch: int) -> dict:
    """Where one UNet call spends device time: share per kernel class and the top kernels."""
    import torch
    from profiling import class_totals_us, device_kernels, top_kernels  # bench/profiling.py
    from torch.profiler import ProfilerActivity, profile

    call = bare_call(model, params, batch)
    with torch.no_grad():
        call()
        sync(str(model.device))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            sync(str(model.device))
    kernels = device_kernels(prof)
    totals = class_totals_us(kernels)
    total = sum(totals.values()) or 1.0
    return {"profile_device_ms": total / 1e3, "profile_shares": {k: us / total for k, us in totals.items()},
            "profile_top": top_kernels(kernels)}


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}


def apply_setting(model, setting: dict, stack) -> None:
    """Switch a loaded (uncompiled) model to an eager setting in place: dtype, memory format,
    cuDNN autotuning, SDPA backend (held open on ``stack`` until the next setting)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from foresight.pipelines.svd.loading import parse_dtype
    from foresight.pipelines.svd.speed import set_channels_last

    stack.close()
    dtype = parse_dtype(setting.get("dtype", "fp16"))
    if model.dtype != dtype:
        model.unet.to(dtype)
        model.vae.to(dtype)
        model.dtype = dtype
    set_channels_last(model.unet, bool(setting.get("channels_last")))
    torch.backends.cudnn.benchmark = bool(setting.get("cudnn_benchmark", False))
    if setting.get("sdpa"):
        stack.enter_context(sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[setting["sdpa"]])]))


def measure_settings(model, params, spec: dict, base: dict) -> None:
    """Bare-UNet timings of each eager setting in ``spec['settings']`` on the same loaded model."""
    from contextlib import ExitStack

    stack = ExitStack()
    for setting in spec.get("settings", []):
        try:
            apply_setting(model, setting, stack)
            for batch in setting.get("batches", spec["batches"]):
                row = {**base, **setting, "batch": batch, **time_unet(model, params, batch, spec["iters"])}
                print("RESULT " + json.dumps(row), flush=True)
        except Exception as err:  # noqa: BLE001 - one failing setting must not end the sweep
            error = f"{type(err).__name__}: {err}"[:500]
            print("RESULT " + json.dumps({**base, **setting, "error": error}), flush=True)
    if spec.get("settings"):
        apply_setting(model, spec["settings"][0], stack)


def run_variant(spec: dict) -> None:
    """Measure one variant: FLOPs, eager settings, then the pipeline (one-step, generation, decode)."""
    import torch

    model, params, load_s = setup(spec)
    base = {k: spec.get(k) for k in ("name", "dtype", "compile", "compile_mode", "channels_last", "cudnn_benchmark",
                                     "inductor", "attention", "cross_context")}
    base["freeze"] = spec.get("freeze", True) if spec.get("compile") == "unet" else None
    base["load_s"] = load_s
    if spec["device"].startswith("cuda"):
        base["gpu"] = torch.cuda.get_device_name()
    scratch = Path(spec.get("scratch", "/tmp/svd-bench-scratch"))
    if "flops" in spec["measure"]:
        row = {**base, "flops_per_clip": count_flops(model, params),
               "matmul_tflops": matmul_tflops(spec["device"]) if spec["device"].startswith("cuda") else None}
        print("RESULT " + json.dumps(row), flush=True)
    measure_settings(model, params, spec, base)
    for batch in spec["batches"]:
        row = {**base, "batch": batch}
        measures = [("unet", lambda: time_unet(model, params, batch, spec["iters"])),
                    ("head", lambda: time_head(model, params, batch, spec["iters"])),
                    ("onestep", lambda: time_onestep(model, params, batch, max(3, spec["iters"] // 2))),
                    ("breakdown", lambda: onestep_breakdown(model, params, batch)),
                    ("decode", lambda: time_decode(model, params, batch)),
                    ("generate", lambda: {**time_generate(model, params, batch, spec.get("repeats", 1), spec),
                                          "steps": params.steps}),
                    ("save_ref", lambda: save_reference(model, params, batch, scratch)),
                    ("drift", lambda: drift(model, params, batch, scratch)),
                    ("profile", lambda: profile_unet(model, params, batch))]
        for name, measure in measures:
            if name != "unet" and name not in spec["measure"]:
                continue
            try:
                row.update(measure())
            except Exception as err:  # noqa: BLE001 - report and keep the other measurements
                row[f"{name}_error"] = f"{type(err).__name__}: {err}"[:400]
            print("PARTIAL " + json.dumps(row), flush=True)
        if spec["device"].startswith("cuda"):
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        print("RESULT " + json.dumps(row), flush=True)


# ---------------------------------------------------------------- the sweep (driver)
def sweep_variants(tiny: bool) -> list[dict]:
    """Variants of the sweep: one eager process (settings measured in place), then compiled ones."""
    main, big = (2, [1, 2, 4]) if tiny else (16, [8, 16, 32])
    eager_settings = [
        {"setting": "fp16", "dtype": "fp16", "batches": big},
        {"setting": "bf16", "dtype": "bf16", "batches": [main]},
        {"setting": "fp16+channels-last", "dtype": "fp16", "channels_last": True, "batches": [main]},
        {"setting": "fp16+cudnn-benchmark", "dtype": "fp16", "cudnn_benchmark": True, "batches": [main]},
        {"setting": "fp16+sdpa-cudnn", "dtype": "fp16", "sdpa": "cudnn", "batches": [main]},
        {"setting": "fp16+sdpa-efficient", "dtype": "fp16", "sdpa": "efficient", "batches": [main]},
    ]
    return [
        {"name": "eager", "dtype": "fp16", "batches": [main], "settings": eager_settings,
         "measure": ["flops", "onestep", "decode", "generate"]},
        {"name": "blocks-compiled", "dtype": "fp16", "compile": "blocks", "batches": [main],
         "measure": ["onestep", "generate"]},
        {"name": "blocks-compiled-b32", "dtype": "fp16", "compile": "blocks", "batches": [big[-1]],
         "measure": ["onestep", "decode", "generate", "profile"]},
        {"name": "blocks-autotune-b32", "dtype": "fp16", "compile": "blocks",
         "compile_mode": "max-autotune-no-cudagraphs", "batches": [big[-1]], "measure": []},
        # Whole-graph UNet halves, decoder and encoder; fp8 drift is measured against the fp16 outputs
        # saved by save_ref (run the fp16 variant first). "-nofreeze" repeats the first whole-graph
        # run (without inductor freezing).
        {"name": "unet-fp16-nofreeze-b32", "dtype": "fp16", "compile": "unet", "freeze": False,
         "batches": [big[-1]], "timeout_s": 290,
         "measure": ["flops", "head", "onestep", "breakdown", "decode", "generate", "check", "save_ref", "profile"]},
        {"name": "unet-fp16-b32", "dtype": "fp16", "compile": "unet", "batches": [big[-1]], "timeout_s": 250,
         "measure": ["flops", "head", "onestep", "breakdown", "decode", "generate", "check", "save_ref", "profile"]},
        {"name": "unet-fp8-b32", "dtype": "fp8", "compile": "unet", "batches": [big[-1]], "timeout_s": 280,
         "measure": ["head", "onestep", "decode", "generate", "check", "drift", "profile"]},
    ]


def run_child(spec: dict, timeout_s: float) -> list[dict]:
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--variant", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out, err, status = proc.stdout, proc.stderr, f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err, status = "", f"timed out after {timeout_s:.0f} s"
    rows = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    partial = [json.loads(line[8:]) for line in out.splitlines() if line.startswith("PARTIAL ")]
    if partial and (not rows or rows[-1].get("batch") != partial[-1].get("batch")):
        rows.append({**partial[-1], "incomplete": status})
    print(f"# {spec['name']}: {status} in {time.perf_counter() - started:.0f} s, {len(rows)} results", flush=True)
    if err and (not rows or status != "exit 0"):
        print(err[-3000:], flush=True)
    return rows or [{"name": spec["name"], "error": status, "stderr_tail": err[-1500:]}]


def derive(rows: list[dict]) -> list[dict]:
    flops = next((r["flops_per_clip"] for r in rows if "flops_per_clip" in r), None)
    peak = next((r["matmul_tflops"] for r in rows if r.get("matmul_tflops")), None)
    for row in rows:
        if "unet_ms" not in row:
            continue
        unet_s, batch = row["unet_ms"] / 1e3, row["batch"]
        row["unet_ms_per_clip"] = row["unet_ms"] / batch
        if flops:
            row["tflops"] = flops * batch / unet_s / 1e12
            row["mfu"] = row["tflops"] / H100_DENSE_BF16_TFLOPS
            row["of_matmul_peak"] = row["tflops"] / peak if peak else None
        row["unet_only_clips_per_hour_30_steps"] = batch * 3600 / (60 * unet_s)
        if "generate_s" in row:
            row["generate_clips_per_hour"] = batch * 3600 / row["generate_s"]
            row["generate_overhead"] = row["generate_s"] / (2 * row["steps"] * unet_s) - 1
        if "onestep_s" in row:
            row["onestep_clips_per_hour"] = batch * 3600 / row["onestep_s"]
            row["onestep_vs_unet"] = row["onestep_s"] / unet_s
            if "head_ms" in row:
                row["onestep_vs_head"] = row["onestep_s"] / (row["head_ms"] / 1e3)
        if "decode_s" in row:
            row["decode_ms_per_clip"] = 1e3 * row["decode_s"] / batch
    return rows


DETAIL_KEYS = ("onestep_", "drift_", "capture_", "profile_shares", "decode_ms", "head_", "gpu", "error", "incomplete")


def print_table(rows: list[dict]) -> None:
    cols = ["name", "setting", "batch", "unet_ms", "unet_ms_per_clip", "tflops", "mfu", "unet_first_s", "head_ms",
            "generate_s", "generate_clips_per_hour", "generate_overhead", "onestep_s", "onestep_clips_per_hour",
            "onestep_vs_unet", "onestep_vs_head", "decode_s", "peak_mem_gb"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        if "unet_ms" not in row and "error" not in row:
            continue
        cells = []
        for col in cols:
            value = row.get(col, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        print("| " + " | ".join(cells) + " |")
    for row in rows:  # breakdowns, drift, checks: one line per variant
        detail = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()
                  if k.startswith(DETAIL_KEYS) and k != "onestep_clips_per_hour"}
        if detail:
            print(f"# detail {row.get('name')} B={row.get('batch')}: {json.dumps(detail)}")


def sweep(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget_s
    common = {"model": "tiny" if args.tiny else args.model, "device": args.device, "iters": args.iters,
              "compile_backend": args.compile_backend,
              "frames": 4 if args.tiny else 16, "size": 32 if args.tiny else 256, "steps": 2 if args.tiny else 30}
    rows = []
    only = set(args.only.split(",")) if args.only else None
    for variant in sweep_variants(args.tiny):
        if only and variant["name"] not in only:
            continue
        left = deadline - time.perf_counter()
        if left < 30:
            print(f"# {variant['name']}: skipped (budget spent)", flush=True)
            continue
        if args.device == "cpu":  # half precision on a CPU only tests the code path, slowly (fp8 kept: tiny)
            variant = {**variant, "dtype": "fp8" if variant["dtype"] == "fp8" else "fp32",
                       "settings": [{**s, "dtype": "fp32", "sdpa": None} for s in variant.get("settings", [])]}
        timeout_s = variant.get("timeout_s", args.variant_timeout_s)
        rows += run_child({**common, "scratch": args.scratch, **variant}, min(left, timeout_s))
        (out / "svd_bench.json").write_text(json.dumps(derive(rows), indent=1))
    print_table(derive(rows))


# ---------------------------------------------------------------- fast recipe vs the reference (--fast-drift)
DRIFT_SIZES = {"tiny": {"model": "tiny", "frames": 4, "size": 32, "teachers": "tiny"},
               "full": {"model": "random", "frames": 16, "size": 256, "teachers": "random"}}
"""--size of --fast-drift: the SVD and teacher weights and the clip shape."""


def with_recipe(params, recipe: str, steps: int | None):
    """``params`` with speed recipe ``recipe``'s settings on top (``steps`` overriding its steps)."""
    from foresight.pipelines.svd import SVDParams
    from foresight.schemas.presets import deep_merge, nest
    from foresight.schemas.presets.svd import recipe_values

    merged = deep_merge(params.model_dump(), nest(recipe_values(recipe)))
    return SVDParams.model_validate({**merged, **({"steps": steps} if steps else {})})


def unet_calls_per_clip(model, params) -> int:
    """UNet calls one clip costs under ``params`` (conditional + unconditional; one-step head excluded)."""
    from foresight.pipelines.svd.solvers import call_grid_points

    if params.sampler is None:
        return 2 * params.steps
    scheduler = model.new_scheduler()
    scheduler.set_timesteps(params.steps)
    sigmas = scheduler.sigmas.tolist()
    points = call_grid_points(params.sampler.solver, params.steps)
    return len(points) + sum(sigmas[i] >= params.sampler.guidance_sigma_min for i in points)


def timed_generation(model, params, data, repeats: int):
    """(best seconds of ``repeats`` generations, the last output with its final latents)."""
    from foresight.pipelines.svd import generate_clips

    times = []
    for _ in range(repeats):
        sync(str(model.device))
        start = time.perf_counter()
        out = generate_clips(model, params, *data, keep_latents=True)
        sync(str(model.device))
        times.append(time.perf_counter() - start)
    return min(times), out


def teacher_targets(name: str, spec: str, device: str, clip_sets: list, batch: int = 4) -> list:
    """Target tokens (float32, host) of ``name`` for each uint8 clip set (B, T, S, S, 3), with the
    teacher's default settings and dtype (fp32: what teacher versions are built with)."""
    import numpy as np
    import torch

    from foresight.pipelines.teachers import load_teacher

    teacher = load_teacher(name, spec, None, device, "fp32")
    targets = []
    with torch.inference_mode():
        for clips in clip_sets:
            parts = [teacher.encode_frames(torch.from_numpy(clips[first:first + batch])).float().cpu().numpy()
                     for first in range(0, len(clips), batch)]
            targets.append(np.concatenate(parts))
    del teacher
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return targets


def fast_drift_figures(args) -> dict:
    """Reference (the default 30-step loop) and speed recipe ``args.recipe`` on the same inputs:
    clips/hour of each in this process and the relative L2 of the final latents, decoded frames
    and DINOv2 / DA3 targets of the fast clips against the reference's. With ``args.fast_dtype``
    the fast recipe runs on its own model in that dtype (same seeded weights), loaded once the
    reference's is gone."""
    import torch

    from foresight.pipelines.svd import SVDParams

    size = DRIFT_SIZES[args.size]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    reference = SVDParams(num_frames=size["frames"], size=size["size"], **({"steps": args.steps} if args.steps else {}))
    fast = with_recipe(reference, args.recipe, args.fast_steps)
    fast_dtype = args.fast_dtype or args.dtype
    model = drift_model(args, args.dtype)
    data = inputs(model, reference, args.batch)
    own_model = fast_dtype != args.dtype
    warm_s = warm_up(model, [reference] if own_model else [reference, fast], data)
    ref_s, ref_out = timed_generation(model, reference, data, args.repeats)
    if own_model:
        del model
        free_cuda(args.device)
        model = drift_model(args, fast_dtype)
        warm_s += warm_up(model, [fast], data)
    fast_s, fast_out = timed_generation(model, fast, data, args.repeats)
    calls = {"reference": unet_calls_per_clip(model, reference), "fast": unet_calls_per_clip(model, fast)}
    del model
    free_cuda(args.device)
    frames = [ref_out.frames, fast_out.frames]
    teachers = {name: teacher_targets(name, size["teachers"], args.device, frames) for name in ("dinov2", "da3")}
    drift = {"latents": rel_l2(fast_out.latents, ref_out.latents),
             "frames": rel_l2(fast_out.frames.astype("float32"), ref_out.frames.astype("float32")),
             **{name: rel_l2(targets[1], targets[0]) for name, targets in teachers.items()}}
    return {"batch": args.batch, "warm_up_s": warm_s, "reference_s": ref_s, "fast_s": fast_s, "fast_dtype": fast_dtype,
            "reference_params": reference.model_dump(mode="json"), "fast_params": fast.model_dump(mode="json"),
            "unet_calls_per_clip": calls, "onestep_equal": bool((fast_out.onestep == ref_out.onestep).all()),
            "fp16_clips_per_hour": args.batch * 3600 / ref_s, "fast_clips_per_hour": args.batch * 3600 / fast_s,
            "fast_speedup": ref_s / fast_s, "fast_drift": drift}


def drift_model(args, dtype: str):
    """The --fast-drift size's SVD in ``dtype`` with ``args.compile``'s speed-ups."""
    from foresight.pipelines.svd import load_svd
    from foresight.pipelines.svd.speed import SpeedOptions, apply_speedups

    return apply_speedups(load_svd(DRIFT_SIZES[args.size]["model"], args.device, dtype),
                          SpeedOptions(compile=args.compile, cross_context=args.cross_context))


def warm_up(model, recipes: list, data) -> float:
    """Seconds of a 2-step generation under each recipe (compilation). Each recipe warms its own
    shapes: the fast one's unguided steps call the UNet on half the batch, a shape that would
    otherwise compile inside its timed generation."""
    from foresight.pipelines.svd import generate_clips

    start = time.perf_counter()
    for params in recipes:
        generate_clips(model, params.model_copy(update={"steps": 2}), *data)
    return time.perf_counter() - start


def free_cuda(device: str) -> None:
    """Return the cached GPU memory of a dropped model before the next model or the teachers load."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def fast_drift(args) -> None:
    """Run :func:`fast_drift_figures` and write its headline figures (bench/headline.py)."""
    from headline import write_headline

    figures = fast_drift_figures(args)
    headline = {key: figures.pop(key) for key in ("fp16_clips_per_hour", "fast_clips_per_hour", "fast_speedup",
                                                   "fast_drift")}
    path = write_headline("bench_svd", headline, Path(args.json), command=" ".join(sys.argv), size=args.size,
                          model=DRIFT_SIZES[args.size]["model"], dtype=args.dtype, compile=args.compile,
                          cross_context=args.cross_context,
                          recipe=args.recipe, **figures)
    print(json.dumps({**headline, "unet_calls_per_clip": figures["unet_calls_per_clip"],
                      "onestep_equal": figures["onestep_equal"]}, indent=1))
    print(f"# written to {path}")


# ---------------------------------------------------------------- attention settings side by side (--attention-compare)
def parse_setting(setting: str) -> tuple[str, str]:
    """(attention setting, cross-context setting) of an ``--attention-compare`` entry
    ``ATTENTION[+CROSS_CONTEXT]`` (cross context default ``repeat``), e.g. ``default+folded``."""
    attention, _, cross_context = setting.partition("+")
    return attention, cross_context or "repeat"


def install_setting(model, setting: str) -> None:
    """Install an ``--attention-compare`` entry on the loaded model; the next split compiles anew."""
    from foresight.pipelines.svd.attention import install_attention
    from foresight.pipelines.svd.cross_context import install_cross_context

    attention, cross_context = parse_setting(setting)
    install_attention(model.unet, attention)
    install_cross_context(model.unet, cross_context)
    model._splits.clear()  # new head/tail (compiled again when compile_kwargs is set) tracing the new forward


def setting_flops(model, params, setting: str) -> float:
    """FLOPs per clip of one UNet call under ``setting``'s cross context. Counted with diffusers'
    attention processor: every backend does the same attention FLOPs, and the flop counter cannot
    trace flex attention eagerly."""
    install_setting(model, f"default+{parse_setting(setting)[1]}")
    return count_flops(model, params)


def settings_row(model, params, setting: str, data, args, deadline: float, first: bool) -> tuple[dict, dict]:
    """Install ``setting`` on the loaded model (fresh compiled UNet halves), count the FLOPs one
    UNet call does under it, then time one bare UNet call and, while the budget allows, a 30-step
    generation (``first``: the decoder and encoder compile in its warm-up): (figures, outputs)."""
    import torch

    row: dict = {"setting": setting, "flops_per_clip": setting_flops(model, params, setting)}
    install_setting(model, setting)
    call_ms, first_s = time_call(bare_call(model, params, args.batch), args.device, args.iters)
    row.update(unet_ms=1e3 * call_ms, unet_first_s=first_s)
    with torch.no_grad():
        outputs = {"call": bare_call(model, params, args.batch)().float().cpu().numpy()}
    # 30 guided steps are 60 calls (measured: 1.05x their bare time), plus decode/encode (compiled on the first)
    expected_s = 1.5 * params.steps * 2 * call_ms + (60 if first else 15)
    if deadline - time.perf_counter() < expected_s:
        row["generate_skipped"] = f"budget: {deadline - time.perf_counter():.0f} s left, ~{expected_s:.0f} s needed"
        return row, outputs
    from foresight.pipelines.svd import generate_clips

    start = time.perf_counter()
    generate_clips(model, params.model_copy(update={"steps": 1}), *data)  # decoder/encoder compiled once
    row["generate_warm_s"] = time.perf_counter() - start
    row["generate_s"], out = timed_generation(model, params, data, 1)
    outputs.update(latents=out.latents, frames=out.frames, onestep=out.onestep)
    return row, outputs


def settings_drift(outputs: dict, baseline: dict) -> dict:
    """Relative L2 of each output against the baseline setting's (frames as float pixel values)."""
    drift = {}
    for name, value in outputs.items():
        if name in baseline:
            drift[name] = rel_l2(value.astype("float32"), baseline[name].astype("float32"))
    return drift


def eager_floor(model, params, compiled_call, batch: int) -> float:
    """Relative L2 of one compiled call against the same call eager (the rounding floor of
    compilation alone: the scale against which an attention setting's drift reads)."""
    import torch

    from foresight.pipelines.svd.unet_split import UNetSplit

    sample, t, states, ids = unet_call_args(model, params, batch)
    with torch.no_grad():
        eager = UNetSplit(model.unet, max(params.feature_blocks))(sample, t, states, ids)[0].float().cpu().numpy()
    return rel_l2(compiled_call, eager)


def attention_compare_figures(args) -> dict:
    """The settings of ``args.attention_compare`` (``ATTENTION[+CROSS_CONTEXT]``, the first is the
    baseline) on one loaded model, each with its own compiled UNet, on the same inputs: FLOPs
    done per clip, ms per UNet call, MFU, 30-step clips/hour and the drift of one call, the
    final latents, the frames and the one-step features against the baseline; plus the
    baseline's compiled-vs-eager floor. MFU counts the FLOPs each setting actually does
    (``mfu``); ``mfu_of_baseline_work`` divides the baseline's FLOPs by the setting's time (the
    speed-up in MFU terms when a setting skips work, as ``folded`` does)."""
    import torch

    from foresight.pipelines.svd import SVDParams, load_svd
    from foresight.pipelines.svd.speed import SpeedOptions, apply_speedups

    deadline = time.perf_counter() + args.budget_s
    size = DRIFT_SIZES[args.size]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    settings = args.attention_compare.split(",")
    started = time.perf_counter()
    model = apply_speedups(load_svd(size["model"], args.device, args.dtype), SpeedOptions(compile=args.compile))
    params = SVDParams(num_frames=size["frames"], size=size["size"], **({"steps": args.steps} if args.steps else {}))
    figures = {"batch": args.batch, "load_s": time.perf_counter() - started, "settings": {}}
    data, baseline = inputs(model, params, args.batch), None
    for setting in settings:
        if deadline - time.perf_counter() < 60:
            figures["settings"][setting] = {"skipped": "budget spent"}
            continue
        row, outputs = settings_row(model, params, setting, data, args, deadline, first=baseline is None)
        add_rates(row, args.batch, figures["settings"][settings[0]] if baseline is not None else row)
        if baseline is None:
            baseline = outputs
            row["drift_call_compiled_vs_eager"] = eager_floor(model, params, outputs["call"], args.batch)
        else:
            row["drift_vs_baseline"] = settings_drift(outputs, baseline)
        figures["settings"][setting] = row
        print("SETTING " + json.dumps(row), flush=True)
    return figures


def add_rates(row: dict, batch: int, baseline: dict) -> None:
    """TFLOP/s and MFU of a settings row from the FLOPs it does, the same against the baseline's
    FLOPs, the FLOPs it saves per UNet call, and clips/hour when its generation ran."""
    seconds = row["unet_ms"] / 1e3
    row["tflops"] = row["flops_per_clip"] * batch / seconds / 1e12
    row["mfu"] = row["tflops"] / H100_DENSE_BF16_TFLOPS
    row["mfu_of_baseline_work"] = baseline["flops_per_clip"] * batch / seconds / 1e12 / H100_DENSE_BF16_TFLOPS
    row["tflop_saved_per_call"] = (baseline["flops_per_clip"] - row["flops_per_clip"]) * batch / 1e12
    if "generate_s" in row:
        row["clips_per_hour"] = batch * 3600 / row["generate_s"]


def attention_compare(args) -> None:
    """Run :func:`attention_compare_figures` and write its headline figures (bench/headline.py)."""
    from headline import write_headline

    figures = attention_compare_figures(args)
    rows = figures.pop("settings")
    names = list(rows)
    headline = {"fp16_clips_per_hour": rows[names[0]].get("clips_per_hour"),
                "unet_ms": {name: row.get("unet_ms") for name, row in rows.items()},
                "mfu": {name: row.get("mfu") for name, row in rows.items()},
                "tflop_saved_per_call": {name: row.get("tflop_saved_per_call") for name, row in rows.items()},
                "clips_per_hour": {name: row.get("clips_per_hour") for name, row in rows.items()},
                "drift_vs_baseline": {name: row.get("drift_vs_baseline") for name, row in rows.items()
                                      if "drift_vs_baseline" in row},
                "drift_call_compiled_vs_eager": rows[names[0]].get("drift_call_compiled_vs_eager")}
    path = write_headline("bench_svd_attention_e2e", headline, Path(args.json), command=" ".join(sys.argv),
                          unet_size=args.size, model=DRIFT_SIZES[args.size]["model"], dtype=args.dtype,
                          compile=args.compile, baseline=names[0], **figures, settings=rows)
    print(json.dumps(headline, indent=1))
    print(f"# written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="Run every variant, each in its own process.")
    parser.add_argument("--variant", help="JSON spec of one variant (child mode).")
    parser.add_argument("--tiny", action="store_true", help="Tiny model on small sizes (CPU sanity run).")
    parser.add_argument("--model", default="random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--only", help="Comma list of variant names to run.")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of compiled variants ('aot_eager': quick CPU check of the code).")
    parser.add_argument("--budget-s", type=float, default=540.0, help="Wall-clock budget of the whole sweep.")
    parser.add_argument("--variant-timeout-s", type=float, default=240.0)
    parser.add_argument("--out", default="/tmp/svd-bench")
    parser.add_argument("--scratch", default="/tmp/svd-bench-scratch",
                        help="Where the fp16 run leaves its outputs for the fp8 drift (large: not under --out).")
    drift = parser.add_argument_group("--fast-drift: the speed recipe against the 30-step reference")
    drift.add_argument("--fast-drift", action="store_true",
                       help="Reference and fast recipe on the same inputs: clips/hour of both, drift of latents, "
                            "frames, DINOv2 and DA3 targets; writes --json.")
    drift.add_argument("--size", choices=sorted(DRIFT_SIZES), default="full",
                       help="full: random full-size SVD, DINOv2 and DA3 (GPU); tiny: tiny models (CPU smoke).")
    drift.add_argument("--recipe", default="fast")
    drift.add_argument("--dtype", default="fp16", help="SVD compute dtype (fp16: the exact reference; fp32 on a CPU).")
    drift.add_argument("--fast-dtype", help="The fast recipe's own dtype (e.g. fp8; default: --dtype), drift still "
                                            "against the --dtype reference.")
    drift.add_argument("--compile", default="none", choices=["none", "blocks", "unet"])
    drift.add_argument("--cross-context", default="folded", choices=["repeat", "temporal", "folded"],
                       help="--fast-drift: the cross-context setting of both recipes' models (pipelines/svd/cross_context.py).")
    drift.add_argument("--batch", type=int, default=32, help="Clips per UNet call.")
    drift.add_argument("--repeats", type=int, default=1, help="Timed generations of each (best kept).")
    drift.add_argument("--steps", type=int, help="Reference steps (default: SVDParams' 30).")
    drift.add_argument("--fast-steps", type=int, help="Fast recipe steps (default: the recipe's).")
    drift.add_argument("--json", help="Headline JSON (default bench/results/bench_svd.json, with --attention-compare "
                                      "bench/results/bench_svd_attention_e2e.json).")
    drift.add_argument("--attention-compare", metavar="SETTINGS",
                       help="Comma list of ATTENTION[+CROSS_CONTEXT] settings (the first is the baseline, e.g. "
                            "default,short-flex or default,default+folded; cross context repeat|temporal|folded, "
                            "default repeat): each with its own compiled UNet on one loaded model, same inputs: "
                            "FLOPs done, ms/call, MFU, 30-step clips/hour, drift vs the baseline; uses --size "
                            "--dtype --compile --batch --steps --iters --budget-s.")
    args = parser.parse_args()
    if args.json is None:
        name = "bench_svd_attention_e2e.json" if args.attention_compare else "bench_svd.json"
        args.json = str(REPO / "bench" / "results" / name)
    if args.attention_compare:
        attention_compare(args)
    elif args.fast_drift:
        fast_drift(args)
    elif args.variant:
        spec = {"model": args.model, "device": args.device, "iters": args.iters, "frames": 16, "size": 256,
                "steps": 30, "batches": [16], "measure": [], **json.loads(args.variant)}
        spec.setdefault("name", "variant")
        run_variant(spec)
    elif args.sweep:
        sweep(args)
    else:
        parser.error("give --sweep or --variant")


if __name__ == "__main__":
    main()
