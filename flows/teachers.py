"""Prefect flow: one frozen teacher over the generated clips of a ``video`` version.

Writes a ``teacher`` version with ``target`` (N, T, h, w, C) float16 (the generated frames) and
``reference`` (N, 1, h, w, C) float16 (the observed frame alone) through flows/build.py: shards
with a ``_done`` marker are skipped and claimed shards are left to their builder, so a killed run
resumes where it stopped and two builders never write the same shard. The worker's shard loop is
the overlapped engine of flows/teachers_engine.py (no Prefect there, so benchmarks run it bare).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect import flow

from foresight.flows.build import BuildSummary, ShardsResult, TargetOutput, TargetStage, build, prefect_tasks
from foresight.flows.configs import TeachersConfig
from foresight.flows.models_cache import cached_model
from foresight.flows.teachers_engine import (compiled_codec, encode_shards, start_fork_server, teacher_arrays,
                                            teacher_recipe)
from foresight.flows.teachers_io import ObservedFrames, open_video
from foresight.pipelines.teachers import Teacher, load_teacher
from foresight.schemas.target import ArraySpec, TargetRecipe
from foresight.storage import layout
from foresight.storage.claims import ClaimSet

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
class TeachersWorker:
    """The teacher of a task, with the overlapped engine as its shard loop (flows/teachers_engine.py)."""

    def __init__(self, root_url: str, config: TeachersConfig, output: TargetOutput):
        self.config, self.writer = config, output.writer
        self.processes, self.readers, self.writers = resolve_io(config)
        if self.processes:
            start_fork_server()  # boots while the teacher loads
        self.teacher = cached_teacher(config)
        self.identity = self.teacher.identity
        self.video = open_video(root_url, config.video)
        self.observed = ObservedFrames(root_url, self.video)
        self.codec_backend = (compiled_codec(self.writer, self.teacher.device, config.batch)
                              if config.compile_codec else None)

    def write_shards(self, shards: list[int], claims: ClaimSet) -> ShardsResult:
        """Encode the shards this task can claim (the engine takes each through ``claims``)."""
        stats = encode_shards(self.teacher, self.video, self.observed, self.writer, shards, self.config.batch,
                              self.writers, self.readers, claims=claims, io_processes=self.processes,
                              cuda_graphs=self.config.cuda_graphs, codec_backend=self.codec_backend)
        return ShardsResult(shards=stats.shards_written, clips=stats.clips, frames=stats.frames, seconds=stats.seconds)


class TeachersStage(TargetStage[TeachersConfig]):
    """``teacher``: one frozen teacher's maps of the generated and the observed frames."""

    name, config_type = "teachers", TeachersConfig

    def recipe(self, root_url: str, config: TeachersConfig) -> TargetRecipe:
        open_video(root_url, config.video)
        return teacher_recipe(cached_teacher(config), config.video, config.preset, config.store_codec)

    def arrays(self, root_url: str, config: TeachersConfig,
               recipe: TargetRecipe) -> tuple[list[ArraySpec], int, int]:
        video = open_video(root_url, config.video).manifest
        arrays = teacher_arrays(video.num_clips, video.array_spec("frames").shape[1], cached_teacher(config),
                                config.compression, config.store_codec)
        return arrays, video.num_clips, video.shard_size

    def open_worker(self, root_url: str, config: TeachersConfig, output: TargetOutput,
                    shards: list[int]) -> TeachersWorker:
        return TeachersWorker(root_url, config, output)

    def inputs(self, root_url: str, config: TeachersConfig, recipe: TargetRecipe) -> list[str]:
        return [layout.target_dir(config.video)]

    def facets(self, config: TeachersConfig) -> dict[str, Any]:
        identity = cached_teacher(config).identity
        return {**super().facets(config), "model": identity.model_dump(mode="json")}


TEACHERS = TeachersStage()


@flow(name="teachers", log_prints=False)
def teachers_flow(root_url: str, config: TeachersConfig) -> BuildSummary:
    """Run one teacher over a video version and publish the ``teacher`` version (idempotent)."""
    return build(TEACHERS, root_url, config, prefect_tasks(config.workers))
