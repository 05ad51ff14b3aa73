"""Closed-loop evaluation benchmarks.

``--mode rollout`` (CPU, this machine): MetaWorld steps/s of rollouts with the tiny S-VAM stack
(random `tiny` text/SVD/DINOv2/DA3 models, tiny decouplers and action expert: the demo's
architecture, untrained) against the bare env step in the same run, and the render-only cost the
policy forces (a frame per re-plan). Prints the policy overhead ratio = bare steps/s / policy steps/s.

``--mode latency`` (GPU, device tool): per-call latency of the S-VAM stack at real size with
`random` weights (SVD 1.5B at 256 px / 16 frames, DINOv2 ViT-B/14-reg, DA3-LARGE, two full
decouplers, Uni-Perceiver + action expert), broken down like the paper's table (backbone /
decouplers / action expert, plus the teachers' reference maps of the observed frame), against the
paper's 307.6 ms on an RTX 3090; and the π0 teacher vs its 6-layer Shallow-π student through the
same chunk-sampler policy the eval runs. No simulator is imported in this mode (a synthetic frame).

    python bench/bench_eval.py --mode rollout --steps 200
    python bench/bench_eval.py --mode latency --size real --device cuda --iters 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PAPER_MS = {"total": 307.6, "backbone": 231.0, "decouplers": 40.1, "action_expert": 36.5}
"""S-VAM's real-robot forward on an RTX 3090 (docs/REFERENCE.md, S-VAM / VPP model settings)."""


def build_svam_policy(size: str, device: str, svd_dtype: str):
    """The S-VAM stack at ``size`` ('tiny' | 'real') with random weights, behind the eval's policy class."""
    from foresight.pipelines.eval.svam import SVAMPolicy, StackSpec, TeacherSpec, load_stack
    from foresight.pipelines.svd import SVDParams
    from foresight.pipelines.svd.features import feature_shape
    from foresight.pipelines.svd.loading import describe_svd
    from foresight.pipelines.teachers import load_teacher
    from foresight.pipelines.text import MAX_LENGTH, load_text_model
    from foresight.schemas.eval import PolicyIdentity
    from foresight.trainers.action_expert import (ActionExpertRunConfig, ActionExpertTask, FrozenDecouplers,
                                        build_architecture, build_objective)
    from foresight.trainers.models.decoupler import Decoupler, DecouplerConfig
    from foresight.trainers.models.policy import ActionExpert

    spec_name = "tiny" if size == "tiny" else "random"
    model_size = "tiny" if size == "tiny" else "full"
    params = SVDParams(num_frames=8, size=64, steps=4) if size == "tiny" else SVDParams()
    text = load_text_model(spec_name, "cpu")
    teachers = {name: TeacherSpec(name, load_teacher(name, spec_name).identity, {}, "fp32" if size == "tiny" else "bf16")
                for name in ("dinov2", "da3")}
    stack = StackSpec(text=text.identity, text_max_length=MAX_LENGTH, svd=describe_svd(spec_name, 0).identity,
                      svd_params=params, svd_dtype=svd_dtype, teachers=teachers)
    models, _ = load_stack(stack, device)
    desc = describe_svd(spec_name, 0)
    h, w, c_in = feature_shape(desc.unet_config, desc.vae_config, params.size, params.feature_blocks)
    decouplers = [Decoupler(DecouplerConfig.preset(model_size, in_channels=c_in, teacher_channels=t.channels,
                                                   frames=params.num_frames, height=h, width=w))
                  for t in models.teachers.values()]
    frozen = FrozenDecouplers(decouplers, list(models.teachers))
    cfg = ActionExpertRunConfig(size=model_size)
    perceiver, policy = build_architecture(cfg, params.num_frames, c_in + frozen.channels, text.width, 10, 4)
    expert = ActionExpertTask(ActionExpert(perceiver, policy, build_objective(cfg)).eval(), frozen)
    identity = PolicyIdentity(kind="action-expert", run_id=f"bench-{size}", step=0)
    return SVAMPolicy(stack, models, expert, identity, device)


def observation(size: int, seed: int = 0):
    from foresight.pipelines.eval.policy import Observation

    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Observation("reach", "reach the goal position", rng.normal(size=39), frame, 0)


def time_calls(policy, obs, iters: int, warmup: int) -> dict[str, float]:
    """Median ms per component and per whole call over ``iters`` calls after ``warmup`` calls."""
    policy.reset(obs.task, obs.instruction, 0)
    for _ in range(warmup):
        policy.act(obs)
    per_component: dict[str, list[float]] = {}
    totals = []
    for _ in range(iters):
        policy.timer.reset()
        policy.timer.calls = 1
        start = time.perf_counter()
        policy.act(obs)
        policy.timer.sync()
        totals.append(1000 * (time.perf_counter() - start))
        for name, ms in policy.timer.mean_ms().items():
            per_component.setdefault(name, []).append(ms)
    out = {name: statistics.median(values) for name, values in per_component.items()}
    out["total"] = statistics.median(totals)
    return out


def latency_mode(args) -> dict:
    """S-VAM per-call breakdown and π0 teacher vs Shallow-π student, same process, same device."""
    results: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                     "size": args.size, "svd_dtype": args.svd_dtype, "iters": args.iters}
    policy = build_svam_policy(args.size, args.device, args.svd_dtype)
    frame_side = 64 if args.size == "tiny" else 256
    results["svam_ms"] = time_calls(policy, observation(frame_side), args.iters, args.warmup)
    del policy
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    results["pi0_ms"] = pi0_latency(args)
    return results


def pi0_latency(args) -> dict:
    from foresight.pipelines import pi0
    from foresight.pipelines.eval.chunk_sampler import ChunkSamplerPolicy
    from foresight.schemas.eval import PolicyIdentity
    from foresight.trainers.shallow_pi import build_student

    spec = "tiny" if args.size == "tiny" else "random"
    dtype = "float32" if args.size == "tiny" else "bfloat16"
    teacher = pi0.load_pi0(spec, args.device, dtype, tiny_layers=4).model
    student, _ = build_student(teacher, 2 if args.size == "tiny" else 6)
    image = pi0.image_size(pi0.unwrap(teacher).config)
    params = pi0.Pi0TargetParams(cameras=["corner2"], tokenizer="bytes", image_size=image, dtype=dtype,
                                 state_indices=list(range(18)) + [36, 37, 38])
    out = {}
    for name, model in (("teacher", teacher), ("student", student)):
        policy = ChunkSamplerPolicy(model, params, None, PolicyIdentity(kind="pi0"), args.device)
        out[name] = time_calls(policy, observation(128), args.iters, args.warmup)
    out["speedup"] = out["teacher"]["total"] / out["student"]["total"]
    return out


def rollout_mode(args) -> dict:
    """Steps/s: bare env, env + a frame per re-plan (what the policy forces), tiny S-VAM rollouts."""
    from foresight.pipelines.eval.policy import OraclePolicy
    from foresight.pipelines.eval.rollout import EVAL_SEED_BASE, make_env, run_episode

    chunk, side = 10, args.frame
    env = make_env("reach", EVAL_SEED_BASE, "corner2", side, render=True)
    try:
        env.reset(seed=EVAL_SEED_BASE)
        zero = np.zeros(4, np.float32)
        start = time.perf_counter()
        for _ in range(args.steps):
            env.step(zero)
        bare = args.steps / (time.perf_counter() - start)
        start = time.perf_counter()
        for step in range(args.steps):
            if step % chunk == 0:
                env.render()
            env.step(zero)
        rendered = args.steps / (time.perf_counter() - start)
    finally:
        env.close()
    policy = build_svam_policy("tiny", "cpu", "fp32")
    rollout = run_episode(policy, "reach", EVAL_SEED_BASE, args.steps, "corner2", side)
    svam = steps_per_s(rollout.result)
    oracle = run_episode(OraclePolicy(), "reach", EVAL_SEED_BASE + 1, args.steps, "corner2", side).result
    return {"steps": args.steps, "frame": side, "bare_env_steps_per_s": bare,
            "env_render_per_replan_steps_per_s": rendered, "tiny_svam_steps_per_s": svam,
            "tiny_svam_latency_ms": rollout.result.latency_ms, "oracle_steps_per_s": steps_per_s(oracle),
            "oracle_steps": oracle.steps, "env_build_s": rollout.result.env_build_s,
            "policy_overhead_ratio": bare / svam, "render_overhead_ratio": bare / rendered,
            "oracle_overhead_ratio": bare / steps_per_s(oracle)}


def steps_per_s(result) -> float:
    """Rollout steps per second of an episode, its env's construction excluded."""
    return result.steps / (result.wall_s - result.env_build_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=["rollout", "latency"], default="rollout")
    parser.add_argument("--size", choices=["tiny", "real"], default="tiny", help="latency mode: model sizes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--svd-dtype", default=None, help="SVD dtype (default: fp32 on CPU, fp16 on CUDA)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="rollout mode: env steps")
    parser.add_argument("--frame", type=int, default=64, help="rollout mode: rendered frame side")
    args = parser.parse_args()
    args.svd_dtype = args.svd_dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    torch.set_grad_enabled(False)
    result = rollout_mode(args) if args.mode == "rollout" else latency_mode(args)
    print(json.dumps(result, indent=2))
    if args.mode == "latency" and args.size == "real":
        svam = result["svam_ms"]
        print(f"S-VAM per call: {svam['total']:.1f} ms (paper {PAPER_MS['total']} ms on an RTX 3090: "
              f"{svam['total'] / PAPER_MS['total']:.2f}x of it); " +
              ", ".join(f"{k} {svam[k]:.1f} ms (paper {PAPER_MS[k]})" for k in ("backbone", "decouplers", "action_expert"))
              + f", references {svam['references']:.1f} ms")
        print(f"pi0 teacher {result['pi0_ms']['teacher']['total']:.1f} ms vs Shallow-pi student "
              f"{result['pi0_ms']['student']['total']:.1f} ms: {result['pi0_ms']['speedup']:.2f}x")
    elif args.mode == "rollout":
        print(f"policy overhead: bare env {result['bare_env_steps_per_s']:.0f} steps/s vs tiny S-VAM rollout "
              f"{result['tiny_svam_steps_per_s']:.1f} steps/s = {result['policy_overhead_ratio']:.1f}x slower "
              f"(rendering a frame per re-plan alone: {result['render_overhead_ratio']:.1f}x)")


if __name__ == "__main__":
    main()
