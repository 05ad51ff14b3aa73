"""The whole chain from one typed config: ingest -> plan -> text -> generate -> teachers -> pi0 -> export.

A pipeline file (TOML) names the dataset once and gives each stage its own section; the ids that
link stages (plan id, text version, video version, teacher versions) are filled in as the chain
runs. Every stage flow keys its output by content and returns at once when that output is
already complete, so rerunning a pipeline skips finished stages and resumes a killed one. The
result is a table of what ran, what was skipped and how long each stage took::

    dataset = "demo"
    [ingest]
    kind = "metaworld"
    tasks = ["reach"]
    [plan]
    frames = 4
    [text]
    model = "tiny"
    [generate]
    model = "tiny"
    [[teachers]]
    teacher = "dinov2"
    model = "tiny"
    [export]
    codec = "f16"
"""


import logging
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow
from pydantic import Field, create_model, model_validator

from foresight.flows.build import BuildSummary
from foresight.flows.export import ExportConfig, export_flow
from foresight.flows.generate import GenerateConfig, PlanConfig, TextConfig, generate_flow, make_plan, text_flow
from foresight.flows.ingest import MetaWorldIngestConfig, ingest_metaworld_flow
from foresight.flows.ingest_sources import ingest_calvin_flow, ingest_lerobot_flow, ingest_teleop_flow
from foresight.flows.pi0 import Pi0TargetsConfig, pi0_targets_flow
from foresight.flows.runtime import RunnerChoice, stage_runners
from foresight.flows.teachers import TeachersConfig, teachers_flow
from foresight.pipelines.ingest.calvin import CalvinOptions
from foresight.pipelines.ingest.lerobot import LeRobotOptions
from foresight.pipelines.ingest.teleop import TeleopOptions
from foresight.schemas.base import StrictModel, validate
from foresight.schemas import refs
from foresight.storage import lineage
from foresight.storage.fs import default_root, open_root
from foresight.storage.layout import check_id

log = logging.getLogger(__name__)

PLACEHOLDER_ID = "placeholder-000000000000"
"""Stands in for an upstream id while a section is validated before the chain runs."""


def config_section(config: type[StrictModel], linked: set[str], name: str) -> type[StrictModel]:
    """A pipeline section: the stage's own config model without the fields the chain links."""
    fields = {key: (info.annotation, info) for key, info in config.model_fields.items() if key not in linked}
    section = create_model(name, __base__=StrictModel, **fields)
    section.__doc__ = f"{config.__doc__.strip()} (the chain fills in: {', '.join(sorted(linked))})."
    return section


def target_detail(summary: BuildSummary) -> str:
    return "already complete" if summary.skipped else f"{summary.shards_written} shard(s), {summary.clips} clips"


def export_detail(summary: BuildSummary) -> str:
    return f"{summary.num_samples} samples in {summary.num_shards} shard(s)"


@dataclass(frozen=True)
class ChainStage:
    """One sharded stage of the chain: its pipeline.toml section, flow and config, and which of the
    chain's ids its config takes (config field -> the stage, or 'plan'/'targets', that provides it)."""

    key: str
    flow: Any
    config: type[StrictModel]
    links: dict[str, str]
    exported: bool = True
    """Its output is one of [export]'s targets."""
    detail: Callable[[BuildSummary], str] = target_detail


STAGES = (
    ChainStage("text", text_flow, TextConfig, {"plan": "plan"}),
    ChainStage("generate", generate_flow, GenerateConfig, {"plan": "plan", "text": "text"}),
    ChainStage("teachers", teachers_flow, TeachersConfig, {"video": "generate"}),
    ChainStage("pi0", pi0_targets_flow, Pi0TargetsConfig, {"plan": "plan"}),
    ChainStage("export", export_flow, ExportConfig, {"plan": "plan", "targets": "targets"}, exported=False,
               detail=export_detail),
)
"""The chain after the plan, in order: each configured section runs, fed the ids before it."""
STAGE_BY_KEY = {stage.key: stage for stage in STAGES}


def stage_section(key: str, name: str) -> type[StrictModel]:
    stage = STAGE_BY_KEY[key]
    return config_section(stage.config, set(stage.links), name)


PlanSection = config_section(PlanConfig, {"dataset"}, "PlanSection")
TextSection = stage_section("text", "TextSection")
GenerateSection = stage_section("generate", "GenerateSection")
Pi0Section = stage_section("pi0", "Pi0Section")
ExportSection = stage_section("export", "ExportSection")
_TeacherFields = stage_section("teachers", "_TeacherFields")


class TeacherSection(_TeacherFields):
    """One teacher over the generated video (the chain fills in: video)."""

    alias: str | None = Field(default=None, description="Export field prefix (default: the teacher's name); "
                                                        "needed when two teachers of one kind are exported.")


_MetaWorldFields = config_section(MetaWorldIngestConfig, {"dataset"}, "_MetaWorldFields")


class MetaWorldIngest(_MetaWorldFields):
    """Collect MetaWorld demonstrations with the scripted experts."""

    kind: Literal["metaworld"]


class CalvinIngest(StrictModel):
    """Ingest a CALVIN folder."""

    kind: Literal["calvin"]
    src: str = Field(description="CALVIN folder holding the split folders.")
    options: CalvinOptions = Field(default_factory=CalvinOptions, description="Splits, cameras, depth.")
    strict: bool = Field(default=False, description="Fail on the first bad item instead of quarantining it.")


class TeleopIngest(StrictModel):
    """Ingest a folder of ALOHA / AgileX teleoperation HDF5 episodes."""

    kind: Literal["teleop"]
    src: str = Field(description="Folder of episode_<idx>.hdf5 files.")
    options: TeleopOptions = Field(default_factory=TeleopOptions, description="Rate, instruction, task.")
    strict: bool = Field(default=False, description="Fail on the first bad item instead of quarantining it.")


class LeRobotIngest(StrictModel):
    """Ingest a LeRobot dataset folder."""

    kind: Literal["lerobot"]
    src: str = Field(description="LeRobot dataset folder (v3.0 or v2.x).")
    options: LeRobotOptions = Field(default_factory=LeRobotOptions, description="Cameras to store.")
    strict: bool = Field(default=False, description="Fail on the first bad item instead of quarantining it.")


IngestSection = Annotated[MetaWorldIngest | CalvinIngest | TeleopIngest | LeRobotIngest, Field(discriminator="kind")]


class PipelineConfig(StrictModel):
    """A whole chain. Stages after the last configured one are not run; a stage needs the ones
    before it (generate needs text, teachers need generate, export needs a target)."""

    name: str = Field(default="pipeline", description="Name of the pipeline (deployment name, logs).")
    root: str | None = Field(default=None, description="Data root URL; default $FORESIGHT_ROOT or ./foresight-data.")
    dataset: str = Field(description="Dataset the chain works on (ingested by [ingest], or already stored).")
    preset: str | None = Field(default=None, description="Release recipe (svam-calvin, svam-metaworld, vpp) for "
                                                         "every [text], [generate] and [[teachers]] section that "
                                                         "names none itself.")
    runner: RunnerChoice = Field(default_factory=RunnerChoice, description="Where the stages' tasks run.")
    ingest: IngestSection | None = Field(default=None, description="How to fill the dataset; none = it exists.")
    plan: PlanSection = Field(default_factory=PlanSection, description="Clip plan settings.")
    text: TextSection | None = Field(default=None, description="CLIP text targets.")
    generate: GenerateSection | None = Field(default=None, description="SVD video generation + one-step features.")
    teachers: list[TeacherSection] = Field(default_factory=list, description="Teacher maps over the video.")
    pi0: Pi0Section | None = Field(default=None, description="π0 teacher targets over the plan's clips (exported "
                                                             "with the rest: leave its `limit` unset then).")
    export: ExportSection | None = Field(default=None, description="Webdataset export of every produced target.")

    @model_validator(mode="after")
    def _chain_is_complete(self) -> "PipelineConfig":
        check_id("dataset", self.dataset)
        check_id("pipeline", self.name)
        if self.generate is not None and self.text is None:
            raise ValueError("[generate] needs a [text] section (its text version conditions the video)")
        if self.teachers and self.generate is None:
            raise ValueError("[[teachers]] need a [generate] section (teachers read the generated video)")
        if self.export is not None and self.text is None and self.pi0 is None:
            raise ValueError("[export] needs at least a [text] or [pi0] section (something to export)")
        if isinstance(self.ingest, MetaWorldIngest):
            self.metaworld_config()
        self.stage_configs(PLACEHOLDER_ID, PLACEHOLDER_ID, PLACEHOLDER_ID)  # every stage's own checks, now
        return self

    def metaworld_config(self) -> MetaWorldIngestConfig:
        """The MetaWorld ingest config of the [ingest] section (which must be of kind metaworld)."""
        assert isinstance(self.ingest, MetaWorldIngest), "metaworld_config() of a non-metaworld ingest"
        return MetaWorldIngestConfig(dataset=self.dataset, **self.ingest.model_dump(exclude={"kind"}))

    def stage_configs(self, plan: str, text: str, video: str) -> dict[str, Any]:
        """The stage configs with the chain's ids filled in (validated by each stage's model);
        teachers as a list, export left out (its targets are known once the chain ran)."""
        ids = {"plan": plan, "text": text, "generate": video}
        configs: dict[str, Any] = {"plan": PlanConfig(dataset=self.dataset, **self.plan.model_dump())}
        for stage in STAGES:
            if stage.key != "export":
                built = [self.stage_config(stage, section, ids) for section in self.sections(stage)]
                if stage.key == "teachers":
                    configs["teachers"] = built
                elif built:
                    configs[stage.key] = built[0]
        return configs

    def sections(self, stage: ChainStage) -> list[StrictModel]:
        """The sections of a stage in this file: none, one, or every [[teachers]] entry."""
        value = getattr(self, stage.key)
        return list(value) if isinstance(value, list) else [] if value is None else [value]

    def stage_config(self, stage: ChainStage, section: StrictModel, ids: dict[str, Any]) -> StrictModel:
        """A section's config with the chain's ids linked in. Only the keys the section sets are
        passed, so that a preset (the section's, else the pipeline's) fills in the rest."""
        values = section.model_dump(exclude_unset=True, exclude={"alias"})
        if "preset" in stage.config.model_fields and values.get("preset") is None and self.preset is not None:
            values["preset"] = self.preset
        return stage.config(**{field: ids[source] for field, source in stage.links.items()}, **values)


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline TOML file; ValueError naming the file and every bad key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pipeline file {path}: not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"pipeline file {path}: not valid TOML ({err})") from None
    return validate(PipelineConfig, data, f"pipeline file {path}")


class StageResult(StrictModel):
    """One row of the pipeline summary."""

    stage: str = Field(description="Stage name, e.g. 'generate' or 'teachers:dinov2'.")
    status: Literal["ran", "skipped"] = Field(description="skipped: its output was already complete.")
    output: str = Field(description="Id of what the stage produced (dataset, plan, version, export).")
    seconds: float = Field(description="Wall time of the stage in this run.")
    detail: str = Field(default="", description="What it did, in a few words.")


class PipelineSummary(StrictModel):
    """What a pipeline run did, stage by stage."""

    name: str
    root: str
    runner: str
    stages: list[StageResult] = Field(default_factory=list)
    seconds: float = 0.0


class ChainRun:
    """Runs stages in order, timing each and collecting the summary rows."""

    def __init__(self, summary: PipelineSummary, make_runner: Callable[[], Any]):
        self.summary, self.make_runner = summary, make_runner

    def stage(self, name: str, call: Callable[[], tuple[str, bool, str]]) -> str:
        """Run one stage; ``call`` returns (output id, skipped, detail)."""
        log.info("pipeline %s: stage %s", self.summary.name, name)
        started = time.perf_counter()
        output, skipped, detail = call()
        seconds = round(time.perf_counter() - started, 3)
        self.summary.stages.append(StageResult(stage=name, status="skipped" if skipped else "ran", output=output,
                                               seconds=seconds, detail=detail))
        return output

    def subflow(self, stage_flow: Any, **params: Any) -> Any:
        """Run a stage flow as a subflow on the pipeline's task runner."""
        return stage_flow.with_options(task_runner=self.make_runner())(**params)


def ingest_stage(chain: ChainRun, root_url: str, config: PipelineConfig) -> tuple[str, bool, str]:
    """Fill the dataset; skipped when every episode was already stored."""
    section = config.ingest
    if isinstance(section, MetaWorldIngest):
        results = chain.subflow(ingest_metaworld_flow, root_url=root_url, config=config.metaworld_config())
        stored = sum(r.succeeded for r in results.values())
        new = stored - sum(r.skipped for r in results.values())
        return config.dataset, new == 0, f"{new} new of {stored} episodes"
    sources = {"calvin": ingest_calvin_flow, "teleop": ingest_teleop_flow, "lerobot": ingest_lerobot_flow}
    summary = chain.subflow(sources[section.kind], root_url=root_url, dataset=config.dataset, src=section.src,
                            options=section.options, strict=section.strict)
    return config.dataset, not summary.written, (f"{len(summary.written)} new, {len(summary.skipped)} unchanged, "
                                                 f"{len(summary.quarantined)} quarantined episodes")


def build_stage(chain: ChainRun, stage: ChainStage, root_url: str, config: StrictModel) -> tuple[str, bool, str]:
    """One sharded stage as a subflow; its summary says whether it was complete."""
    summary = chain.subflow(stage.flow, root_url=root_url, config=config)
    return summary.version, summary.skipped, stage.detail(summary)


def run_chain(chain: ChainRun, root_url: str, config: PipelineConfig) -> None:
    """Ingest and plan, then every configured stage of :data:`STAGES` in order, each fed the ids of
    the ones before it; [export] gets every target the chain produced."""
    if config.ingest is not None:
        chain.stage("ingest", lambda: ingest_stage(chain, root_url, config))
    plan_config = config.stage_configs(PLACEHOLDER_ID, PLACEHOLDER_ID, PLACEHOLDER_ID)["plan"]

    def plan_stage() -> tuple[str, bool, str]:
        plan = make_plan(root_url, plan_config)
        return plan.plan_id, not plan.created, f"{plan.num_clips} clips"

    ids: dict[str, Any] = {"plan": chain.stage("plan", plan_stage), "targets": []}
    for stage in STAGES:
        for section in config.sections(stage):
            stage_config = config.stage_config(stage, section, ids)
            alias = getattr(section, "alias", None)
            name = f"teachers:{alias or stage_config.teacher}" if stage.key == "teachers" else stage.key
            output = chain.stage(name, lambda s=stage, c=stage_config: build_stage(chain, s, root_url, c))
            ids[stage.key] = output
            if stage.exported:
                ids["targets"].append(f"{alias}={output}" if alias else output)


@flow(name="foresight-pipeline", log_prints=False)
def pipeline_flow(config: PipelineConfig, root_url: str | None = None) -> PipelineSummary:
    """Run the chain of ``config`` on ``root_url`` (default: the config's root, then $FORESIGHT_ROOT)."""
    root_url = open_root(root_url or config.root or default_root()).url
    summary = PipelineSummary(name=config.name, root=root_url, runner=config.runner.describe())
    started = time.perf_counter()
    with stage_runners(config.runner) as make_runner:
        run_chain(ChainRun(summary, make_runner), root_url, config)
    summary.seconds = round(time.perf_counter() - started, 3)
    lineage.emit(root_url, "pipeline", str(uuid.uuid4()), inputs=[refs.dataset(config.dataset)],
                 outputs=[refs.Ref.infer(row.output) for row in summary.stages if row.stage != "ingest"],
                 facets={"pipeline": config.name, "stages": [row.model_dump() for row in summary.stages]})
    return summary


def run_pipeline(config: PipelineConfig, root: str | None = None,
                 runner: RunnerChoice | None = None) -> PipelineSummary:
    """Run a pipeline from this process (what ``foresight run`` does); ``root`` and ``runner``
    override the config's."""
    from foresight.flows.runtime import check_workers_see_root, run_flow, shared_api

    if runner is not None:
        config = config.model_copy(update={"runner": runner})
    data_root = open_root(root or config.root or default_root())
    data_root.check_writable()
    if config.runner.dask_address is not None:
        check_workers_see_root(config.runner.dask_address, data_root)
    if not config.runner.uses_dask:
        return run_flow(pipeline_flow, RunnerChoice(), data_root, config=config, root_url=data_root.url)
    with shared_api():  # one Prefect API for the flow process and every Dask worker
        return run_flow(pipeline_flow, RunnerChoice(), data_root, config=config, root_url=data_root.url)


def format_summary(summary: PipelineSummary) -> str:
    """The summary as a fixed-width table (what the CLI prints)."""
    header = ("stage", "status", "seconds", "output", "detail")
    rows = [(r.stage, r.status, f"{r.seconds:.1f}", r.output, r.detail) for r in summary.stages]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = [f"pipeline {summary.name} on {summary.root} ({summary.runner})"]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    ran = sum(r.status == "ran" for r in summary.stages)
    lines.append(f"{ran} stage(s) ran, {len(summary.stages) - ran} skipped, {summary.seconds:.1f} s in total")
    return "\n".join(lines)
