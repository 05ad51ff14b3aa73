"""Prefect flow: one frozen teacher over the generated clips of a ``video`` version.

Writes a ``teacher`` version with ``target`` (N, T, h, w, C) float16 (the generated frames) and
``reference`` (N, 1, h, w, C) float16 (the observed frame alone), shard by shard; shards with a
``_done`` marker are skipped and claimed shards are left to their builder, so a killed run
resumes where it stopped and two builders never write the same shard. The overlapped shard loop
itself lives in flows/teachers_engine.py (no Prefect there, so benchmarks run it bare).
"""

from __future__ import annotations

import logging
import os
import time
import uuid

from prefect import flow, task
from pydantic import Field

from flows.configs import TeachersConfig
from flows.models_cache import cached_model
from flows.runtime import progress_disabled, split_shards
from flows.teachers_engine import (ShardClaims, ShardsResult, encode_shards, start_fork_server, teacher_arrays,
                                   teacher_recipe)
from flows.teachers_io import ObservedFrames, open_video
from pipelines.teachers import Teacher, load_teacher
from schemas.base import StrictModel
from schemas import refs
from storage import lineage
from storage.claims import wait_for_version_shards
from storage.targets import TargetStore, TargetWriter

log = logging.getLogger(__name__)


def resolve_io(config: TeachersConfig) -> tuple[bool, int, int]:
    """(io_processes, readers, writers): compressing and writing float16 tokens costs far more
    than reading uint8 frames, so with processes writers get 3/4 of the cores and readers a fifth
    (12 + 3 on 16 cores: the best of the measured settings, bench/RESULTS.md)."""
    processes = config.device.startswith("cuda") if config.io_processes is None else config.io_processes
    cores = os.cpu_count() or 2
    readers = config.readers or (max(2, cores // 5) if processes else 2)
    writers = config.writers or (max(2, cores * 3 // 4) if processes else 2)
    return processes, readers, writers


# ---------------------------------------------------------------- model cache (one per process)
def cached_teacher(config: TeachersConfig) -> Teacher:
    """The teacher of ``config``, loaded once per process and kept (workers reuse it across tasks)."""
    return cached_model(config.teacher, config.model, config.device, config.dtype,
                        lambda: load_teacher(config.teacher, config.model, config.settings, config.device,
                                             config.dtype),
                        extra=config.settings)


# ---------------------------------------------------------------- task and flow
def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="clip", disable=progress_disabled())


@task(retries=1, retry_delay_seconds=1)
def encode_shards_task(root_url: str, version_id: str, config: TeachersConfig, shards: list[int]) -> ShardsResult:
    """Encode the given shards of a building teacher version (done or claimed shards are skipped)."""
    processes, readers, writers = resolve_io(config)
    if processes:
        start_fork_server()  # boots while the teacher loads
    teacher = cached_teacher(config)
    writer = TargetStore(root_url).writer(version_id)
    recorded = writer.manifest.recipe.model
    if recorded is None or teacher.identity.key() != recorded.key():
        raise ValueError(f"teacher version '{version_id}' was begun with other weights than {config.model!r}")
    video = open_video(root_url, config.video)
    todo = [s for s in shards if not writer.is_done(s)]
    with _progress_bar(sum(len(writer.shard_clips(s)) for s in todo), f"{config.teacher} {version_id}") as bar:
        return encode_shards(teacher, video, ObservedFrames(root_url, video), writer, todo, config.batch, writers,
                             readers, claims=ShardClaims(root_url, writer), progress=bar.update,
                             io_processes=processes)


class TeachersSummary(StrictModel):
    """What a teachers run did."""

    version: str
    status: str
    skipped: bool = Field(description="True when the version was already complete (nothing computed).")
    shards_written: int = 0
    clips: int = 0
    frames: int = 0
    seconds: float = 0.0
    frames_per_s: float = 0.0


def begin_version(root_url: str, config: TeachersConfig) -> tuple[str, TargetWriter | None, Teacher]:
    """(version id, writer or None when already complete, teacher) for ``config``."""
    video = open_video(root_url, config.video)
    teacher = cached_teacher(config)
    recipe = teacher_recipe(teacher, config.video, config.preset)
    store, version_id = TargetStore(root_url), recipe.version_id()
    if store.status(version_id) == "complete":
        return version_id, None, teacher
    frames = video.manifest.array_spec("frames")
    writer = store.begin(recipe, teacher_arrays(video.manifest.num_clips, frames.shape[1], teacher, config.compression),
                         video.manifest.num_clips, video.manifest.shard_size)
    return version_id, writer, teacher


@flow(name="teachers", log_prints=False)
def teachers_flow(root_url: str, config: TeachersConfig) -> TeachersSummary:
    """Run one teacher over a video version and publish the ``teacher`` version (idempotent)."""
    version_id, writer, teacher = begin_version(root_url, config)
    if writer is None:
        log.info("teacher version %s is already complete", version_id)
        return TeachersSummary(version=version_id, status="complete", skipped=True)
    start, results = time.perf_counter(), []

    def run(shards: list[int]) -> None:
        futures = [encode_shards_task.submit(root_url, version_id, config, group)
                   for group in split_shards(shards, config.workers)]
        results.extend(future.result() for future in futures)

    run(writer.pending_shards())
    wait_for_version_shards(writer, run)
    seconds = time.perf_counter() - start
    clips, frames = sum(r.clips for r in results), sum(r.frames for r in results)
    fps = frames / seconds if seconds > 0 else 0.0
    manifest = writer.finalize(timings={"seconds": round(seconds, 3), "frames_per_s": round(fps, 2)})
    lineage.emit(root_url, "teachers", str(uuid.uuid4()), inputs=[refs.version(config.video)],
                 outputs=[refs.version(version_id)],
                 facets={"config": config.model_dump(mode="json"), "model": teacher.identity.model_dump(mode="json")})
    return TeachersSummary(version=version_id, status=manifest.status, skipped=False,
                           shards_written=sum(len(r.shards_written) for r in results), clips=clips, frames=frames,
                           seconds=round(seconds, 3), frames_per_s=round(fps, 2))
