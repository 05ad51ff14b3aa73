"""Attention backends on every distinct attention call of the SVD UNet (issue 19: the non-GEMM time).

The shapes come from hooking the attention processors of the UNet during one forward at the
benchmark's batch, clip length and frame size (the full-size ``random`` architecture built on the
meta device: the shapes need no weights), through the split UNet the pipeline runs. One UNet call
is one guidance branch of B clips (the pipeline makes two per guided step). For every distinct
shape (spatial self-attention over h*w tokens, spatial cross-attention to the text tokens,
temporal self-attention over the frames, temporal cross-attention) it times, on q, k, v laid out
as diffusers lays them out (transposed views of (N, S, heads*d) projections):

- ``sdpa`` (today's default: PyTorch's choice), ``sdpa-flash`` / ``-cudnn`` / ``-efficient`` /
  ``-math`` (forced with ``torch.nn.attention.sdpa_kernel``), eager;
- ``explicit`` (matmul, float32 softmax, matmul) eager and ``explicit-compiled``;
- ``reduce-compiled`` (float32 broadcast products, short keys only), ``flex-compiled``,
  ``packed-flex-compiled`` (several short sequences per tile, block-diagonal mask);
- cross-attention only, a what-if no processor can run without knowing that the keys repeat:
  ``folded`` (the text keys are the same for every frame of a clip (spatial) and every position
  of a clip (temporal), so the repeated queries fold into one longer sequence against one copy of
  the keys: SDPA on (N/g, heads, g*S, d)), plus the K/V projection time it would save.

Per shape: median ms, ratio to ``sdpa``, relative L2 against SDPA's math backend in float32.
Per variant: the sum over one UNet call (calls of each shape x ms); per attention setting
(``LONG/SHORT@N`` of pipelines/svd/attention.py): the predicted sum, the best one named.
Writes bench/results/bench_svd_attention.json (bench/headline.py).

    # GPU (one H100, about 3-5 minutes: most of it compiling the compiled variants per shape)
    python bench/bench_svd_attention.py
    # CPU sanity run (tiny UNet, seconds; compiled variants through the aot_eager backend)
    python bench/bench_svd_attention.py --tiny
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

EAGER_VARIANTS = {"sdpa": "sdpa", "sdpa-flash": "flash", "sdpa-cudnn": "cudnn", "sdpa-efficient": "efficient",
                  "sdpa-math": "math", "explicit": "explicit"}
COMPILED_VARIANTS = {"explicit-compiled": "explicit", "reduce-compiled": "reduce", "flex-compiled": "flex",
                     "packed-flex-compiled": "packed-flex"}
SHORT_ONLY = ("reduce-compiled", "packed-flex-compiled")
"""Variants timed only on short key sequences (at most SHORT_MAX_KEYS keys)."""
CUDA_ONLY = ("sdpa-cudnn", "sdpa-efficient")
"""SDPA kernels without a CPU implementation (left out of a CPU run)."""
PLAN_THRESHOLDS = (20, 64)
"""Short-key thresholds (``@N``) the predicted settings are evaluated at: 20 takes temporal and
cross-attention, 64 also the spatial self-attention of the two deepest levels."""
SIZES = {"full": {"model": "random", "batch": 32, "frames": 16, "size": 256},
         "tiny": {"model": "tiny", "batch": 2, "frames": 4, "size": 32}}


# ---------------------------------------------------------------- the shapes of one UNet call
def attention_shapes(model: str, batch: int, frames: int, size: int) -> list[dict]:
    """Every distinct attention call of one UNet forward (one guidance branch of ``batch`` clips)
    with how many times a forward makes it; from the attention processors of the UNet built on
    the meta device, run through the split UNet (head up to up_blocks[1], then the tail)."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from foresight.pipelines.svd.loading import describe_svd
    from foresight.pipelines.svd.unet_split import UNetSplit

    desc = describe_svd(model)
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel.from_config(desc.unet_config)
    unet = unet.to(device="meta", dtype=torch.float16)  # a few parameters are made on the CPU regardless
    seen: dict[tuple, dict] = {}

    class Recording(AttnProcessor2_0):
        def __init__(self, name: str):
            super().__init__()
            self.name = name

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            record_call(seen, self.name, attn, hidden_states, encoder_hidden_states, batch)
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    for name, processor in unet.attn_processors.items():
        unet.get_submodule(name.rsplit(".", 1)[0]).set_processor(Recording(name))
    side = size // 2 ** (len(desc.vae_config["block_out_channels"]) - 1)
    meta = dict(device="meta", dtype=torch.float16)
    sample = torch.empty(batch, frames, unet.config.in_channels, side, side, **meta)
    states = torch.empty(batch, 20, unet.config.cross_attention_dim, **meta)
    with torch.no_grad(), torch.device("meta"):  # tensors diffusers makes on the fly go to meta too
        UNetSplit(unet, 1)(sample, torch.tensor(1.5), states, torch.empty(batch, 3, **meta))
    return list(seen.values())


def record_call(seen: dict, name: str, attn, hidden, context, batch: int) -> None:
    """Add one attention call (its shape and kind) to ``seen``, counting repeats of a shape."""
    kind = ("temporal" if "temporal_transformer_blocks" in name else "spatial") + \
        ("-cross" if context is not None else "-self")
    sequences, queries = hidden.shape[:2]
    keys = queries if context is None else context.shape[1]
    inner = attn.to_q.out_features
    # Cross-attention keys repeat within a clip: over its frames (spatial: N = B*T sequences) or
    # over its latent positions (temporal: N = B*h*w, each position sees the first frame's states).
    group = (sequences // batch if kind.startswith("temporal") else None) if context is not None else 1
    key = (kind, sequences, attn.heads, queries, keys, inner // attn.heads)
    if key not in seen:
        seen[key] = {"kind": kind, "sequences": sequences, "heads": attn.heads, "queries": queries, "keys": keys,
                     "head_dim": inner // attn.heads, "context_dim": attn.to_k.in_features, "key_group": group,
                     "count": 0, "first_layer": name.rsplit(".", 1)[0]}
    seen[key]["count"] += 1


def fill_groups(shapes: list[dict], frames: int) -> list[dict]:
    """The spatial cross-attention's key group is the clip length (known here, not in the hook)."""
    for shape in shapes:
        if shape["kind"] == "spatial-cross":
            shape["key_group"] = frames
    return shapes


def shape_label(shape: dict) -> str:
    return (f"{shape['kind']} N={shape['sequences']} h={shape['heads']} S={shape['queries']} "
            f"L={shape['keys']} d={shape['head_dim']}")


# ---------------------------------------------------------------- inputs, reference, timing
def make_inputs(shape: dict, device: str, dtype):
    """q (N, h, S, d), k and v (N, h, L, d) as diffusers lays them out, scaled like unit-variance
    projections; cross-attention keys/values repeat over the key group, as in the UNet. Also
    returns the (N/g, L, h*d) key/value bases (the folded layout's inputs)."""
    import torch

    n, h, s, l_, d = (shape[k] for k in ("sequences", "heads", "queries", "keys", "head_dim"))
    g = torch.Generator(device=device).manual_seed(0)

    def heads_view(x):
        return x.view(x.shape[0], x.shape[1], h, d).transpose(1, 2)

    q = torch.randn(n, s, h * d, device=device, dtype=dtype, generator=g)
    group = shape["key_group"]
    k_base = torch.randn(n // group, l_, h * d, device=device, dtype=dtype, generator=g)
    v_base = torch.randn(n // group, l_, h * d, device=device, dtype=dtype, generator=g)
    k = k_base.repeat_interleave(group, dim=0) if group > 1 else k_base
    v = v_base.repeat_interleave(group, dim=0) if group > 1 else v_base
    return heads_view(q), heads_view(k), heads_view(v), heads_view(k_base), heads_view(v_base)


def reference(q, k, v, budget_bytes: int = 2 << 30):
    """SDPA's math backend in float32 (chunked over sequences to bound the score memory)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, h, s, _ = q.shape
    chunk = max(1, budget_bytes // (3 * 4 * h * s * k.shape[2]))
    parts = []
    with sdpa_kernel([SDPBackend.MATH]):
        for first in range(0, n, chunk):
            sl = slice(first, first + chunk)
            parts.append(F.scaled_dot_product_attention(q[sl].float(), k[sl].float(), v[sl].float()))
    return torch.cat(parts)


def rel_l2(value, ref) -> float:
    value = value.float()
    return float((value - ref).norm() / ref.norm())


def time_ms(call, device: str, iters: int) -> tuple[float, object]:
    """(median ms of ``call()`` over ``iters`` runs after two warm-up calls, the first output)."""
    import torch

    out = call()
    call()
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            call()
            times.append(1e3 * (time.perf_counter() - started))
    times.sort()
    return times[len(times) // 2], out


# ---------------------------------------------------------------- the variants
def variant_call(name: str, q, k, v, compile_backend: str):
    """A no-argument closure running variant ``name`` on q, k, v."""
    import torch

    from foresight.pipelines.svd.attention import attend

    if name in EAGER_VARIANTS:
        return functools.partial(attend, EAGER_VARIANTS[name], q, k, v)
    compiled = torch.compile(functools.partial(attend, COMPILED_VARIANTS[name]), dynamic=False,
                             backend=compile_backend, fullgraph=True)
    return functools.partial(compiled, q, k, v)


def folded_call(shape: dict, q, k_base, v_base):
    """Cross-attention with the queries of one key group folded into one sequence (free views)
    against one copy of the keys; returns the output in the (N, h, S, d) layout."""
    import torch.nn.functional as F

    n, h, s, d = q.shape
    group = shape["key_group"]

    def call():
        q_folded = q.transpose(1, 2).reshape(n // group, group * s, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q_folded, k_base, v_base)
        return out.transpose(1, 2).reshape(n, s, h, d).transpose(1, 2)

    return call


def kv_projection_ms(shape: dict, device: str, dtype, iters: int) -> dict:
    """ms of the key and value projections of a cross-attention call as the UNet runs them (on
    N repeated context rows) and on one copy per key group (what folding would compute)."""
    import torch

    n, l_, group = shape["sequences"], shape["keys"], shape["key_group"]
    proj = torch.nn.Linear(shape["context_dim"], shape["heads"] * shape["head_dim"], bias=False,
                           device=device, dtype=dtype)
    context = torch.randn(n, l_, shape["context_dim"], device=device, dtype=dtype)
    with torch.no_grad():
        full, _ = time_ms(lambda: proj(context), device, iters)
        once, _ = time_ms(lambda: proj(context[::group]), device, iters)
    return {"kv_projection_ms": 2 * full, "kv_projection_folded_ms": 2 * once}


def applicable(name: str, shape: dict, short_max_keys: int, device: str) -> bool:
    if name in CUDA_ONLY and not device.startswith("cuda"):
        return False
    return name not in SHORT_ONLY or shape["keys"] <= short_max_keys


def measure_variant(row: dict, name: str, call, ref, device: str, iters: int) -> None:
    """Time ``call`` into ``row['variants'][name]`` (ms, relative L2 vs ``ref``, or the error)."""
    import torch

    try:
        started = time.perf_counter()
        with torch.no_grad():
            ms, out = time_ms(call, device, iters)
        row["variants"][name] = {"ms": ms, "rel_l2": rel_l2(out, ref), "first_s": time.perf_counter() - started}
    except Exception as err:  # noqa: BLE001 - a backend refusing a shape is a result, not a failure
        row["variants"][name] = {"error": f"{type(err).__name__}: {err}"[:300]}
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def measure_shape(row: dict, names: list[str], args, deadline: float) -> None:
    """Measure the variants ``names`` (those not measured yet, while time is left) of one shape."""
    import torch

    from foresight.schemas.svd import SHORT_MAX_KEYS

    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    q, k, v, k_base, v_base = make_inputs(row["shape"], args.device, dtype)
    ref = reference(q, k, v)
    for name in names:
        if name in row["variants"] or not applicable(name, row["shape"], SHORT_MAX_KEYS, args.device):
            continue
        if time.perf_counter() > deadline:
            row["variants"][name] = {"error": "skipped: budget spent"}
            continue
        if name == "folded":
            measure_variant(row, name, folded_call(row["shape"], q, k_base, v_base), ref, args.device, args.iters)
        else:
            measure_variant(row, name, variant_call(name, q, k, v, args.compile_backend), ref, args.device,
                            args.iters)
    if "folded" in names and row["shape"]["key_group"] > 1 and "kv_projection_ms" not in row:
        row.update(kv_projection_ms(row["shape"], args.device, dtype, args.iters))
    del q, k, v, k_base, v_base, ref
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- sums and settings
def ms_of(row: dict, name: str) -> float | None:
    return row["variants"].get(name, {}).get("ms")


def call_sum(rows: list[dict], name: str) -> tuple[float, bool]:
    """(ms of one UNet call's attention with ``name`` on every shape, whether every shape had it:
    a shape without it counts at ``sdpa``'s time)."""
    total, complete = 0.0, True
    for row in rows:
        ms = ms_of(row, name)
        if ms is None:
            complete, ms = False, ms_of(row, "sdpa") or 0.0
        total += row["shape"]["count"] * ms
    return total, complete


SETTING_BACKENDS = {**EAGER_VARIANTS, **COMPILED_VARIANTS}
"""Variant -> the attention backend a setting names (compiled variants: what the backend costs
inside the compiled UNet graph)."""
PLAN_VARIANTS = ("sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", *COMPILED_VARIANTS)
"""Variants a predicted setting may use: SDPA kernels and the compiled forms (the UNet of the
fp16 recipe is compiled, so a Python-level backend counts at its compiled time)."""


def predicted_settings(rows: list[dict]) -> list[dict]:
    """Every ``LONG/SHORT@N`` setting from ``PLAN_VARIANTS`` with its predicted attention ms per
    UNet call (only settings measured on every shape), fastest first."""
    settings = []
    for threshold in PLAN_THRESHOLDS:
        for long in PLAN_VARIANTS:
            for short in PLAN_VARIANTS:
                total, complete = 0.0, True
                for row in rows:
                    ms = ms_of(row, short if row["shape"]["keys"] <= threshold else long)
                    complete = complete and ms is not None
                    total += row["shape"]["count"] * (ms or 0.0)
                if complete:
                    name = f"{SETTING_BACKENDS[long]}/{SETTING_BACKENDS[short]}@{threshold}"
                    settings.append({"setting": name, "ms_per_call": total})
    unique = {s["setting"]: s for s in sorted(settings, key=lambda s: s["ms_per_call"])}
    return sorted(unique.values(), key=lambda s: s["ms_per_call"])


def summarise(rows: list[dict]) -> dict:
    """Per-variant sums over one UNet call, the best per shape (oracle), the best setting."""
    names = sorted({name for row in rows for name in row["variants"]})
    sums = {}
    for name in names:
        total, complete = call_sum(rows, name)
        sums[name] = {"ms_per_call": total, "all_shapes": complete}
    default_ms = sums.get("sdpa", {}).get("ms_per_call")
    oracle = 0.0
    for row in rows:
        timed = [v["ms"] for n, v in row["variants"].items() if "ms" in v and n != "folded"]
        oracle += row["shape"]["count"] * min(timed or [0.0])
    settings = predicted_settings(rows)
    return {"default_ms_per_call": default_ms, "variant_sums": sums, "best_per_shape_ms_per_call": oracle,
            "settings": settings[:10], "best_setting": settings[0] if settings else None,
            "folded_cross_saving_ms_per_call": folded_saving(rows)}


def folded_saving(rows: list[dict]) -> float | None:
    """ms per UNet call folding would save on the cross-attention (attention + K/V projections)."""
    saving, any_ = 0.0, False
    for row in rows:
        if ms_of(row, "folded") is None or ms_of(row, "sdpa") is None:
            continue
        any_ = True
        projections = row.get("kv_projection_ms", 0.0) - row.get("kv_projection_folded_ms", 0.0)
        saving += row["shape"]["count"] * (ms_of(row, "sdpa") - ms_of(row, "folded") + projections)
    return saving if any_ else None


def print_tables(rows: list[dict], summary: dict) -> None:
    names = sorted({name for row in rows for name in row["variants"]}, key=lambda n: (n != "sdpa", n))
    print("| shape | calls | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for row in rows:
        base = ms_of(row, "sdpa")
        cells = []
        for name in names:
            value = row["variants"].get(name, {})
            if "ms" in value:
                ratio = f" ({value['ms'] / base:.2f}x)" if base else ""
                cells.append(f"{value['ms']:.3f}{ratio} e{value['rel_l2']:.1e}")
            else:
                cells.append("-" if not value else "err")
        print(f"| {shape_label(row['shape'])} | {row['shape']['count']} | " + " | ".join(cells) + " |")
    print("# ms per shape (ratio to sdpa) and relative L2 vs fp32 math; sums over one UNet call:")
    for name, value in sorted(summary["variant_sums"].items(), key=lambda kv: kv[1]["ms_per_call"]):
        print(f"#   {name}: {value['ms_per_call']:.2f} ms" + ("" if value["all_shapes"] else " (sdpa where absent)"))
    print(f"# best per shape: {summary['best_per_shape_ms_per_call']:.2f} ms; default sdpa: "
          f"{summary['default_ms_per_call']}; folded cross saving: {summary['folded_cross_saving_ms_per_call']}")
    for setting in summary["settings"][:5]:
        print(f"#   setting {setting['setting']}: {setting['ms_per_call']:.2f} ms per UNet call")
    for row in rows:
        for name, value in row["variants"].items():
            if "error" in value:
                print(f"# {shape_label(row['shape'])} {name}: {value['error']}")


# ---------------------------------------------------------------- driver
def run(args) -> dict:
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 1024)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 8192)
    torch.backends.cuda.matmul.allow_tf32 = True
    size = SIZES[args.size]
    deadline = time.perf_counter() + args.budget_s
    shapes = fill_groups(attention_shapes(size["model"], size["batch"], size["frames"], size["size"]),
                         size["frames"])
    rows = [{"shape": shape, "variants": {}} for shape in shapes]
    eager = [*EAGER_VARIANTS, "folded"]
    for row in rows:  # pass 1: eager variants of every shape (quick), so the default's time is known
        measure_shape(row, [n for n in eager if n != "folded" or row["shape"]["key_group"] > 1], args, deadline)
        print("SHAPE " + json.dumps(row), flush=True)
    # pass 2: the compiled variants, the shapes that cost the default most first
    for row in sorted(rows, key=lambda r: -(r["shape"]["count"] * (ms_of(r, "sdpa") or 0.0))):
        measure_shape(row, list(COMPILED_VARIANTS), args, deadline)
        print("SHAPE " + json.dumps(row), flush=True)
    summary = summarise(rows)
    print_tables(rows, summary)
    return {"rows": rows, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny UNet on the CPU (sanity run, seconds).")
    parser.add_argument("--device", help="Default: cuda, or cpu with --tiny.")
    parser.add_argument("--iters", type=int, help="Timed calls per variant and shape (default 20; 3 with --tiny).")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; aot_eager with --tiny).")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="Wall-clock budget; variants not started by then are reported as skipped.")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "bench_svd_attention.json"))
    args = parser.parse_args()
    args.size = "tiny" if args.tiny else "full"
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.iters = args.iters or (3 if args.tiny else 20)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    started = time.perf_counter()
    result = run(args)
    from headline import write_headline

    summary = result["summary"]
    best = summary["best_setting"] or {}
    figures = {"attention_default_ms_per_call": summary["default_ms_per_call"],
               "attention_best_setting": best.get("setting"),
               "attention_best_setting_ms_per_call": best.get("ms_per_call"),
               "attention_best_per_shape_ms_per_call": summary["best_per_shape_ms_per_call"],
               "attention_folded_cross_saving_ms_per_call": summary["folded_cross_saving_ms_per_call"]}
    path = write_headline("bench_svd_attention", figures, Path(args.json), command=" ".join(sys.argv),
                          unet_size=args.size, **SIZES[args.size], compile_backend=args.compile_backend,
                          wall_s=time.perf_counter() - started, summary=summary, shapes=result["rows"])
    print(json.dumps(figures, indent=1))
    print(f"# written to {path}")


if __name__ == "__main__":
    main()
