"""Clip plans, CLIP text targets and SVD video generation (Prefect flows; the maths is in pipelines/).

- :func:`make_plan` writes a content-addressed clip plan from the episode store.
- :func:`text_flow` writes a ``text`` version: ``embedding`` (N, 20, D) float32, the CLIP text
  states of each clip's instruction (computed once per distinct instruction).
- :func:`generate_flow` writes a ``video`` version: ``frames`` (N, T, S, S, 3) uint8, ``onestep``
  (N, T, h, w, C) float16 captured in the first denoising step of the same trajectory, and
  ``seed`` (N,) int64.

Both are :class:`flows.build.Stage` s: flows/build.py begins the version, claims each shard, skips
shards whose ``_done`` marker exists and writes whole shards only, so a killed run resumes where
it stopped and a finished shard is never recomputed.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import numpy as np
from prefect import flow
from pydantic import Field

from foresight.flows.build import BuildSummary, TargetOutput, TargetStage, build, plan_info, plan_rows, prefect_tasks
from foresight.flows.configs import GenerateConfig, PlanConfig, TextConfig
from foresight.flows.models_cache import cached_model
from foresight.pipelines import plan as planning
from foresight.pipelines.svd import SVDParams, clip_seed, generate_clips, load_svd
from foresight.pipelines.svd.features import feature_shape
from foresight.pipelines.svd.loading import SVDDescription, SVDModel, describe_svd
from foresight.pipelines.svd.speed import SpeedOptions, apply_speedups
from foresight.pipelines.text import TextModel, embed_distinct, load_text_model
from foresight.schemas.base import StrictModel
from foresight.schemas.svd import DEFAULT_CROSS_CONTEXT
from foresight.schemas.model import ModelIdentity
from foresight.schemas.plan import ClipRow, PlanInfo
from foresight.schemas.target import ArraySpec, TargetRecipe
from foresight.schemas import refs
from foresight.storage import layout, lineage
from foresight.storage.episodes import EpisodeStore, read_start_frames
from foresight.storage.plans import PlanStore
from foresight.storage.provenance import now_iso
from foresight.storage.targets import TargetReader, TargetStore

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


class TextWorker:
    """Embeds the instructions of a task's shards, each distinct instruction once."""

    def __init__(self, root_url: str, config: TextConfig, output: TargetOutput, shards: list[int]):
        self.model = cached_text_model(config)
        self.identity, self.writer = self.model.identity, output.writer
        rows = plan_rows(root_url, config.plan)
        clips = [i for shard in shards for i in self.writer.shard_clips(shard)]
        # The distinct instructions' states and each clip's row there: not N copies of L x D floats.
        self.states_ULD, state_rows = embed_distinct(self.model, [rows[i].instruction for i in clips],
                                                     config.max_length)
        self.state_of = dict(zip(clips, state_rows.tolist()))

    def compute(self, shard: int) -> dict[str, np.ndarray]:
        return {TEXT_ARRAY: self.states_ULD[[self.state_of[i] for i in self.writer.shard_clips(shard)]]}


class TextStage(TargetStage[TextConfig]):
    """``text``: embedding (N, max_length, D) float32 per plan clip."""

    name, config_type = "text", TextConfig

    def recipe(self, root_url: str, config: TextConfig) -> TargetRecipe:
        plan_info(root_url, config.plan)
        return text_recipe(config, cached_text_model(config).identity)

    def arrays(self, root_url: str, config: TextConfig, recipe: TargetRecipe) -> tuple[list[ArraySpec], int, int]:
        num_clips, width = plan_info(root_url, config.plan).num_clips, cached_text_model(config).width
        return [ArraySpec(name=TEXT_ARRAY, shape=[num_clips, config.max_length, width], dtype="float32")], \
            num_clips, config.shard_size

    def open_worker(self, root_url: str, config: TextConfig, output: TargetOutput, shards: list[int]) -> TextWorker:
        return TextWorker(root_url, config, output, shards)

    def inputs(self, root_url: str, config: TextConfig, recipe: TargetRecipe) -> list[str]:
        return [layout.plan_dir(config.plan)]


TEXT = TextStage()


@flow(name="text", log_prints=False)
def text_flow(root_url: str, config: TextConfig) -> BuildSummary:
    """Write the ``text`` version of a plan (idempotent; resumes a building one)."""
    return build(TEXT, root_url, config, prefect_tasks(config.workers))


# ---------------------------------------------------------------- video generation
def video_params(config: GenerateConfig) -> dict:
    """The keyed parameters of a video version: every SVD setting, the compute dtype, the compile
    scope, attention backends and cross-attention context when not the defaults (they change
    rounding only; ``none``, ``default`` and ``repeat`` are not recorded, so such versions keep the
    ids they always had), the preset, and the sampler and speed recipe when set (the reference
    loop is not recorded either)."""
    params = {**config.params.model_dump(mode="json"), "dtype": config.dtype}
    if params.get("sampler") is None:
        params.pop("sampler", None)
    if config.compile != "none":
        params["compile"] = config.compile
    if config.attention != "default":
        params["attention"] = config.attention
    if config.cross_context != DEFAULT_CROSS_CONTEXT:
        params["cross_context"] = config.cross_context
    if config.recipe is not None:
        params["recipe"] = config.recipe
    return with_preset(params, config.preset)


VIDEO_KEYS_BEYOND_SVD = ("dtype", "compile", "attention", "cross_context", "recipe", "preset")
"""What video_params records beside the SVDParams fields."""


def svd_settings(params: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """video_params' inverse: (the SVDParams fields, the compute dtype) of a video version's keyed
    parameters; the compile scope, attention and cross-context settings, speed recipe and preset it
    also records are left out."""
    settings = {key: value for key, value in params.items() if key not in VIDEO_KEYS_BEYOND_SVD}
    return settings, params.get("dtype", "fp32")


def cached_svd(config: GenerateConfig) -> SVDModel:
    def load() -> SVDModel:
        model = load_svd(config.model, config.device, config.dtype, config.seed)
        return apply_speedups(model, SpeedOptions(compile=config.compile, attention=config.attention,
                                                  cross_context=config.cross_context))

    return cached_model("svd", config.model, config.device, config.dtype, load,
                        extra={"seed": config.seed, "compile": config.compile, "attention": config.attention,
                               "cross_context": config.cross_context})


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
        """uint8 (B, H, W, 3) observed frames of the given clip indices (one read per episode)."""
        frames = read_start_frames(self.root_url, [self.rows[index] for index in clips], self.stores)
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


def with_plan_frames(root_url: str, config: GenerateConfig) -> GenerateConfig:
    """``config`` with ``params.num_frames`` taken from the plan when it was not given; an explicit
    value that differs from the plan's clip length is an error."""
    frames = plan_info(root_url, config.plan).params.get("frames")
    frames = int(plan_rows(root_url, config.plan)[0].num_frames if frames is None else frames)
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
    num_clips = plan_info(root_url, config.plan).num_clips
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


class GenerateWorker:
    """Generates the clips of a task's shards with the cached SVD model."""

    def __init__(self, root_url: str, config: GenerateConfig, output: TargetOutput):
        self.config = with_plan_frames(root_url, config)
        self.model = cached_svd(self.config)
        self.identity, self.writer = self.model.identity, output.writer
        self.rows = plan_rows(root_url, config.plan)
        self.text = open_text(root_url, config.text, config.plan, len(self.rows))
        self.observed = ObservedFrameReader(root_url, self.rows)

    def compute(self, shard: int) -> dict[str, np.ndarray]:
        return generate_shard(self.model, self.config, self.writer.version_id, self.rows, self.text, self.observed,
                              self.writer.shard_clips(shard))


class GenerateStage(TargetStage[GenerateConfig]):
    """``video``: frames, one-step features and seeds of every plan clip."""

    name, config_type = "generate", GenerateConfig

    def recipe(self, root_url: str, config: GenerateConfig) -> TargetRecipe:
        return video_recipe(root_url, config)[0]

    def arrays(self, root_url: str, config: GenerateConfig,
               recipe: TargetRecipe) -> tuple[list[ArraySpec], int, int]:
        config = with_plan_frames(root_url, config)
        _, desc, num_clips = video_recipe(root_url, config)
        return video_arrays(desc, config.params, num_clips, config.compression), num_clips, config.shard_size

    def open_worker(self, root_url: str, config: GenerateConfig, output: TargetOutput,
                    shards: list[int]) -> GenerateWorker:
        return GenerateWorker(root_url, config, output)

    def inputs(self, root_url: str, config: GenerateConfig, recipe: TargetRecipe) -> list[str]:
        return [layout.plan_dir(config.plan), layout.target_dir(config.text)]


GENERATE = GenerateStage()


@flow(name="generate", log_prints=False)
def generate_flow(root_url: str, config: GenerateConfig) -> BuildSummary:
    """Write the ``video`` version of (plan, text, model, settings); idempotent and resumable."""
    return build(GENERATE, root_url, config, prefect_tasks(config.workers))
