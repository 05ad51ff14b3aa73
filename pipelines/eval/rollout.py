"""The closed-loop rollout: one MetaWorld v3 env per episode, chunks executed open-loop, success flag.

Settings (docs/REFERENCE.md, MetaWorld v3): ``gym.make("Meta-World/MT1", env_name=..., seed=s)`` (goal
observable, the scripted experts read the goal from obs[-3:]), action Box(-1, 1, (4,)) (chunks are
clipped to it), success only in ``info["success"]`` (an episode succeeds at its first successful
step and stops there), at most ``max_path_length`` = 500 steps (stepping past raises). Corner camera
frames are flipped upright exactly as the demonstrations were.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from foresight.pipelines.eval.policy import Observation, Policy
from foresight.pipelines.ingest.metaworld import ACTION_DIM, INSTRUCTIONS, MAX_PATH_LENGTH, upright
from foresight.schemas.eval import EpisodeResult

EVAL_SEED_BASE = 100_000
"""First default eval seed: demonstrations are collected from seed 0 upwards, so evals start far away
(and :func:`check_disjoint_seeds` refuses any overlap with the seeds a run was trained on)."""


def default_step_limit(task: str) -> int:
    """Steps before an episode counts as failed: MetaWorld's own ``max_path_length`` for every task."""
    return MAX_PATH_LENGTH


def step_limits(tasks: list[str], max_steps: int | None) -> dict[str, int]:
    """Per-task step limits, each capped at ``max_steps`` when given."""
    if max_steps is not None and not 1 <= max_steps <= MAX_PATH_LENGTH:
        raise ValueError(f"--max-steps {max_steps}: must be within 1..{MAX_PATH_LENGTH} (MetaWorld's max_path_length)")
    return {task: min(default_step_limit(task), max_steps or MAX_PATH_LENGTH) for task in tasks}


def eval_seeds(episodes: int, first: int = EVAL_SEED_BASE) -> list[int]:
    """``episodes`` consecutive seeds from ``first``."""
    return list(range(first, first + episodes))


def check_disjoint_seeds(seeds: list[int], demo_seeds: dict[str, set[int]], tasks: list[str], where: str) -> None:
    """ValueError when an eval seed of a task is one of that task's demonstration seeds."""
    clashes = {task: sorted(set(seeds) & demo_seeds.get(task, set())) for task in tasks}
    clashes = {task: found for task, found in clashes.items() if found}
    if clashes:
        raise ValueError(f"{where}: eval seeds {clashes} were demonstration seeds of the training data; "
                         "choose other --seeds (evaluation must use unseen goal/object positions)")


def make_env(task: str, seed: int, camera: str, size: int, render: bool):
    """One MetaWorld v3 MT1 env (build and close one rendering env at a time per process)."""
    if render:
        os.environ.setdefault("MUJOCO_GL", "osmesa")
    import gymnasium as gym
    import metaworld  # noqa: F401 - registers the Meta-World envs

    options = dict(render_mode="rgb_array", camera_name=camera, width=size, height=size) if render else {}
    return gym.make("Meta-World/MT1", env_name=f"{task}-v3", seed=seed, **options)


@dataclass
class Rollout:
    """An episode's result and, when asked for, the frames seen at every step."""

    result: EpisodeResult
    frames: list[np.ndarray] = field(default_factory=list)


def check_chunk(chunk: np.ndarray, policy: Policy, task: str, seed: int, step: int) -> np.ndarray:
    """A policy chunk as (K, 4) float32 in the action box; ValueError naming the episode otherwise."""
    chunk = np.asarray(chunk, dtype=np.float32)
    if chunk.ndim == 1:
        chunk = chunk[None]
    where = f"{policy.identity().label()} on {task} seed {seed} step {step}"
    if chunk.ndim != 2 or chunk.shape[0] < 1 or chunk.shape[1] < ACTION_DIM:
        raise ValueError(f"{where}: action chunk of shape {chunk.shape}, expected (K, {ACTION_DIM})")
    if not np.isfinite(chunk).all():
        raise ValueError(f"{where}: action chunk has non-finite values")
    # A policy trained on padded actions (pi0 pads to 32) keeps its first 4 dimensions.
    return np.clip(chunk[:, :ACTION_DIM], -1.0, 1.0)


def run_episode(policy: Policy, task: str, seed: int, step_limit: int, camera: str = "corner2", size: int = 128,
                keep_frames: bool = False, frame_stride: int = 1, execute: int | None = None) -> Rollout:
    """Roll ``policy`` out on ``task`` from ``seed`` until success or ``step_limit`` steps, executing the
    first ``execute`` actions of each chunk (default: all) before re-planning; with ``keep_frames`` the
    frame of every ``frame_stride``-th step is kept (for a video)."""
    started = time.perf_counter()
    env = make_env(task, seed, camera, size, render=policy.needs_frames or keep_frames)
    built = time.perf_counter()
    try:
        rollout = _loop(env, policy, task, seed, step_limit, camera, keep_frames, frame_stride, execute)
    finally:
        env.close()
    rollout.result.wall_s = time.perf_counter() - started
    rollout.result.env_build_s = built - started
    return rollout


def _loop(env, policy: Policy, task: str, seed: int, step_limit: int, camera: str, keep_frames: bool,
          frame_stride: int, execute: int | None) -> Rollout:
    instruction = INSTRUCTIONS[task]
    policy.timer.reset()
    policy.reset(task, instruction, seed)
    obs, _ = env.reset(seed=seed)
    frames: list[np.ndarray] = []
    chunk, cursor, calls, policy_s, success_step = None, 0, 0, 0.0, None
    step = 0
    while step < step_limit:
        replan = chunk is None or cursor >= len(chunk)
        # Rendering costs more than a physics step: only for a video or a policy about to look.
        keep = keep_frames and step % frame_stride == 0
        frame = upright(env.render(), camera) if keep or (replan and policy.needs_frames) else None
        if keep:
            frames.append(frame)
        if replan:
            started = time.perf_counter()
            raw = policy.act(Observation(task, instruction, np.asarray(obs), frame if policy.needs_frames else None,
                                         step))
            policy_s += time.perf_counter() - started
            policy.timer.calls += 1
            chunk, cursor, calls = check_chunk(raw, policy, task, seed, step)[:execute], 0, calls + 1
        obs, _, terminated, truncated, info = env.step(chunk[cursor])
        cursor += 1
        step += 1
        if info.get("success"):
            success_step = step - 1
            break
        if terminated or truncated:
            break
    result = EpisodeResult(task=task, seed=seed, success=success_step is not None, steps=step,
                           success_step=success_step, policy_calls=calls, wall_s=0.0, policy_s=policy_s,
                           latency_ms=policy.timer.mean_ms())
    return Rollout(result, frames)
