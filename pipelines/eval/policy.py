"""The policy interface every evaluated model sits behind, its component timer, and two reference policies.

A policy sees one observation (the state vector and, when it asks for them, the upright camera frame)
and returns an action *chunk* (K, action_dim); the rollout loop executes the chunk open-loop for its
length and then asks again. ``reset`` starts an episode: a policy draws all its randomness from the
episode seed it is given there, so a rollout is a function of its seed.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from foresight.schemas.eval import PolicyIdentity


@dataclass
class Observation:
    """What the policy sees before a chunk."""

    task: str
    instruction: str
    state: np.ndarray  # (39,) float64: MetaWorld's goal-observable observation
    frame: np.ndarray | None  # (H, W, 3) uint8, upright; None unless the policy needs frames
    step: int


@dataclass
class ComponentTimer:
    """Wall time per named component, summed over policy calls (``sync`` waits for the device first)."""

    sync: Callable[[], None] = lambda: None
    totals_s: dict[str, float] = field(default_factory=dict)
    calls: int = 0

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.totals_s[name] = self.totals_s.get(name, 0.0) + time.perf_counter() - start

    def mean_ms(self) -> dict[str, float]:
        """Mean milliseconds per call of each component."""
        return {name: 1000.0 * total / self.calls for name, total in self.totals_s.items()} if self.calls else {}

    def reset(self) -> None:
        self.totals_s, self.calls = {}, 0


class Policy(abc.ABC):
    """A closed-loop policy: ``reset`` per episode, then ``act`` per chunk."""

    needs_frames: bool = False
    """True when ``act`` reads ``Observation.frame`` (the env renders only for such policies or videos)."""

    def __init__(self) -> None:
        self.timer = ComponentTimer()

    @abc.abstractmethod
    def identity(self) -> PolicyIdentity:
        """What this policy is (keys the eval id)."""

    @abc.abstractmethod
    def reset(self, task: str, instruction: str, seed: int) -> None:
        """Start an episode of ``task`` whose randomness derives from ``seed``."""

    @abc.abstractmethod
    def act(self, obs: Observation) -> np.ndarray:
        """An action chunk (K, action_dim) float32 for ``obs``; K >= 1."""


class OraclePolicy(Policy):
    """MetaWorld's scripted expert behind the policy interface (chunks of one action: it is closed-loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.expert = None

    def identity(self) -> PolicyIdentity:
        return PolicyIdentity(kind="oracle", settings={"source": "metaworld.policies.ENV_POLICY_MAP"})

    def reset(self, task: str, instruction: str, seed: int) -> None:
        from metaworld.policies import ENV_POLICY_MAP

        self.expert = ENV_POLICY_MAP[f"{task}-v3"]()

    def act(self, obs: Observation) -> np.ndarray:
        with self.timer("expert"):
            action = np.asarray(self.expert.get_action(obs.state), dtype=np.float32)
        return action[None]


class RandomPolicy(Policy):
    """Uniform actions in [-1, 1]^A, in chunks of ``chunk``, seeded by the episode seed."""

    def __init__(self, chunk: int = 10, action_dim: int = 4) -> None:
        super().__init__()
        self.chunk, self.action_dim = chunk, action_dim
        self.rng = np.random.default_rng(0)

    def identity(self) -> PolicyIdentity:
        return PolicyIdentity(kind="random", settings={"chunk": self.chunk, "action_dim": self.action_dim})

    def reset(self, task: str, instruction: str, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 1])

    def act(self, obs: Observation) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, (self.chunk, self.action_dim)).astype(np.float32)


def call_seed(episode_seed: int, call: int) -> int:
    """Seed of the ``call``-th policy call of an episode (sampler noise, SVD noise): deterministic per
    episode, different per call."""
    return int(np.random.SeedSequence([episode_seed, call]).generate_state(1, np.uint32)[0])
