"""MetaWorld v3 demonstrations from the scripted expert policies.

Rendering happens here because a simulator is the source; each call builds and closes exactly one
rendering env (several rendering envs in one process can corrupt images).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np

from foresight.schemas.base import canonical_json

log = logging.getLogger(__name__)

EASY = ("button-press", "button-press-topdown", "button-press-topdown-wall", "button-press-wall",
        "coffee-button", "dial-turn", "door-close", "door-lock", "door-open", "door-unlock", "drawer-close",
        "drawer-open", "faucet-close", "faucet-open", "handle-press", "handle-press-side", "handle-pull",
        "handle-pull-side", "lever-pull", "plate-slide", "plate-slide-back", "plate-slide-back-side",
        "plate-slide-side", "reach", "reach-wall", "window-close", "window-open", "peg-unplug-side")
MEDIUM = ("basketball", "bin-picking", "box-close", "coffee-pull", "coffee-push", "hammer", "peg-insert-side",
          "push-wall", "soccer", "sweep", "sweep-into")
HARD = ("assembly", "hand-insert", "pick-out-of-hole", "pick-place", "push", "push-back")
VERY_HARD = ("shelf-place", "disassemble", "stick-pull", "stick-push", "pick-place-wall")
TASK_GROUPS = {"easy": EASY, "medium": MEDIUM, "hard": HARD, "very-hard": VERY_HARD,
               "all": EASY + MEDIUM + HARD + VERY_HARD}
ALL_TASKS = TASK_GROUPS["all"]

FPS = 80.0
"""MetaWorld's control period is 0.0125 s."""
ACTION_DIM, STATE_DIM = 4, 39
MAX_PATH_LENGTH = 500

INSTRUCTIONS = {
    "assembly": "put the ring on the peg", "basketball": "dunk the basketball into the hoop",
    "bin-picking": "move the cube from one bin to the other", "box-close": "close the box with its lid",
    "button-press": "press the button", "button-press-topdown": "press the button from the top",
    "button-press-topdown-wall": "press the button from the top behind the wall",
    "button-press-wall": "press the button behind the wall", "coffee-button": "push the coffee machine button",
    "coffee-pull": "pull the mug from the coffee machine", "coffee-push": "push the mug under the coffee machine",
    "dial-turn": "turn the dial", "disassemble": "pick the ring off the peg", "door-close": "close the door",
    "door-lock": "lock the door by turning the lock", "door-open": "open the door",
    "door-unlock": "unlock the door by turning the lock", "hand-insert": "insert the gripper into the hole",
    "drawer-close": "close the drawer", "drawer-open": "open the drawer", "faucet-open": "turn the faucet on",
    "faucet-close": "turn the faucet off", "hammer": "hammer the nail into the wall",
    "handle-press-side": "press the handle down from the side", "handle-press": "press the handle down",
    "handle-pull-side": "pull the handle up from the side", "handle-pull": "pull the handle up",
    "lever-pull": "pull the lever up", "peg-insert-side": "insert the peg into the hole from the side",
    "pick-place-wall": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole": "pick the peg out of the hole", "reach": "reach the goal position",
    "push-back": "push the puck back to the goal", "push": "push the puck to the goal",
    "pick-place": "pick up the puck and place it at the goal", "plate-slide": "slide the plate into the cabinet",
    "plate-slide-side": "slide the plate into the cabinet from the side",
    "plate-slide-back": "slide the plate out of the cabinet",
    "plate-slide-back-side": "slide the plate out of the cabinet sideways",
    "peg-unplug-side": "unplug the peg from the side", "soccer": "kick the ball into the goal",
    "stick-push": "grab the stick and push the box with it", "stick-pull": "grab the stick and pull the box with it",
    "push-wall": "push the puck to the goal behind the wall", "reach-wall": "reach the goal behind the wall",
    "shelf-place": "pick up the puck and place it on the shelf", "sweep-into": "sweep the puck into the hole",
    "sweep": "sweep the puck off the table", "window-open": "push the window open",
    "window-close": "push the window closed",
}


def resolve_tasks(spec: str) -> list[str]:
    """Task names from a comma list or a difficulty group; ValueError naming unknown tasks."""
    spec = spec.strip()
    if spec in TASK_GROUPS:
        return list(TASK_GROUPS[spec])
    names = [name.strip().removesuffix("-v3") for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALL_TASKS]
    if unknown or not names:
        raise ValueError(f"--tasks: unknown MetaWorld task(s) {unknown or [spec]}; use task names like "
                         f"'reach' or one of {sorted(TASK_GROUPS)}")
    return list(dict.fromkeys(names))


@dataclass
class Demonstration:
    """One rollout of the scripted expert. Row t holds the frame and state seen before action t."""

    task: str
    seed: int
    frames_THWC: np.ndarray
    actions_TA: np.ndarray
    states_TS: np.ndarray
    success: bool

    @property
    def length(self) -> int:
        return len(self.actions_TA)


def demo_checksum(task: str, seed: int, camera: str, size: int) -> str:
    """Identity of a demonstration's source: everything that determines its content."""
    import metaworld  # noqa: F401 - the simulator version is part of the identity

    from importlib.metadata import version

    payload = {"task": task, "seed": seed, "camera": camera, "size": size,
               "metaworld": version("metaworld"), "mujoco": version("mujoco")}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def collect_demonstration(task: str, seed: int, camera: str = "corner2", size: int = 128,
                          settle_steps: int = 5) -> Demonstration:
    """Roll out the expert policy for ``task`` from ``seed``; stop a few steps after success."""
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    import gymnasium as gym
    import metaworld  # noqa: F401 - registers the Meta-World envs
    from metaworld.policies import ENV_POLICY_MAP

    env = gym.make("Meta-World/MT1", env_name=f"{task}-v3", seed=seed, render_mode="rgb_array",
                   camera_name=camera, width=size, height=size)
    try:
        return _rollout(env, ENV_POLICY_MAP[f"{task}-v3"](), task, seed, camera, settle_steps)
    finally:
        env.close()


def _rollout(env, policy, task: str, seed: int, camera: str, settle_steps: int) -> Demonstration:
    obs, _ = env.reset(seed=seed)
    frames, actions, states = [], [], []
    success_at = None
    for step in range(MAX_PATH_LENGTH):
        frames.append(upright(env.render(), camera))
        action = np.clip(policy.get_action(obs), -1.0, 1.0).astype(np.float32)
        states.append(np.asarray(obs, dtype=np.float32))
        actions.append(action)
        obs, _, terminated, truncated, info = env.step(action)
        if success_at is None and info.get("success"):
            success_at = step
        if (success_at is not None and step >= success_at + settle_steps) or terminated or truncated:
            break
    return Demonstration(task, seed, np.stack(frames), np.stack(actions), np.stack(states), success_at is not None)


def upright(image_HWC: np.ndarray, camera: str) -> np.ndarray:
    """The corner cameras render upside down: flip both axes (as LeRobot does for corner2)."""
    if camera.startswith("corner"):
        image_HWC = np.flip(image_HWC, (0, 1))
    return np.ascontiguousarray(image_HWC, dtype=np.uint8)
