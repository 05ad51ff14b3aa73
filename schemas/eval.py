"""Closed-loop evaluation records: what an eval ran (policy, versions, seeds) and what each episode did.

An eval is content addressed like a target version: ``eval-<12 hex>`` is the sha256 of the canonical
JSON of :class:`EvalKey` (the policy's identity and every setting that changes a rollout), so the same
eval rerun resumes into the same ``evals/<id>/`` folder and runs only the episodes it lacks.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import Field

from foresight.schemas.base import FORMAT_VERSION, StrictModel, canonical_json

EVAL_STAGE_VERSION = 1
"""Bumped by hand when the rollout loop changes what an episode does (enters the eval id)."""

PolicyKind = Literal["action-expert", "shallow-pi", "pi0", "oracle", "random"]


class PolicyIdentity(StrictModel):
    """Which policy an eval rolled out: a trained run at one checkpoint, or a built-in reference policy."""

    kind: PolicyKind = Field(description="action-expert / shallow-pi / pi0 (trained runs) or oracle / random.")
    run_id: str | None = Field(default=None, description="Trainer run (None for built-in policies).")
    step: int | None = Field(default=None, description="Checkpoint step of the run.")
    checkpoint_sha256: dict[str, str] = Field(default_factory=dict, description="Checkpoint file -> sha256.")
    versions: dict[str, str] = Field(default_factory=dict,
                                     description="Field/role -> target version id the policy's models come from.")
    models: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                              description="Role -> ModelIdentity key of every model loaded.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Output-changing policy settings.")

    def label(self) -> str:
        """Short human name: 'action-expert demo-run@20' or 'oracle'."""
        return f"{self.kind} {self.run_id}@{self.step}" if self.run_id else self.kind


class EvalKey(StrictModel):
    """Everything that determines the eval's episodes; hashed into the eval id."""

    stage_version: int = EVAL_STAGE_VERSION
    env: str = Field(description="Environment suite, e.g. 'metaworld'.")
    policy: PolicyIdentity
    tasks: list[str]
    seeds: list[int] = Field(description="Episode seeds (the same seeds for every task).")
    camera: str
    size: int
    step_limits: dict[str, int] = Field(description="Task -> environment steps before an episode counts as failed.")
    device: str = Field(description="Torch device: numbers differ across devices, so it keys the eval.")
    simulator: dict[str, str] = Field(default_factory=dict, description="metaworld / mujoco package versions.")

    def eval_id(self) -> str:
        digest = hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()
        return f"eval-{digest[:12]}"


class EpisodeResult(StrictModel):
    """One rollout: written as its own file the moment it finishes, so a killed eval resumes."""

    task: str
    seed: int
    success: bool = Field(description="The environment's info['success'] was true at some step.")
    steps: int = Field(description="Environment steps taken (stops at the first success or the step limit).")
    success_step: int | None = Field(default=None, description="Step index of the first success.")
    policy_calls: int = Field(description="Chunks requested from the policy.")
    wall_s: float = Field(description="Wall time of the episode (env, rendering and policy).")
    env_build_s: float = Field(default=0.0, description="Part of wall_s spent building the env.")
    policy_s: float = Field(default=0.0, description="Wall time inside the policy.")
    latency_ms: dict[str, float] = Field(default_factory=dict,
                                         description="Mean milliseconds per policy call, by component.")
    video: str | None = Field(default=None, description="MP4 path relative to the eval folder, when recorded.")


class TaskSummary(StrictModel):
    """Per-task success rate with its Wilson 95% confidence interval."""

    task: str
    difficulty: str
    episodes: int
    successes: int
    rate: float
    ci_low: float
    ci_high: float
    mean_steps: float


class EvalRecord(StrictModel):
    """``evals/<id>/eval.json``: the key in the clear, then (once complete) the summary."""

    format_version: int = FORMAT_VERSION
    eval_id: str
    status: Literal["running", "complete"]
    key: EvalKey
    version_changes: list[dict[str, Any]] = Field(default_factory=list,
                                                  description="Accepted differences from the run's versions.")
    created: str = ""
    finished: str = ""
    summary: list[TaskSummary] = Field(default_factory=list, description="Per task.")
    groups: list[TaskSummary] = Field(default_factory=list, description="Per difficulty group present.")
    overall: TaskSummary | None = None
    latency_ms: dict[str, float] = Field(default_factory=dict, description="Mean per policy call, all episodes.")
    git_commit: str | None = None
    host: str | None = None
    packages: dict[str, str] = Field(default_factory=dict)

    @property
    def versions(self) -> list[str]:
        """Every target version id the evaluated policy was built from."""
        return sorted(set(self.key.policy.versions.values()))
