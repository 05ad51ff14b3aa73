"""Prefect flow: collect MetaWorld demonstrations into the episode store.

The flow maps over (task, seed batch); each task run builds one rendering env at a time. Rounds
continue with fresh seeds for tasks that still lack successful episodes, up to a bound.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from importlib.metadata import version

from prefect import flow, task
from pydantic import Field, field_validator

from foresight.pipelines.ingest import metaworld as mw
from foresight.pipelines.ingest.common import FrameCodecOptions, resolve_frame_storage
from foresight.schemas.base import StrictModel, canonical_json
from foresight.schemas.dataset import DatasetInfo, EpisodeRecord, FeatureSpec, FrameStorage
from foresight.schemas import refs
from foresight.storage import lineage
from foresight.storage.layout import check_id
from foresight.storage.episodes import EpisodeStore

log = logging.getLogger(__name__)

FEATURES = {
    "action": FeatureSpec(dtype="float32", shape=[mw.ACTION_DIM], names=["dx", "dy", "dz", "gripper"]),
    "state": FeatureSpec(dtype="float32", shape=[mw.STATE_DIM]),
}


class MetaWorldIngestConfig(FrameCodecOptions):
    """Parameters of a MetaWorld collection run (renders are raw frames: raw by default, or --frame-codec)."""

    dataset: str = Field(description="Dataset name in the episode store.")
    tasks: list[str] = Field(description="MetaWorld task names (without -v3).")
    episodes_per_task: int = Field(default=2, ge=1, description="Successful episodes wanted per task.")
    camera: str = Field(default="corner2", description="MetaWorld camera name.")
    size: int = Field(default=256, ge=16, description="Rendered frame height and width.")
    seed: int = Field(default=0, ge=0, description="First seed; later attempts use the following seeds.")
    max_rounds: int = Field(default=3, ge=1, description="Rounds of fresh seeds for tasks still short of episodes.")

    @field_validator("dataset")
    @classmethod
    def _dataset_is_an_id(cls, value: str) -> str:
        return check_id("dataset", value)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        return mw.resolve_tasks(",".join(value))


class BatchResult(StrictModel):
    """What one (task, seed batch) produced."""

    task: str
    attempted: int = 0
    succeeded: int = 0
    skipped: int = 0
    episode_ids: list[str] = Field(default_factory=list)


@task(retries=1, retry_delay_seconds=1)
def collect_batch(root_url: str, config: MetaWorldIngestConfig, task_name: str, seeds: list[int]) -> BatchResult:
    """Collect one seed batch of one task; store successful demonstrations, skip stored ones."""
    store = EpisodeStore(root_url, config.dataset)
    result = BatchResult(task=task_name)
    for seed in seeds:
        episode_id = f"{task_name}-{seed:06d}"
        checksum = mw.demo_checksum(task_name, seed, config.camera, config.size)
        result.attempted += 1
        if store.has_episode(episode_id, checksum):
            result.skipped += 1
            result.succeeded += 1
            result.episode_ids.append(episode_id)
            continue
        demo = mw.collect_demonstration(task_name, seed, config.camera, config.size)
        if not demo.success:
            log.info("metaworld %s seed %d: expert failed, not stored", task_name, seed)
            continue
        _store_demo(store, demo, episode_id, checksum, config)
        result.succeeded += 1
        result.episode_ids.append(episode_id)
    return result


def frame_storage(config: MetaWorldIngestConfig) -> dict[str, FrameStorage]:
    """The camera's frame storage: renders are decoded frames (raw under zstd unless asked otherwise)."""
    return {config.camera: resolve_frame_storage(config, "none", f"metaworld, camera '{config.camera}'")}


def _store_demo(store: EpisodeStore, demo: mw.Demonstration, episode_id: str, checksum: str,
                config: MetaWorldIngestConfig) -> None:
    record = EpisodeRecord(
        episode_id=episode_id, split="train", task=demo.task, instructions=[mw.INSTRUCTIONS[demo.task]],
        length=demo.length, success=demo.success, source_path=f"metaworld://{demo.task}-v3/seed={demo.seed}",
        source_checksum=checksum, extra={"seed": demo.seed, "camera": config.camera})
    with store.writer(record, FEATURES, frame_storage(config), mw.FPS) as writer:
        writer.append_frames(config.camera, demo.frames_THWC)
        writer.set_lowdim({"action": demo.actions_TA, "state": demo.states_TS},
                          timestamps=mw.np.arange(demo.length) / mw.FPS)


def dataset_info(config: MetaWorldIngestConfig) -> DatasetInfo:
    """dataset.json of a MetaWorld collection (fingerprint over what determines its content)."""
    storage = frame_storage(config)
    source = {"camera": config.camera, "size": config.size, "metaworld": version("metaworld")}
    if storage[config.camera] != FrameStorage(codec="raw", zstd_level=3):
        # Raw under zstd 3 is what every MetaWorld dataset held before frame codecs; any other
        # storage is another dataset, so collecting into an existing one with it is refused.
        source["frame_storage"] = {cam: s.model_dump(mode="json") for cam, s in storage.items()}
    return DatasetInfo(
        name=config.dataset, source_kind="metaworld", source="metaworld v3 scripted experts",
        source_fingerprint=hashlib.sha256(canonical_json(source).encode()).hexdigest(), fps=mw.FPS,
        cameras={config.camera: [config.size, config.size, 3]}, features=FEATURES, frame_storage=storage,
        extra={"camera": config.camera, "action_space": "Box(-1, 1, (4,))"})


@flow(name="ingest-metaworld", log_prints=False)
def ingest_metaworld_flow(root_url: str, config: MetaWorldIngestConfig) -> dict[str, BatchResult]:
    """Collect ``episodes_per_task`` successful demonstrations of every task; per-task results."""
    store = EpisodeStore(root_url, config.dataset)
    info = dataset_info(config)
    if store.exists() and store.info().source_fingerprint != info.source_fingerprint:
        raise ValueError(f"dataset '{config.dataset}' was collected with other settings "
                         "(camera, size, frame codec or metaworld version); use another --dataset name")
    if not store.exists():
        store.write_info(info)
    totals = {name: BatchResult(task=name) for name in config.tasks}
    next_seed = {name: config.seed for name in config.tasks}
    for _ in range(config.max_rounds):
        short = {name: config.episodes_per_task - totals[name].succeeded for name in config.tasks}
        futures = []
        for name, missing in short.items():
            if missing <= 0:
                continue
            seeds = list(range(next_seed[name], next_seed[name] + missing))
            next_seed[name] += missing
            futures.append(collect_batch.submit(root_url, config, name, seeds))
        if not futures:
            break
        for future in futures:
            _accumulate(totals, future.result())
    from foresight.flows.ingest_sources import dataset_stats

    store.write_stats(dataset_stats(store, FEATURES))
    lineage.emit(root_url, "ingest-metaworld", str(uuid.uuid4()), inputs=[],
                 outputs=[refs.dataset(config.dataset)], facets={"config": config.model_dump()})
    return totals


def _accumulate(totals: dict[str, BatchResult], batch: BatchResult) -> None:
    total = totals[batch.task]
    total.attempted += batch.attempted
    total.succeeded += batch.succeeded
    total.skipped += batch.skipped
    total.episode_ids.extend(batch.episode_ids)
