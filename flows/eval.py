"""Prefect flow: closed-loop MetaWorld evaluation of a trained policy (or a reference policy).

The flow resolves the policy's identity from the store (the run's checkpoint and the target
versions it was trained on, each model as those versions' manifests recorded it), keys the eval,
writes ``evals/<id>/eval.json`` and spreads the missing (task, seed) episodes over tasks: local
worker processes (each renders one env at a time) or a Dask cluster. Each task builds the policy
once per process, rolls its episodes out and publishes each result file as it finishes, so an
interrupted eval resumes with only the missing episodes. The flow then summarises (per-task rate
with a Wilson 95% CI), draws the success bar chart and the rollout sheet and writes the report.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

from prefect import flow, task
from pydantic import Field, field_validator

from foresight.flows.models_cache import cached_model
from foresight.pipelines.eval import rollout as ro
from foresight.pipelines.eval.policy import OraclePolicy, Policy, RandomPolicy
from foresight.pipelines.eval.stats import mean_latency, summarize_groups, summarize_tasks
from foresight.pipelines.ingest import metaworld as mw
from foresight.schemas.base import StrictModel
from foresight.schemas.eval import EpisodeResult, EvalKey, EvalRecord, PolicyIdentity
from foresight.schemas import refs
from foresight.storage import layout, lineage
from foresight.storage.evals import EvalStore
from foresight.storage.fs import Root, open_root

log = logging.getLogger(__name__)

VIDEO_STRIDE = 2
"""MetaWorld steps at 80 Hz: videos keep every second step (rendering dominates a rollout's cost) and
play at 40 fps, in real time."""
BUILTIN_POLICIES = ("oracle", "random")
REPORT_NAME = "report.html"


class EvalConfig(StrictModel):
    """``foresight eval metaworld`` parameters (the flow's parameter model)."""

    policy: str = Field(description="A trainer run 'RUN' or 'RUN/step-N', or a reference policy: oracle | random.")
    tasks: list[str] = Field(description="MetaWorld task names (without -v3).")
    episodes: int = Field(default=25, ge=1, description="Episodes per task (ignored when seeds are given).")
    seeds: list[int] | None = Field(default=None, description="Episode seeds (default: episodes seeds from "
                                                              f"{ro.EVAL_SEED_BASE}, disjoint from demo seeds).")
    camera: str | None = Field(default=None, description="Camera (default: the training dataset's, else corner2).")
    size: int | None = Field(default=None, ge=16, description="Frame side (default: the training dataset's, else 128).")
    device: str = Field(default="cpu", description="Torch device of the policy.")
    max_steps: int | None = Field(default=None, ge=1, description="Cap of the per-task step limit (default 500).")
    video: int = Field(default=0, ge=0, description="Episodes per task (the first seeds) recorded as MP4.")
    versions: dict[str, str] = Field(default_factory=dict,
                                     description="Field -> target version to use instead of the run's.")
    allow_version_change: bool = Field(default=False, description="Accept (and record) version/weight changes.")
    random_chunk: int = Field(default=10, ge=1, description="Chunk length of the random policy.")
    execute: int | None = Field(default=None, ge=1, description="Actions of each chunk executed before re-planning "
                                                                "(default: the whole chunk).")
    pi0_teacher: bool = Field(default=False, description="Of a shallow-pi run, evaluate the π0 teacher it was "
                                                         "distilled from instead of the student.")
    workers: int = Field(default=1, ge=1, description="Episode tasks kept in flight.")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        return mw.resolve_tasks(",".join(value))

    def episode_seeds(self) -> list[int]:
        return list(dict.fromkeys(self.seeds)) if self.seeds else ro.eval_seeds(self.episodes)


def parse_policy(text: str) -> tuple[str, int | None]:
    """'RUN' -> (RUN, None); 'RUN/step-N' -> (RUN, N); ValueError naming the text otherwise."""
    run_id, sep, step = text.partition("/")
    if not sep:
        return run_id, None
    number = layout.step_of(step)
    if number is None:
        raise ValueError(f"--run {text!r}: expected RUN or RUN/step-N")
    return run_id, number


# ---------------------------------------------------------------- resolving the policy
@dataclass
class ResolvedPolicy:
    """Everything known about the policy before any model is loaded."""

    identity: PolicyIdentity
    camera: str
    size: int
    demo_seeds: dict[str, set[int]] = field(default_factory=dict)
    version_changes: list[dict[str, Any]] = field(default_factory=list)
    stack: Any = None  # pipelines.eval.svam.StackSpec for an action expert


def resolve_policy(root: Root, config: EvalConfig) -> ResolvedPolicy:
    """The policy's identity, its observation settings and the demo seeds of its training data."""
    if config.policy in BUILTIN_POLICIES:
        policy = builtin_policy(config)
        if config.pi0_teacher:
            raise ValueError("--pi0-teacher needs --run of a shallow-pi run")
        identity = policy.identity()
        if config.execute is not None:
            identity.settings["execute"] = config.execute
        return ResolvedPolicy(identity, config.camera or "corner2", config.size or 128)
    from foresight.flows.eval_runs import resolve_run

    return resolve_run(root, config)


def builtin_policy(config: EvalConfig) -> Policy:
    return OraclePolicy() if config.policy == "oracle" else RandomPolicy(config.random_chunk, mw.ACTION_DIM)


def eval_key(config: EvalConfig, resolved: ResolvedPolicy) -> EvalKey:
    """The eval's key; refuses eval seeds that were demonstration seeds of the policy's training data."""
    seeds = config.episode_seeds()
    ro.check_disjoint_seeds(seeds, resolved.demo_seeds, config.tasks, f"eval of {resolved.identity.label()}")
    return EvalKey(env="metaworld", policy=resolved.identity, tasks=config.tasks, seeds=seeds,
                   camera=resolved.camera, size=resolved.size, step_limits=ro.step_limits(config.tasks, config.max_steps),
                   device=config.device, simulator={"metaworld": version("metaworld"), "mujoco": version("mujoco")})


def load_policy(root_url: str, config: EvalConfig) -> tuple[Policy, list[dict[str, Any]]]:
    """The policy of ``config``, loaded once per process; also the weight changes it was loaded with."""
    if config.policy in BUILTIN_POLICIES:
        return builtin_policy(config), []
    from foresight.flows.eval_runs import build_run_policy

    extra = {"root": root_url, "versions": config.versions, "allow": config.allow_version_change,
             "pi0_teacher": config.pi0_teacher}
    return cached_model("eval-policy", config.policy, config.device, "policy",
                        lambda: build_run_policy(open_root(root_url), config), extra=extra)


# ---------------------------------------------------------------- the episode task
class EpisodesResult(StrictModel):
    """What one episode task did."""

    ran: list[EpisodeResult] = Field(default_factory=list)
    version_changes: list[dict[str, Any]] = Field(default_factory=list)


def run_episodes(root_url: str, config: EvalConfig, eval_id: str, pairs: list[tuple[str, int]],
                 video_seeds: dict[str, list[int]]) -> EpisodesResult:
    """Roll out the given (task, seed) episodes not yet finished; publish each result and video.
    The body of :func:`eval_episodes_task`, callable without Prefect."""
    from foresight.pipelines.viz import mp4_bytes

    store = EvalStore(root_url)
    key = store.record(eval_id).key
    policy, changes = load_policy(root_url, config)
    out = EpisodesResult(version_changes=changes)
    for task_name, seed in pairs:
        if store.has_episode(eval_id, task_name, seed):  # finished by another worker meanwhile
            continue
        keep = seed in video_seeds.get(task_name, [])
        rollout = ro.run_episode(policy, task_name, seed, key.step_limits[task_name], key.camera, key.size,
                                 keep_frames=keep, frame_stride=VIDEO_STRIDE, execute=config.execute)
        result = rollout.result
        if keep:
            result.video = store.video_rel(task_name, seed)
            store.write_file(eval_id, result.video, mp4_bytes(rollout.frames, mw.FPS / VIDEO_STRIDE))
        store.write_episode(eval_id, result)
        log.info("eval %s: %s seed %d %s in %d steps", eval_id, task_name, seed,
                 "succeeded" if result.success else "failed", result.steps)
        out.ran.append(result)
    return out


@task(retries=0)
def eval_episodes_task(root_url: str, config: EvalConfig, eval_id: str, pairs: list[tuple[str, int]],
                       video_seeds: dict[str, list[int]]) -> EpisodesResult:
    """Prefect task over :func:`run_episodes` (ids and URLs in, a small record out)."""
    return run_episodes(root_url, config, eval_id, pairs, video_seeds)


def split_pairs(pairs: list[tuple[str, int]], parts: int) -> list[list[tuple[str, int]]]:
    """Round-robin groups, so every task gets a share of every environment task (similar durations)."""
    parts = max(1, min(parts, len(pairs)))
    return [pairs[i::parts] for i in range(parts)] if pairs else []


# ---------------------------------------------------------------- the flow
class EvalOutcome(StrictModel):
    """What ``eval_metaworld_flow`` returns."""

    record: EvalRecord
    ran: int = Field(description="Episodes rolled out by this run.")
    skipped: int = Field(description="Episodes already finished before this run.")
    report: str | None = Field(default=None, description="URL of the HTML report.")


@flow(name="eval-metaworld", log_prints=False)
def eval_metaworld_flow(root_url: str, config: EvalConfig) -> EvalOutcome:
    """Evaluate ``config.policy`` on MetaWorld; resumes an interrupted eval of the same key."""
    root = open_root(root_url)
    resolved = resolve_policy(root, config)
    key = eval_key(config, resolved)
    store = EvalStore(root)
    record = store.begin(key, resolved.version_changes)
    missing = store.missing(key)
    skipped = len(key.tasks) * len(key.seeds) - len(missing)
    if record.status == "complete" and not missing:  # a complete eval is never rewritten
        return EvalOutcome(record=record, ran=0, skipped=skipped, report=store.url(record.eval_id, REPORT_NAME))
    video_seeds = {t: key.seeds[:config.video] for t in key.tasks}
    futures = [eval_episodes_task.submit(root_url, config, record.eval_id, group, video_seeds)
               for group in split_pairs(missing, config.workers)]
    results = [future.result() for future in futures]
    changes = _new_changes(record.version_changes, [c for r in results for c in r.version_changes])
    record = record.model_copy(update={"version_changes": record.version_changes + changes})
    record, report = finalize(store, record)
    lineage.emit(root_url, "eval.metaworld", str(uuid.uuid4()), inputs=[*map(refs.version, record.versions)] +
                 ([refs.run(key.policy.run_id)] if key.policy.run_id else []),
                 outputs=[refs.evaluation(record.eval_id)], facets={"config": config.model_dump(mode="json")})
    return EvalOutcome(record=record, ran=sum(len(r.ran) for r in results), skipped=skipped, report=report)


def _new_changes(known: list[dict[str, Any]], found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    new: list[dict[str, Any]] = []
    for change in found:
        if change not in known and change not in new:
            new.append(change)
    return new


def finalize(store: EvalStore, record: EvalRecord) -> tuple[EvalRecord, str | None]:
    """Summarise the finished episodes, publish the complete record and write the pictures and report."""
    from foresight.flows.eval_report import write_report

    episodes = [r for r in store.episodes(record.eval_id)
                if r.task in record.key.tasks and r.seed in record.key.seeds]
    expected = len(record.key.tasks) * len(record.key.seeds)
    if len(episodes) != expected:
        raise ValueError(f"eval {record.eval_id}: {len(episodes)} of {expected} episodes finished; "
                         "rerun the same command to run the missing ones")
    per_task, overall = summarize_tasks(episodes, record.key.tasks)
    record = record.model_copy(update={"summary": per_task, "groups": summarize_groups(episodes, record.key.tasks),
                                       "overall": overall, "latency_ms": mean_latency(episodes)})
    record = store.finish(record)
    return record, write_report(store, record, episodes)


def format_table(record: EvalRecord) -> str:
    """The per-task table the CLI prints."""
    lines = [f"eval {record.eval_id}: {record.key.policy.label()}, {len(record.key.seeds)} episode(s) per task",
             f"{'task':<28} {'level':<9} {'success':>8} {'rate':>6} {'95% CI':>13} {'steps':>6}"]
    rows = [*record.summary, *record.groups, *([record.overall] if record.overall else [])]
    for row in rows:
        ci = f"[{row.ci_low:.0%}, {row.ci_high:.0%}]"
        lines.append(f"{row.task:<28} {row.difficulty:<9} {f'{row.successes}/{row.episodes}':>8} {row.rate:>6.0%} "
                     f"{ci:>13} {row.mean_steps:>6.1f}")
    if record.latency_ms:
        lines.append("latency per policy call: " + ", ".join(f"{k} {v:.1f} ms" for k, v in record.latency_ms.items()))
    return "\n".join(lines)


