"""What the release-extractor one-step conditioning (issue 15's default) costs and changes.

Generation with ``params.onestep`` (the default: the features come from their own UNet head call
with the release extractor's conditioning, fps as is, no noise augmentation) against the old
capture from the generation's first conditional call (``onestep=None``), same clips, same seeds,
same process. Prints the time ratio (extractor / capture) and the relative L2 difference of the
two feature sets (how far features cached with the old defaults are from what the released
decouplers and action expert see).

    # GPU, full-size random weights (VPP's 16 x 256 x 256, 30 steps)
    python bench/bench_onestep_conditioning.py --device cuda --model random --dtype fp16 --batch 8
    # CPU sanity run on the tiny model
    python bench/bench_onestep_conditioning.py --device cpu --model tiny --size 32 --frames 4 --steps 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from foresight.pipelines.svd import SVDParams, clip_seed, generate_clips, load_svd


def timed(model, params: SVDParams, data, repeats: int) -> tuple[float, np.ndarray]:
    """Best wall time of ``repeats`` generations (after one warm-up) and the features."""
    generate_clips(model, params, *data)
    best, out = float("inf"), None
    for _ in range(repeats):
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        start = time.perf_counter()
        out = generate_clips(model, params, *data)
        best = min(best, time.perf_counter() - start)
    return best, out.onestep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="random")
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = load_svd(args.model, args.device, args.dtype if args.device.startswith("cuda") else "fp32")
    rng = np.random.default_rng(0)
    width = model.unet.config.cross_attention_dim // 2
    frames = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    text = rng.normal(size=(args.batch, 20, width)).astype(np.float32)
    seeds = np.array([clip_seed("bench", f"clip{i}") for i in range(args.batch)], dtype=np.int64)
    extractor = SVDParams(num_frames=args.frames, size=args.size, steps=args.steps)
    capture = extractor.model_copy(update={"onestep": None})
    capture_s, capture_feats = timed(model, capture, (frames, text, seeds), args.repeats)
    extractor_s, extractor_feats = timed(model, extractor, (frames, text, seeds), args.repeats)
    diff = extractor_feats.astype(np.float64) - capture_feats.astype(np.float64)
    rel_l2 = float(np.linalg.norm(diff) / np.linalg.norm(capture_feats.astype(np.float64)))
    print(json.dumps({
        "device": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu",
        "model": args.model, "dtype": str(model.dtype), "batch": args.batch, "size": args.size,
        "frames": args.frames, "steps": args.steps,
        "capture_s": round(capture_s, 4), "extractor_s": round(extractor_s, 4),
        "extractor_over_capture": round(extractor_s / capture_s, 4),
        "features_rel_l2_extractor_vs_capture": round(rel_l2, 5),
    }, indent=1))


if __name__ == "__main__":
    main()
