"""Success statistics: per-task rates with Wilson score 95% confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Iterable

from foresight.pipelines.ingest.metaworld import TASK_GROUPS
from foresight.schemas.eval import EpisodeResult, TaskSummary

Z_95 = 1.959963984540054
"""Two-sided 95% normal quantile."""


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate; (0, 1) for no trials.

    Chosen over the normal approximation because evals have few episodes and rates near 0 or 1,
    where the normal interval collapses to a point or leaves [0, 1]."""
    if trials <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= trials:
        raise ValueError(f"wilson interval: {successes} successes out of {trials} trials")
    rate = successes / trials
    z2 = z * z
    centre = (rate + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(rate * (1 - rate) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def difficulty_of(task: str) -> str:
    """The MetaWorld difficulty group of a task ('easy', 'medium', 'hard', 'very-hard')."""
    for group in ("easy", "medium", "hard", "very-hard"):
        if task in TASK_GROUPS[group]:
            return group
    return "unknown"


def summarize(task: str, results: Iterable[EpisodeResult], difficulty: str | None = None) -> TaskSummary:
    """Rate, Wilson 95% CI and mean episode length over ``results``."""
    results = list(results)
    successes = sum(r.success for r in results)
    low, high = wilson_interval(successes, len(results))
    mean_steps = sum(r.steps for r in results) / len(results) if results else 0.0
    return TaskSummary(task=task, difficulty=difficulty or difficulty_of(task), episodes=len(results),
                       successes=successes, rate=successes / len(results) if results else 0.0,
                       ci_low=low, ci_high=high, mean_steps=mean_steps)


def summarize_tasks(results: list[EpisodeResult], tasks: list[str]) -> tuple[list[TaskSummary], TaskSummary]:
    """Per-task summaries in ``tasks`` order, and the summary over every episode."""
    per_task = [summarize(task, [r for r in results if r.task == task]) for task in tasks]
    return per_task, summarize("all", results, difficulty="all")


def summarize_groups(results: list[EpisodeResult], tasks: list[str]) -> list[TaskSummary]:
    """Pooled summaries per MetaWorld difficulty group present among ``tasks`` (the paper's Easy /
    Middle / Hard columns; with the same episodes per task, pooled rate = mean of the task rates)."""
    groups = []
    for group in ("easy", "medium", "hard", "very-hard"):
        members = {task for task in tasks if difficulty_of(task) == group}
        if members:
            groups.append(summarize(group, [r for r in results if r.task in members], difficulty=group))
    return groups


def mean_latency(results: list[EpisodeResult]) -> dict[str, float]:
    """Mean milliseconds per policy call by component, weighted by each episode's call count."""
    totals: dict[str, float] = {}
    calls = sum(r.policy_calls for r in results if r.latency_ms)
    for result in results:
        for name, ms in result.latency_ms.items():
            totals[name] = totals.get(name, 0.0) + ms * result.policy_calls
    return {name: total / calls for name, total in totals.items()} if calls else {}
