"""Clip plans, CLIP text targets and SVD video generation (Prefect flows; the maths is in pipelines/).

- :func:`make_plan` writes a content-addressed clip plan from the episode store.
- :func:`text_flow` writes a ``text`` version: ``embedding`` (N, 20, D) float32, the CLIP text
  states of each clip's instruction (computed once per distinct instruction).
- :func:`generate_flow` writes a ``video`` version: ``frames`` (N, T, S, S, 3) uint8, ``onestep``
  (N, T, h, w, C) float16 captured in the first denoising step of the same trajectory, and
  ``seed`` (N,) int64.

Versions are written shard by shard: a task takes the root URL, the version id and shard
indices, reopens the writer by id, claims each shard, skips shards whose ``_done`` marker exists,
and writes whole shards only. A killed run therefore resumes where it stopped; a finished
shard is never recomputed.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np
from prefect import flow, task
from pydantic import Field

from flows.configs import GenerateConfig, PlanConfig, TextConfig
from flows.models_cache import cached_model
from flows.runtime import split_shards
from pipelines import plan as planning
from pipelines.svd import SVDParams, clip_seed, generate_clips, load_svd
from pipelines.svd.features import feature_shape
from pipelines.svd.loading import SVDDescription, SVDModel, describe_svd
from pipelines.svd.speed import SpeedOptions, apply_speedups
from pipelines.text import TextModel, embed_instructions, load_text_model
from schemas.base import StrictModel
from schemas.model import ModelIdentity
from schemas.plan import ClipRow, PlanInfo
from schemas.target import ArraySpec, TargetRecipe
from schemas import refs
from storage import lineage
from storage.claims import claim_shard, wait_for_version_shards
from storage.episodes import EpisodeStore
from storage.plans import PlanStore
from storage.provenance import now_iso
from storage.targets import TargetReader, TargetStore, TargetWriter

log = logging.getLogger(__name__)

TEXT_STAGE, TEXT_STAGE_VERSION = "clip.text", 1
VIDEO_STAGE, VIDEO_STAGE_VERSION = "svd.generate", 1
TEXT_ARRAY = "embedding"


# ---------------------------------------------------------------- plans
class PlanSummary(StrictModel):
    """What ``make_plan`` did."""

    plan_id: str
    num_clips: int
    created: bool = Field(description="False when an identical plan already existed.")
    params: dict = Field(default_factory=dict)


def resolve_plan_params(config: PlanConfig, store: EpisodeStore) -> planning.PlanParams:
    """Fill in the dataset-dependent defaults and check the camera exists."""
    info = store.info()
    camera = config.camera or next(iter(info.cameras), None)
    if camera is None or camera not in info.cameras:
        raise ValueError(f"dataset '{config.dataset}': no camera {camera!r} (has {sorted(info.cameras)})")
    source = config.source or ("segments" if store.segments() else "episodes")
    return planning.PlanParams(source=source, camera=camera, frames=config.frames, stride=config.stride,
                               every=config.every, limit=config.limit, split=config.split)


def check_plannable(dataset: str, records: list, split: str | None) -> None:
    """Name the real reason a plan would be empty: no episodes at all, or none of the split."""
    if not records:
        raise ValueError(f"dataset '{dataset}': has no episodes (ingest it first, or check its quarantine.jsonl)")
    splits = sorted({r.split for r in records})
    if split is not None and split not in splits:
        raise ValueError(f"dataset '{dataset}': no episodes of split '{split}' (splits present: {splits})")


def make_plan(root_url: str, config: PlanConfig) -> PlanSummary:
    """Write the plan of ``config`` under ``plans/`` (nothing to do when it already exists)."""
    episodes = EpisodeStore(root_url, config.dataset)
    params = resolve_plan_params(config, episodes)
    fingerprint = episodes.fingerprint()
    plan_id = planning.plan_id(config.dataset, fingerprint, params)
    plans = PlanStore(root_url)
    if plans.exists(plan_id):
        info = plans.info(plan_id)
        return PlanSummary(plan_id=plan_id, num_clips=info.num_clips, created=False, params=info.params)
    records = list(episodes.records())
    check_plannable(config.dataset, records, params.split)
    rows = planning.make_clips(config.dataset, records, episodes.segments(), params)
    if not rows:
        raise ValueError(f"dataset '{config.dataset}': no clip of {params.frames} frames (stride {params.stride}) "
                         f"fits its {params.source}; lower --frames or --stride")
    info = PlanInfo(plan_id=plan_id, dataset=config.dataset, dataset_fingerprint=fingerprint,
                    params=params.model_dump(mode="json"), num_clips=len(rows), created=now_iso())
    plans.write(info, rows)
    lineage.emit(root_url, "plan", str(uuid.uuid4()), inputs=[refs.dataset(config.dataset)],
                 outputs=[refs.plan(plan_id)], facets={"params": info.params})
    return PlanSummary(plan_id=plan_id, num_clips=len(rows), created=True, params=info.params)


# ---------------------------------------------------------------- shared shard plumbing
class ShardsResult(StrictModel):
    """What one shard task wrote."""

    shards: list[int] = Field(default_factory=list, description="Shards this task wrote.")
    clips: int = 0
    seconds: float = 0.0


class BuildSummary(StrictModel):
    """What a text or generate run did."""

    version: str
    status: str
    skipped: bool = Field(description="True when the version was already complete (nothing computed).")
    shards_written: int = 0
    clips: int = 0
    seconds: float = 0.0
    clips_per_hour: float = 0.0


def write_owned_shards(root_url: str, writer: TargetWriter, shards: list[int], compute) -> ShardsResult:
    """For each shard not done and not held by another builder: claim it, ``compute(shard)`` the
    arrays of its clips and write them (data, then the _done marker)."""
    result, start = ShardsResult(), time.perf_counter()
    for shard in shards:
        with claim_shard(root_url, writer.version_id, shard, is_done=lambda s=shard: writer.is_done(s)) as owned:
            if owned is None:
                continue
            writer.write_shard(shard, compute(shard))
            result.shards.append(shard)
            result.clips += len(writer.shard_clips(shard))
    result.seconds = time.perf_counter() - start
    return result


def run_shard_tasks(root_url: str, writer: TargetWriter, submit, workers: int) -> list[ShardsResult]:
    """Submit shard tasks over the pending shards, then pick up shards other builders abandoned
    and wait for those they still hold."""
    futures = [submit(group) for group in split_shards(writer.pending_shards(), workers)]
    results = [future.result() for future in futures]
    wait_for_version_shards(writer, lambda free: results.extend(f.result() for f in [submit(free)]))
    return results


def summarize(writer: TargetWriter, results: list[ShardsResult], seconds: float) -> BuildSummary:
    """Finalize the version with its timings and report what this run computed."""
    clips = sum(r.clips for r in results)
    rate = clips * 3600.0 / seconds if seconds > 0 and clips else 0.0
    manifest = writer.finalize(timings={"seconds": round(seconds, 3), "clips_per_hour": round(rate, 1)})
    return BuildSummary(version=writer.version_id, status=manifest.status, skipped=False,
                        shards_written=sum(len(r.shards) for r in results), clips=clips,
                        seconds=round(seconds, 3), clips_per_hour=round(rate, 1))


def plan_rows(root_url: str, plan_id: str) -> list[ClipRow]:
    rows = PlanStore(root_url).rows(plan_id)
    if not rows:
        raise ValueError(f"plan '{plan_id}' has no clips")
    return rows


# ---------------------------------------------------------------- text targets
def with_preset(params: dict[str, Any], preset: str | None) -> dict[str, Any]:
    """A recipe's keyed parameters plus the preset's name when one was applied (a version built
    without a preset keeps the id it always had)."""
    return {**params, "preset": preset} if preset is not None else params


def text_recipe(config: TextConfig, identity: ModelIdentity) -> TargetRecipe:
    """The recipe (hence the version id) of a text version: model, token length, preset, plan."""
    return TargetRecipe(kind="text", stage=TEXT_STAGE, stage_version=TEXT_STAGE_VERSION, model=identity,
                        params=with_preset({"max_length": config.max_length}, config.preset),
                        inputs={"plan": config.plan})


def cached_text_model(config: TextConfig) -> TextModel:
    return cached_model("clip-text", config.model, config.device, "fp32",
                        lambda: load_text_model(config.model, config.device, config.seed), extra={"seed": config.seed})


def open_pending(root_url: str, version_id: str, shards: list[int]) -> tuple[TargetWriter, list[int]]:
    """Reopen a building version by id and keep the given shards that are not written yet."""
    writer = TargetStore(root_url).writer(version_id)
    return writer, [shard for shard in shards if not writer.is_done(shard)]


def check_identity(loaded: ModelIdentity, recorded: ModelIdentity | None, version_id: str) -> None:
    """Refuse to add shards made by other weights than the version records."""
    if recorded is None or loaded.key() != recorded.key():
        raise ValueError(f"target version '{version_id}': the loaded model {loaded.spec} is not the one the "
                         "version was started with (weights or seed changed); start a new version")


@task(retries=1, retry_delay_seconds=1)
def text_shards_task(root_url: str, version_id: str, config: TextConfig, shards: list[int]) -> ShardsResult:
    """Embed the instructions of the given shards (each distinct instruction once) and write them."""
    writer, todo = open_pending(root_url, version_id, shards)
    if not todo:
        return ShardsResult()
    model = cached_text_model(config)
    check_identity(model.identity, writer.manifest.recipe.model, version_id)
    rows = plan_rows(root_url, config.plan)
    clips = [i for s in todo for i in writer.shard_clips(s)]
    states = embed_instructions(model, [rows[i].instruction for i in clips], config.max_length)
    row_of = {clip: n for n, clip in enumerate(clips)}

    def compute(shard: int) -> dict[str, np.ndarray]:
        return {TEXT_ARRAY: states[[row_of[i] for i in writer.shard_clips(shard)]]}

    return write_owned_shards(root_url, writer, todo, compute)


@flow(name="text", log_prints=False)
def text_flow(root_url: str, config: TextConfig) -> BuildSummary:
    """Write the ``text`` version of a plan (idempotent; resumes a building one)."""
    rows = plan_rows(root_url, config.plan)
    model = cached_text_model(config)
    recipe = text_recipe(config, model.identity)
    store, version_id = TargetStore(root_url), recipe.version_id()
    if store.status(version_id) == "complete":
        return BuildSummary(version=version_id, status="complete", skipped=True)
    arrays = [ArraySpec(name=TEXT_ARRAY, shape=[len(rows), config.max_length, model.width], dtype="float32")]
    writer = store.begin(recipe, arrays, len(rows), config.shard_size)
    start = time.perf_counter()
    results = run_shard_tasks(root_url, writer, lambda group: text_shards_task.submit(root_url, version_id, config,
                                                                                      group), config.workers)
    summary = summarize(writer, results, time.perf_counter() - start)
    lineage.emit(root_url, "text", str(uuid.uuid4()), inputs=[refs.plan(config.plan)],
                 outputs=[refs.version(version_id)], facets={"config": config.model_dump(mode="json")})
    return summary


# ---------------------------------------------------------------- video generation
def video_params(config: GenerateConfig) -> dict:
    """The keyed parameters of a video version: every SVD setting, the compute dtype, the compile
    scope when there is one (compiled kernels round differently; ``none`` is not recorded, so
    uncompiled versions keep the ids they always had) and the preset."""
    params = {**config.params.model_dump(mode="json"), "dtype": config.dtype}
    if config.compile != "none":
        params["compile"] = config.compile
    return with_preset(params, config.preset)


def cached_svd(config: GenerateConfig) -> SVDModel:
    def load() -> SVDModel:
        model = load_svd(config.model, config.device, config.dtype, config.seed)
        return apply_speedups(model, SpeedOptions(compile=config.compile))

    return cached_model("svd", config.model, config.device, config.dtype, load,
                        extra={"seed": config.seed, "compile": config.compile})


def open_text(root_url: str, text_id: str, plan_id: str, num_clips: int) -> TargetReader:
    """The complete text version of ``plan_id``; ValueError naming the mismatch otherwise."""
    store = TargetStore(root_url)
    if store.status(text_id) != "complete":
        raise ValueError(f"text version '{text_id}': not complete under {store.root.url} "
                         f"(status {store.status(text_id)!r}); run `foresight text` first")
    reader = store.open(text_id)
    if reader.manifest.kind != "text" or reader.manifest.recipe.input_ids().get("plan") != plan_id:
        raise ValueError(f"version '{text_id}' is not a text version of plan '{plan_id}'")
    if reader.manifest.num_clips != num_clips:
        raise ValueError(f"text version '{text_id}': {reader.manifest.num_clips} clips, plan has {num_clips}")
    return reader


class ObservedFrameReader:
    """Frame ``start`` of each clip's episode camera: the conditioning frame."""

    def __init__(self, root_url: str, rows: list[ClipRow]):
        self.root_url, self.rows = root_url, rows
        self.stores: dict[str, EpisodeStore] = {}

    def read(self, clips: list[int]) -> np.ndarray:
        """uint8 (B, H, W, 3) observed frames of the given clip indices."""
        frames = []
        for index in clips:
            row = self.rows[index]
            store = self.stores.setdefault(row.dataset, EpisodeStore(self.root_url, row.dataset))
            frames.append(store.read_frames(row.episode_id, row.camera, [row.start])[0])
        if len({f.shape for f in frames}) > 1:
            raise ValueError(f"clips {clips[0]}..{clips[-1]}: observed frames differ in size "
                             f"{sorted({f.shape for f in frames})}")
        return np.stack(frames)


def generate_shard(model: SVDModel, config: GenerateConfig, version_id: str, rows: list[ClipRow],
                   text: TargetReader, observed: ObservedFrameReader, clips: range) -> dict[str, np.ndarray]:
    """Arrays of one shard: its clips generated ``config.batch`` at a time."""
    frames, onestep = [], []
    seeds = np.array([clip_seed(version_id, rows[i].clip_id) for i in clips], dtype=np.int64)
    for first in range(0, len(clips), config.batch):
        batch = list(clips[first:first + config.batch])
        states = text.read(TEXT_ARRAY, slice(batch[0], batch[-1] + 1))
        out = generate_clips(model, config.params, observed.read(batch), states, seeds[first:first + len(batch)])
        frames.append(out.frames)
        onestep.append(out.onestep)
    return {"frames": np.concatenate(frames), "onestep": np.concatenate(onestep), "seed": seeds}


def generate_shards(root_url: str, version_id: str, config: GenerateConfig, shards: list[int]) -> ShardsResult:
    """Generate and write the given shards of a building video version (done shards are skipped).
    The body of :func:`generate_shards_task`, callable without Prefect."""
    config = with_plan_frames(root_url, config)
    writer, todo = open_pending(root_url, version_id, shards)
    if not todo:
        return ShardsResult()
    model = cached_svd(config)
    check_identity(model.identity, writer.manifest.recipe.model, version_id)
    rows = plan_rows(root_url, config.plan)
    text = open_text(root_url, config.text, config.plan, len(rows))
    observed = ObservedFrameReader(root_url, rows)
    return write_owned_shards(root_url, writer, todo, lambda shard: generate_shard(
        model, config, version_id, rows, text, observed, writer.shard_clips(shard)))


@task(retries=1, retry_delay_seconds=1)
def generate_shards_task(root_url: str, version_id: str, config: GenerateConfig, shards: list[int]) -> ShardsResult:
    """Prefect task over :func:`generate_shards` (takes ids and URLs, returns a small record)."""
    return generate_shards(root_url, version_id, config, shards)


def with_plan_frames(root_url: str, config: GenerateConfig) -> GenerateConfig:
    """``config`` with ``params.num_frames`` taken from the plan when it was not given; an explicit
    value that differs from the plan's clip length is an error."""
    rows = plan_rows(root_url, config.plan)
    frames = int(PlanStore(root_url).info(config.plan).params.get("frames", rows[0].num_frames))
    if "num_frames" not in config.params.model_fields_set:
        return config.model_copy(update={"params": config.params.model_copy(update={"num_frames": frames})})
    if config.params.num_frames != frames:
        raise ValueError(f"plan '{config.plan}' has clips of {frames} frames but num_frames is "
                         f"{config.params.num_frames}")
    return config


def video_recipe(root_url: str, config: GenerateConfig) -> tuple[TargetRecipe, SVDDescription, int]:
    """The recipe (hence the version id) of ``config``, the model description and the clip count.
    Checks the inputs: the plan exists, its clip length matches, the text version belongs to it."""
    config = with_plan_frames(root_url, config)
    num_clips = len(plan_rows(root_url, config.plan))
    open_text(root_url, config.text, config.plan, num_clips)
    desc = describe_svd(config.model, config.seed)
    recipe = TargetRecipe(kind="video", stage=VIDEO_STAGE, stage_version=VIDEO_STAGE_VERSION, model=desc.identity,
                          params=video_params(config), inputs={"plan": config.plan, "text": config.text})
    return recipe, desc, num_clips


def video_arrays(desc: SVDDescription, params: SVDParams, num_clips: int,
                 compression: str = "zstd") -> list[ArraySpec]:
    """frames (N, T, S, S, 3) uint8, onestep (N, T, h, w, C) float16 (stored with ``compression``), seed (N,)."""
    h, w, channels = feature_shape(desc.unet_config, desc.vae_config, params.size, params.feature_blocks)
    n, t, s = num_clips, params.num_frames, params.size
    return [ArraySpec(name="frames", shape=[n, t, s, s, 3], dtype="uint8"),
            ArraySpec(name="onestep", shape=[n, t, h, w, channels], dtype="float16", compression=compression),
            ArraySpec(name="seed", shape=[n], dtype="int64")]


def begin_video(root_url: str, config: GenerateConfig) -> tuple[TargetWriter | None, str]:
    """Key the video version of ``config`` and open it for writing; (None, id) when complete."""
    config = with_plan_frames(root_url, config)
    recipe, desc, num_clips = video_recipe(root_url, config)
    store, version_id = TargetStore(root_url), recipe.version_id()
    if store.status(version_id) == "complete":
        return None, version_id
    arrays = video_arrays(desc, config.params, num_clips, config.compression)
    return store.begin(recipe, arrays, num_clips, config.shard_size), version_id


@flow(name="generate", log_prints=False)
def generate_flow(root_url: str, config: GenerateConfig) -> BuildSummary:
    """Write the ``video`` version of (plan, text, model, settings); idempotent and resumable."""
    config = with_plan_frames(root_url, config)
    writer, version_id = begin_video(root_url, config)
    if writer is None:
        return BuildSummary(version=version_id, status="complete", skipped=True)
    start = time.perf_counter()
    results = run_shard_tasks(root_url, writer, lambda group: generate_shards_task.submit(
        root_url, version_id, config, group), config.workers)
    summary = summarize(writer, results, time.perf_counter() - start)
    lineage.emit(root_url, "generate", str(uuid.uuid4()),
                 inputs=[refs.plan(config.plan), refs.version(config.text)], outputs=[refs.version(version_id)],
                 facets={"config": config.model_dump(mode="json")})
    return summary
