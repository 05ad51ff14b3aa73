"""The one build seam of every sharded stage: text, generate, teachers, pi0 and export.

A stage says *what* it builds (:class:`Stage`): its config type, the recipe that keys its output,
the output's layout, its lineage inputs, and :meth:`Stage.open_worker`, which loads the stage's
model through flows/models_cache.py and computes one shard. :func:`build` owns *how*, once for
every stage:

- the fast path: an output that is already complete returns at once (``skipped``);
- begin (or reopen an interrupted build) and the split of the pending shards into tasks;
- claims (:class:`storage.claims.ClaimSet`): each shard is computed by one builder, a done one never;
- the model-identity check, once per task: weights other than the recorded ones are refused;
- writes, then waiting for shards other builders hold and picking up those they abandoned;
- finalize with timings, and the lineage event;
- progress on a terminal and as a Prefect artifact (flows/progress.py), counted from the store.

Shard tasks take (stage, root URL, output id, config, shards) and reopen everything by id, so they
run in threads, in processes or on Dask workers alike; a killed build resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from foresight.flows.progress import BuildProgress
from foresight.flows.runtime import RunnerChoice, run_flow, split_shards
from foresight.schemas.base import StrictModel
from foresight.schemas.model import ModelIdentity
from foresight.schemas.plan import ClipRows, PlanInfo
from foresight.schemas.target import ArraySpec, TargetRecipe
from foresight.storage import layout, lineage
from foresight.storage.claims import ClaimSet, active_claims, wait_for_shards
from foresight.storage.fs import Root, open_root
from foresight.storage.plans import PlanStore
from foresight.storage.targets import TargetStore, TargetWriter, answering_for_reads, verify_by_default

log = logging.getLogger(__name__)

Config = TypeVar("Config", bound=StrictModel)
POLL_S = 1.0
"""Seconds between looks at shards that other builders hold."""


class ShardsResult(StrictModel):
    """What one shard task wrote."""

    shards: list[int] = Field(default_factory=list, description="Shards this task computed and stored.")
    clips: int = Field(default=0, description="Clips (samples) in those shards.")
    frames: int = Field(default=0, description="Frames encoded (teachers: T per clip; 0 elsewhere).")
    seconds: float = 0.0


class BuildSummary(StrictModel):
    """What a build of any stage did (what the CLI and the pipeline print)."""

    version: str = Field(description="Id of the target version or export.")
    status: str
    skipped: bool = Field(description="True when the output was already complete (nothing computed).")
    shards_written: int = 0
    clips: int = Field(default=0, description="Clips (samples) computed by this run.")
    frames: int = Field(default=0, description="Frames computed by this run (teachers).")
    seconds: float = 0.0
    clips_per_hour: float = 0.0
    frames_per_s: float = 0.0
    url: str = Field(default="", description="Where the output lives.")
    num_samples: int = Field(default=0, description="Clips (samples) of the whole output.")
    num_shards: int = Field(default=0, description="Shards of the whole output.")
    total_bytes: int = Field(default=0, description="Bytes of the whole output (exports).")

    @property
    def export_id(self) -> str:
        """The id, named as exports name it."""
        return self.version


# ---------------------------------------------------------------- outputs
class Output(Protocol):
    """An output being built, reopened by id: a target version or an export."""

    root: Root
    version_id: str
    identity: ModelIdentity | None
    """The model the output was begun with (None: a stage without a model)."""

    def pending(self) -> list[int]:
        """Shards not written yet, freshly listed (other builders add some)."""

    def is_done(self, shard: int) -> bool: ...

    def clips(self, shard: int) -> int: ...

    def prepare(self, shard: int) -> None:
        """Runs once a shard's claim is held: remove what a dead writer of it left behind."""

    def write(self, shard: int, payload: Any) -> None: ...

    def finalize(self, timings: dict[str, float]) -> str:
        """Mark the output complete; returns its status."""


class TargetOutput:
    """A building target version (storage.targets.TargetWriter)."""

    def __init__(self, writer: TargetWriter):
        self.writer, self.root, self.version_id = writer, writer.root, writer.version_id
        self.identity = writer.manifest.recipe.model

    def pending(self) -> list[int]:
        self.root.fs.invalidate_cache(self.root.path(layout.target_dir(self.version_id), layout.DONE_DIR))
        return self.writer.pending_shards()

    def is_done(self, shard: int) -> bool:
        return self.writer.is_done(shard)

    def clips(self, shard: int) -> int:
        return len(self.writer.shard_clips(shard))

    def prepare(self, shard: int) -> None:
        self.writer.remove_stale_temporaries(shard)

    def write(self, shard: int, payload: dict) -> None:
        self.writer.write_shard(shard, payload)

    def finalize(self, timings: dict[str, float]) -> str:
        return self.writer.finalize(timings=timings).status


# ---------------------------------------------------------------- stages
class Worker(Protocol):
    """What a shard task computes with: the loaded model's identity and one shard at a time."""

    identity: ModelIdentity | None

    def compute(self, shard: int) -> Any:
        """The payload of one shard (arrays of a target version, samples of an export)."""


class ShardLoop(Protocol):
    """A worker that runs its own overlapped loop over many shards (the teachers engine): it takes
    each shard through ``claims`` and stores it itself."""

    identity: ModelIdentity | None

    def write_shards(self, shards: list[int], claims: ClaimSet) -> ShardsResult: ...


class Stage(ABC, Generic[Config]):
    """One sharded stage. Subclasses are module-level singletons (shard tasks pickle them)."""

    name: ClassVar[str]
    """Stage name: lineage job, task name, logs."""
    config_type: ClassVar[type[StrictModel]]

    @abstractmethod
    def recipe(self, root_url: str, config: Config) -> Any:
        """What keys the output (checks the inputs; may load the model through the cache)."""

    @abstractmethod
    def output_id(self, recipe: Any) -> str: ...

    @abstractmethod
    def status(self, root_url: str, output_id: str) -> str | None:
        """'complete', 'building' or None (not begun)."""

    @abstractmethod
    def begin(self, root_url: str, config: Config, recipe: Any) -> Output | None:
        """Record the layout of a new output (or keep an interrupted one's); None when a concurrent
        builder completed it meanwhile."""

    @abstractmethod
    def reopen(self, root_url: str, output_id: str) -> Output: ...

    @abstractmethod
    def open_worker(self, root_url: str, config: Config, output: Output, shards: list[int]) -> Worker | ShardLoop:
        """Load the model (flows.models_cache) and what ``shards`` read."""

    @abstractmethod
    def inputs(self, root_url: str, config: Config, recipe: Any) -> list[str]:
        """Lineage inputs (``plans/<id>``, ``targets/<id>``)."""

    @abstractmethod
    def describe(self, root_url: str, output_id: str) -> dict[str, Any]:
        """url, num_samples, num_shards, total_bytes of a complete output."""

    @abstractmethod
    def unverified_inputs(self, root_url: str, output_id: str) -> list[str]:
        """The target versions a complete output was read from with ``--no-verify`` ([] when its
        inputs were verified as it was built)."""

    @abstractmethod
    def output_name(self, output_id: str) -> str:
        """The output as lineage names it (``targets/<id>``, ``exports/<id>``)."""

    def facets(self, config: Config) -> dict[str, Any]:
        return {"config": config.model_dump(mode="json")}


class TargetStage(Stage[Config]):
    """A stage whose output is a target version: its recipe plus the array layout."""

    @abstractmethod
    def recipe(self, root_url: str, config: Config) -> TargetRecipe: ...

    @abstractmethod
    def arrays(self, root_url: str, config: Config, recipe: TargetRecipe) -> tuple[list[ArraySpec], int, int]:
        """(arrays, clips, clips per shard) of the version."""

    def output_id(self, recipe: TargetRecipe) -> str:
        return recipe.version_id()

    def status(self, root_url: str, output_id: str) -> str | None:
        return TargetStore(root_url).status(output_id)

    def begin(self, root_url: str, config: Config, recipe: TargetRecipe) -> TargetOutput:
        arrays, num_clips, shard_size = self.arrays(root_url, config, recipe)
        return TargetOutput(TargetStore(root_url).begin(recipe, arrays, num_clips, shard_size))

    def reopen(self, root_url: str, output_id: str) -> TargetOutput:
        return TargetOutput(TargetStore(root_url).writer(output_id))

    def output_name(self, output_id: str) -> str:
        return layout.target_dir(output_id)

    def describe(self, root_url: str, output_id: str) -> dict[str, Any]:
        store = TargetStore(root_url)
        manifest = store.manifest(output_id)
        return {"url": store.root.url_of(layout.target_dir(output_id)), "num_samples": manifest.num_clips,
                "num_shards": manifest.num_shards}

    def unverified_inputs(self, root_url: str, output_id: str) -> list[str]:
        manifest = TargetStore(root_url).manifest(output_id)
        return [] if manifest.verified_inputs else [ref.id for ref in manifest.recipe.inputs_of("version")]


def check_identity(loaded: ModelIdentity | None, recorded: ModelIdentity | None, output_id: str) -> None:
    """Refuse to add shards made by other weights than the output records."""
    if loaded is None and recorded is None:
        return
    if loaded is None or recorded is None or loaded.key() != recorded.key():
        spec = loaded.spec if loaded is not None else "no model"
        raise ValueError(f"target version '{output_id}': the loaded model {spec} is not the one the "
                         "version was started with (weights or seed changed); start a new version")


def plan_info(root_url: str, plan_id: str) -> PlanInfo:
    """plan.json of a plan (its clip count and parameters, without reading the clips); ValueError
    when the plan has no clips."""
    info = PlanStore(root_url).info(plan_id)
    if info.num_clips == 0:
        raise ValueError(f"plan '{plan_id}' has no clips")
    return info


def plan_rows(root_url: str, plan_id: str) -> ClipRows:
    """The clips of a plan; ValueError when it has none."""
    plan_info(root_url, plan_id)
    return PlanStore(root_url).rows(plan_id)


# ---------------------------------------------------------------- one shard task
def write_shards(stage: Stage, root_url: str, output_id: str, config: StrictModel, shards: list[int]) -> ShardsResult:
    """Compute and store the given shards of a building output, skipping done ones and those a
    live builder holds; the body of every stage's shard task."""
    output = stage.reopen(root_url, output_id)
    todo = [shard for shard in shards if not output.is_done(shard)]
    if not todo:
        return ShardsResult()
    return run_worker(output, stage.open_worker(root_url, config, output, todo), todo)


def run_worker(output: Output, worker: Worker | ShardLoop, shards: list[int]) -> ShardsResult:
    """Check the worker's model against the output's, then claim, compute and store each shard
    (or hand the claims to the worker's own shard loop)."""
    check_identity(worker.identity, output.identity, output.version_id)
    claims = ClaimSet(output.root, output.version_id, is_done=output.is_done, on_acquire=output.prepare)
    if hasattr(worker, "write_shards"):
        return worker.write_shards(shards, claims)
    result, start = ShardsResult(), time.perf_counter()
    for shard in shards:
        with claims.hold(shard) as owned:
            if owned is None:
                continue
            with answering_for_reads():  # the shard's publication answers for the shard's reads
                output.write(shard, worker.compute(shard))
            result.shards.append(shard)
            result.clips += output.clips(shard)
    result.seconds = time.perf_counter() - start
    return result


@task(name="build-shards", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
def write_shards_task(stage: Stage, root_url: str, output_id: str, config: StrictModel,
                      shards: list[int]) -> ShardsResult:
    """Prefect task over :func:`write_shards` (takes ids and URLs, returns a small record)."""
    return write_shards(stage, root_url, output_id, config, shards)


ShardRunner = Callable[[Stage, str, str, StrictModel, list[int]], list[ShardsResult]]
"""Runs shard tasks: (stage, root URL, output id, config, shards) -> their results."""


def in_process(stage: Stage, root_url: str, output_id: str, config: StrictModel,
               shards: list[int]) -> list[ShardsResult]:
    """A shard runner computing every shard in this process, without Prefect (tests, notebooks)."""
    return [write_shards(stage, root_url, output_id, config, shards)]


def prefect_tasks(tasks: int) -> ShardRunner:
    """A shard runner submitting ``tasks`` Prefect tasks of contiguous shards (0: one per shard) to
    the flow's task runner; on Dask, tasks whose config names a CUDA device get one GPU each."""

    def run(stage: Stage, root_url: str, output_id: str, config: StrictModel, shards: list[int]) -> list[ShardsResult]:
        groups = [[shard] for shard in shards] if tasks == 0 else split_shards(shards, tasks)
        named = write_shards_task.with_options(name=f"{stage.name}-shards")
        futures = [named.submit(stage, root_url, output_id, config, group) for group in groups]
        return [future.result() for future in futures]

    return run


# ---------------------------------------------------------------- the build
def skipped_summary(stage: Stage, root_url: str, output_id: str) -> BuildSummary:
    log.info("%s: %s is already complete", stage.name, output_id)
    return BuildSummary(version=output_id, status="complete", skipped=True, **stage.describe(root_url, output_id))


def build(stage: Stage, root_url: str, config: StrictModel, runner: ShardRunner, *,
          poll_s: float = POLL_S) -> BuildSummary:
    """Build (or finish) the output of ``config``: idempotent, resumable, safe to run concurrently."""
    recipe = stage.recipe(root_url, config)
    output_id = stage.output_id(recipe)
    if stage.status(root_url, output_id) == "complete":
        check_unverified_inputs(stage, root_url, output_id)
        return skipped_summary(stage, root_url, output_id)
    start = time.perf_counter()
    output = stage.begin(root_url, config, recipe)
    if output is None:
        return skipped_summary(stage, root_url, output_id)
    with BuildProgress(f"{stage.name} {output_id}", output.pending, output.clips):
        results = runner(stage, root_url, output_id, config, output.pending())
        wait_for_shards(output.pending, lambda: set(active_claims(output.root, output_id)),
                        lambda free: results.extend(runner(stage, root_url, output_id, config, free)),
                        poll_s=poll_s, what=f"{stage.name} '{output_id}'")
    summary = finish(stage, root_url, output, results, time.perf_counter() - start)
    lineage.emit(root_url, stage.name, str(uuid.uuid4()), inputs=stage.inputs(root_url, config, recipe),
                 outputs=[stage.output_name(output_id)], facets=stage.facets(config))
    return summary


def check_unverified_inputs(stage: Stage, root_url: str, output_id: str) -> None:
    """A verifying run that finds its output complete but built with ``--no-verify`` audits that
    output's input versions now (every shard's sha256), instead of handing on unchecked work: a
    failing input is one ValueError naming both; intact inputs are logged and the output is reused."""
    if not verify_by_default():
        return
    inputs = stage.unverified_inputs(root_url, output_id)
    store = TargetStore(root_url)
    for version in inputs:
        if problems := store.open(version).verify():
            raise ValueError(f"{output_id} was built with --no-verify from {version}, which fails its checksums "
                             f"now ({problems[0]}); what {output_id} holds may be corrupt: remove it and build "
                             f"it again")
    if inputs:
        log.warning("%s was built with --no-verify; its inputs %s were verified now", output_id, ", ".join(inputs))


def finish(stage: Stage, root_url: str, output: Output, results: list[ShardsResult], seconds: float) -> BuildSummary:
    """Finalize the output with its timings and report what this run computed."""
    clips, frames = sum(r.clips for r in results), sum(r.frames for r in results)
    per_hour = clips * 3600.0 / seconds if seconds > 0 else 0.0
    timings = {"seconds": round(seconds, 3), "clips_per_hour": round(per_hour, 1),
               "samples_per_s": round(clips / seconds, 3) if seconds > 0 else 0.0}
    fps = frames / seconds if seconds > 0 else 0.0
    if frames:
        timings["frames_per_s"] = round(fps, 2)
    status = output.finalize(timings)
    return BuildSummary(version=output.version_id, status=status, skipped=False,
                        shards_written=sum(len(r.shards) for r in results), clips=clips, frames=frames,
                        seconds=round(seconds, 3), clips_per_hour=round(per_hour, 1), frames_per_s=round(fps, 2),
                        **stage.describe(root_url, output.version_id))


def run_build(stage_flow: Any, stage: Stage, root: Any, config: StrictModel, runner: RunnerChoice | None = None,
              **flow_params: Any) -> BuildSummary:
    """Run a stage's flow on the chosen task runner; a complete output returns at once, without
    starting Prefect (bad inputs fail here too, in one line)."""
    data_root = open_root(root)
    output_id = stage.output_id(stage.recipe(data_root.url, config))
    if stage.status(data_root.url, output_id) == "complete":
        return skipped_summary(stage, data_root.url, output_id)
    return run_flow(stage_flow, runner or RunnerChoice(), data_root, root_url=data_root.url, config=config,
                    **flow_params)
