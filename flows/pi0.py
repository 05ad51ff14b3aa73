"""Prefect flow: π0 teacher targets over a clip plan, written as a ``pi0`` target version.

Per clip: the observation (first frame of each chosen camera), the instruction, the state at the
first frame and the next 50 actions (pipelines.pi0.assemble_sample), then the teacher's velocity
at K fixed (t, noise-seed) pairs and its action->VL attention at the chosen layers
(pipelines.pi0.compute_targets). Built through flows/build.py, shard by shard: a shard with a
``_done`` marker is skipped and a claimed shard is left to its holder, so a killed run resumes
where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from prefect import flow

from foresight.flows.build import BuildSummary, TargetOutput, TargetStage, build, plan_rows, prefect_tasks, run_build
from foresight.flows.configs import Pi0TargetsConfig
from foresight.flows.models_cache import cached_model
from foresight.flows.runtime import RunnerChoice
from foresight.pipelines import pi0
from foresight.schemas.dataset import DatasetInfo
from foresight.schemas.plan import ClipRow
from foresight.schemas.target import ArraySpec, TargetRecipe
from foresight.storage import layout
from foresight.storage.episodes import EpisodeStore

log = logging.getLogger(__name__)





def cached_pi0(config: Pi0TargetsConfig) -> pi0.LoadedPi0:
    """The teacher of ``config``, loaded once per process (workers reuse it across tasks)."""
    return cached_model("pi0", config.model, config.device, config.dtype,
                        lambda: pi0.load_pi0(config.model, config.device, config.dtype, config.tiny_layers,
                                             config.family),
                        extra={"family": config.family, "tiny_layers": config.tiny_layers})


# ---------------------------------------------------------------- version layout
def limited_rows(root_url: str, config: Pi0TargetsConfig) -> Sequence[ClipRow]:
    """The plan's clips, only the first ``config.limit`` when set."""
    rows = plan_rows(root_url, config.plan)
    return rows[: config.limit] if config.limit else rows


def resolve_params(config: Pi0TargetsConfig, rows: Sequence[ClipRow], info: DatasetInfo,
                   loaded: pi0.LoadedPi0) -> pi0.Pi0TargetParams:
    """The version parameters: explicit settings plus what the plan, dataset and model imply."""
    cameras = config.cameras or sorted({row.camera for row in rows})
    if len(cameras) != 1 and not config.cameras:
        raise ValueError(f"plan '{config.plan}': clips use cameras {cameras}; pass --cameras")
    missing = [c for c in cameras if c not in info.cameras]
    if missing:
        raise ValueError(f"dataset '{info.name}': no camera {missing} (has {sorted(info.cameras)})")
    for key in (config.state_key, config.action_key):
        if key not in info.features:
            raise ValueError(f"dataset '{info.name}': no low-dim column '{key}' (has {sorted(info.features)})")
    depth = pi0.num_layers(loaded.model)
    attn_layers = pi0.default_attn_layers(depth) if config.attn_layers is None else sorted(set(config.attn_layers))
    if config.pairs == 0:  # inputs only: no attention is stored, so none may key the version
        if config.attn_layers:
            log.warning("--attn-layers %s ignored: --pairs 0 stores the inputs only", config.attn_layers)
        attn_layers = []
    if any(not 0 <= layer < depth for layer in attn_layers):
        raise ValueError(f"attn layers {attn_layers}: the teacher has layers 0..{depth - 1}")
    return pi0.Pi0TargetParams(
        pairs=config.pairs, attn_layers=attn_layers, attn_dtype=config.attn_dtype, cameras=cameras,
        state_key=config.state_key, action_key=config.action_key, state_indices=config.state_indices,
        normalization=normalization(config, info), max_text_tokens=config.max_text_tokens,
        tokenizer=loaded.tokenizer_kind, image_size=pi0.image_size(loaded.model.config), dtype=config.dtype,
        chunk_size=loaded.model.config.chunk_size, max_dim=loaded.model.config.max_action_dim)


def normalization(config: Pi0TargetsConfig, info: DatasetInfo) -> dict[str, dict[str, list[float]]]:
    """Mean/std of state (restricted to ``state_indices``) and actions, as stored in the recipe."""
    if config.normalize == "none":
        return {}
    stats = info.stats or {}
    present = config.state_key in stats and config.action_key in stats
    if not present:
        if config.normalize == "dataset":
            raise ValueError(f"dataset '{info.name}': no statistics for '{config.state_key}' and "
                             f"'{config.action_key}'; compute them first or pass --normalize none")
        log.warning("dataset '%s' has no statistics: state and actions are not normalised", info.name)
        return {}
    state, action = stats[config.state_key], stats[config.action_key]
    pick = config.state_indices if config.state_indices is not None else list(range(len(state.mean)))
    return {"state": {"mean": [state.mean[i] for i in pick], "std": [state.std[i] for i in pick]},
            "action": {"mean": list(action.mean), "std": list(action.std)}}


def pi0_recipe(loaded: pi0.LoadedPi0, params: pi0.Pi0TargetParams, plan_id: str, num_clips: int,
               dataset_fingerprint: str) -> TargetRecipe:
    return TargetRecipe(kind="pi0", stage=pi0.STAGE, stage_version=pi0.STAGE_VERSION, model=loaded.identity,
                        params={**params.model_dump(mode="json"), "num_clips": num_clips},
                        inputs={"plan": plan_id, "dataset": dataset_fingerprint})


def pi0_arrays(params: pi0.Pi0TargetParams, model_config: Any, num_clips: int) -> list[ArraySpec]:
    return [ArraySpec(name=name, shape=[num_clips, *shape], dtype=dtype)
            for name, (shape, dtype) in pi0.array_shapes(params, model_config).items()]


# ---------------------------------------------------------------- reading samples
class SampleReader:
    """Reads the raw observation of plan rows from the episode store (columns cached per episode)."""

    def __init__(self, root_url: str, params: pi0.Pi0TargetParams, tokenizer: Any | None, family: str = "pi0"):
        self.root_url, self.params, self.tokenizer, self.family = root_url, params, tokenizer, family
        self.stores: dict[str, EpisodeStore] = {}
        self.columns: dict[tuple[str, str, str], np.ndarray] = {}

    def column(self, row: ClipRow, name: str) -> np.ndarray:
        key = (row.dataset, row.episode_id, name)
        if key not in self.columns:
            if len(self.columns) > 64:
                self.columns.clear()
            self.columns[key] = self.store(row).read_column(row.episode_id, name)
        return self.columns[key]

    def store(self, row: ClipRow) -> EpisodeStore:
        return self.stores.setdefault(row.dataset, EpisodeStore(self.root_url, row.dataset))

    def sample(self, row: ClipRow) -> dict[str, np.ndarray]:
        """The stored input arrays of one clip (see pipelines.pi0.assemble_sample)."""
        where = f"dataset '{row.dataset}', episode '{row.episode_id}', clip '{row.clip_id}'"
        states = self.column(row, self.params.state_key)
        actions = self.column(row, self.params.action_key)
        if not 0 <= row.start < min(len(states), len(actions)):
            raise ValueError(f"{where}: start frame {row.start} is outside the episode ({len(actions)} frames)")
        images = np.stack([self.store(row).read_frames(row.episode_id, camera, [row.start])[0]
                           for camera in self.params.cameras])
        try:
            return pi0.assemble_sample(images, row.instruction, states[row.start],
                                       actions[row.start: row.start + self.params.chunk_size],
                                       self.params, self.tokenizer, self.family)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


# ---------------------------------------------------------------- the stage
class Pi0Worker:
    """The cached teacher and the sample reader of a task."""

    def __init__(self, root_url: str, config: Pi0TargetsConfig, output: TargetOutput):
        self.config, self.writer = config, output.writer
        recorded = self.writer.manifest.recipe.params
        self.params = pi0.Pi0TargetParams(**{k: v for k, v in recorded.items() if k != "num_clips"})
        self.loaded = cached_pi0(config)
        self.identity = self.loaded.identity
        self.rows = limited_rows(root_url, config)
        self.reader = SampleReader(root_url, self.params, self.loaded.tokenizer, self.loaded.identity.family)

    def compute(self, shard: int) -> dict[str, np.ndarray]:
        """The arrays of one whole shard, ``config.batch`` samples per teacher forward."""
        clips, batch = self.writer.shard_clips(shard), self.config.batch
        parts: list[dict[str, np.ndarray]] = []
        for start in range(clips.start, clips.stop, batch):
            batch_rows = self.rows[start: min(start + batch, clips.stop)]
            samples = pi0.stack_samples([self.reader.sample(row) for row in batch_rows])
            parts.append(pi0.compute_targets(self.loaded.model, samples, [row.clip_id for row in batch_rows],
                                             self.writer.version_id, self.params, self.config.device))
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def resolve_version(root_url: str, config: Pi0TargetsConfig) -> tuple[TargetRecipe, list[ArraySpec], int]:
    """The recipe (hence the version id), array layout and clip count of ``config``; loads the teacher."""
    rows = limited_rows(root_url, config)
    datasets = sorted({row.dataset for row in rows})
    if len(datasets) != 1:
        raise ValueError(f"plan '{config.plan}': clips from several datasets {datasets}")
    episodes = EpisodeStore(root_url, datasets[0])
    loaded = cached_pi0(config)
    params = resolve_params(config, rows, episodes.info(), loaded)
    recipe = pi0_recipe(loaded, params, config.plan, len(rows), episodes.fingerprint())
    return recipe, pi0_arrays(params, loaded.model.config, len(rows)), len(rows)


class Pi0Stage(TargetStage[Pi0TargetsConfig]):
    """``pi0``: the inputs, velocities and attention of a π0 teacher over plan clips."""

    name, config_type = "pi0-targets", Pi0TargetsConfig

    def recipe(self, root_url: str, config: Pi0TargetsConfig) -> TargetRecipe:
        return resolve_version(root_url, config)[0]

    def arrays(self, root_url: str, config: Pi0TargetsConfig,
               recipe: TargetRecipe) -> tuple[list[ArraySpec], int, int]:
        _, arrays, num_clips = resolve_version(root_url, config)
        return arrays, num_clips, config.shard_size

    def open_worker(self, root_url: str, config: Pi0TargetsConfig, output: TargetOutput,
                    shards: list[int]) -> Pi0Worker:
        return Pi0Worker(root_url, config, output)

    def inputs(self, root_url: str, config: Pi0TargetsConfig, recipe: TargetRecipe) -> list[str]:
        return [layout.plan_dir(config.plan)]


PI0 = Pi0Stage()


@flow(name="pi0-targets")
def pi0_targets_flow(root_url: str, config: Pi0TargetsConfig) -> BuildSummary:
    """Build (or finish) the pi0 target version of ``config`` in ``config.workers`` shard tasks."""
    return build(PI0, root_url, config, prefect_tasks(config.workers))


def run_pi0_targets(root: Any, config: Pi0TargetsConfig, runner: RunnerChoice | None = None) -> BuildSummary:
    """Run the flow on the chosen task runner (local threads by default); a version that is
    already complete returns at once, without starting Prefect."""
    return run_build(pi0_targets_flow, PI0, root, config, runner or RunnerChoice(workers=config.workers))
