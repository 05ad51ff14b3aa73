"""Prefect flow: π0 teacher targets over a clip plan, written as a ``pi0`` target version.

Per clip: the observation (first frame of each chosen camera), the instruction, the state at the
first frame and the next 50 actions (pipelines.pi0.assemble_sample), then the teacher's velocity
at K fixed (t, noise-seed) pairs and its action->VL attention at the chosen layers
(pipelines.pi0.compute_targets). Shard by shard: a shard with a ``_done`` marker is skipped and
a claimed shard is left to its holder, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from prefect import flow, task

from flows.configs import Pi0TargetsConfig
from pipelines import pi0
from schemas.base import StrictModel
from schemas.dataset import DatasetInfo
from schemas.plan import ClipRow
from schemas.target import ArraySpec, TargetRecipe
from flows.runtime import RunnerChoice, run_flow
from schemas import refs
from storage import lineage
from storage.claims import claim_shard, wait_for_version_shards
from storage.episodes import EpisodeStore
from storage.fs import open_root
from storage.plans import PlanStore
from storage.targets import TargetStore

log = logging.getLogger(__name__)


class Pi0ShardsResult(StrictModel):
    """What one task wrote."""

    shards: list[int]
    clips: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------- model cache (one per process)
_MODELS: dict[str, pi0.LoadedPi0] = {}
_MODELS_LOCK = threading.Lock()


def cached_model(config: Pi0TargetsConfig) -> pi0.LoadedPi0:
    """The teacher of ``config``, loaded once per process (workers reuse it across tasks)."""
    key = config.model_dump_json(include={"model", "family", "device", "dtype", "tiny_layers"})
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS.clear()  # one model per worker: free the previous one first
            _MODELS[key] = pi0.load_pi0(config.model, config.device, config.dtype, config.tiny_layers,
                                        config.family)
        return _MODELS[key]


# ---------------------------------------------------------------- version layout
def plan_rows(root_url: str, config: Pi0TargetsConfig) -> list[ClipRow]:
    rows = PlanStore(root_url).rows(config.plan)
    if not rows:
        raise ValueError(f"plan '{config.plan}': no clips")
    return rows[: config.limit] if config.limit else rows


def resolve_params(config: Pi0TargetsConfig, rows: list[ClipRow], info: DatasetInfo,
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


# ---------------------------------------------------------------- tasks and flow
def compute_shard(writer: Any, shard_index: int, rows: list[ClipRow], reader: SampleReader,
                  loaded: pi0.LoadedPi0, params: pi0.Pi0TargetParams, config: Pi0TargetsConfig) -> int:
    """Compute and write one whole shard (one writer per shard); returns its clip count."""
    clips = writer.shard_clips(shard_index)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(clips.start, clips.stop, config.batch):
        batch_rows = rows[start: min(start + config.batch, clips.stop)]
        samples = pi0.stack_samples([reader.sample(row) for row in batch_rows])
        parts.append(pi0.compute_targets(loaded.model, samples, [row.clip_id for row in batch_rows],
                                         writer.version_id, params, config.device))
    arrays = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    writer.write_shard(shard_index, arrays)
    return len(clips)


@task(name="pi0-targets-shards", retries=1, retry_delay_seconds=2)
def write_shards(root_url: str, version_id: str, shard_indices: list[int], config: Pi0TargetsConfig) -> Pi0ShardsResult:
    """Write the given shards of a building pi0 version (skipping done or claimed ones)."""
    started = time.perf_counter()
    writer = TargetStore(root_url).writer(version_id)
    params = pi0.Pi0TargetParams(**{k: v for k, v in writer.manifest.recipe.params.items() if k != "num_clips"})
    loaded = cached_model(config)
    if loaded.identity.key() != writer.manifest.recipe.model.key():
        raise ValueError(f"target version '{version_id}' was begun with another teacher than {config.model!r}")
    rows = plan_rows(root_url, config)
    reader = SampleReader(root_url, params, loaded.tokenizer, loaded.identity.family)
    written, clips = [], 0
    for index in shard_indices:
        with claim_shard(root_url, version_id, index, is_done=lambda i=index: writer.is_done(i)) as owned:
            if owned:
                clips += compute_shard(writer, index, rows, reader, loaded, params, config)
                written.append(index)
    return Pi0ShardsResult(shards=written, clips=clips, seconds=time.perf_counter() - started)


def resolve_version(root_url: str, config: Pi0TargetsConfig) -> tuple[TargetRecipe, list[ArraySpec], int]:
    """The recipe (hence the version id), array layout and clip count of ``config``; loads the teacher."""
    rows = plan_rows(root_url, config)
    datasets = sorted({row.dataset for row in rows})
    if len(datasets) != 1:
        raise ValueError(f"plan '{config.plan}': clips from several datasets {datasets}")
    episodes = EpisodeStore(root_url, datasets[0])
    loaded = cached_model(config)
    params = resolve_params(config, rows, episodes.info(), loaded)
    recipe = pi0_recipe(loaded, params, config.plan, len(rows), episodes.fingerprint())
    return recipe, pi0_arrays(params, loaded.model.config, len(rows)), len(rows)


def begin_version(root_url: str, config: Pi0TargetsConfig) -> tuple[Any, bool]:
    """(writer, False) for a version to build, or (its manifest, True) when it is already complete."""
    recipe, arrays, num_clips = resolve_version(root_url, config)
    store = TargetStore(root_url)
    if store.status(recipe.version_id()) == "complete":
        return store.manifest(recipe.version_id()), True
    return store.begin(recipe, arrays, num_clips, config.shard_size), False


def complete_result(version_id: str) -> dict[str, Any]:
    return {"version": version_id, "status": "complete", "clips": 0, "seconds": 0.0}


ShardRunner = Callable[[str, list[int]], list[Pi0ShardsResult]]
"""Runs shard tasks: (version id, shard indices) -> their results."""


def build_version(root_url: str, config: Pi0TargetsConfig, run_shards: ShardRunner) -> dict[str, Any]:
    """Build (or finish) the pi0 version of ``config``, handing pending shards to ``run_shards``."""
    started = time.perf_counter()
    writer, complete = begin_version(root_url, config)
    if complete:
        log.info("pi0 version %s is already complete", writer.id)
        return complete_result(writer.id)
    results = run_shards(writer.version_id, writer.pending_shards())
    # Shards another builder held (or released after an error) are waited for or run here.
    wait_for_version_shards(writer, lambda shards: results.extend(run_shards(writer.version_id, shards)))
    seconds = time.perf_counter() - started
    clips = sum(r.clips for r in results)
    manifest = writer.finalize(timings={"pi0_targets_s": seconds,
                                        "samples_per_s": clips / seconds if seconds > 0 else 0.0})
    lineage.emit(root_url, "pi0-targets", str(uuid.uuid4()), inputs=[refs.plan(config.plan)],
                 outputs=[refs.version(manifest.id)], facets={"model": config.model, "clips": clips})
    return {"version": manifest.id, "status": manifest.status, "clips": clips, "seconds": seconds}


def run_here(root_url: str, config: Pi0TargetsConfig) -> ShardRunner:
    """A shard runner that computes in this process, without Prefect (tests, notebooks)."""
    return lambda version_id, shards: [write_shards.fn(root_url, version_id, shards, config)]


@flow(name="pi0-targets")
def pi0_targets_flow(root_url: str, config: Pi0TargetsConfig, workers: int = 1) -> dict[str, Any]:
    """Build (or finish) the pi0 target version of ``config``; returns its id, status and throughput.

    ``workers``: shard tasks in flight (each holds the teacher once per process); 0 = one task per shard.
    """

    def run_shards(version_id: str, shards: list[int]) -> list[Pi0ShardsResult]:
        tasks = len(shards) if workers == 0 else min(workers, len(shards))
        groups = [shards[i::tasks] for i in range(tasks)]
        # On Dask the runner gives each task whose config names a CUDA device one GPU resource.
        futures = [write_shards.submit(root_url, version_id, group, config) for group in groups]
        return [future.result() for future in futures]

    return build_version(root_url, config, run_shards)


def run_pi0_targets(root: Any, config: Pi0TargetsConfig, runner: RunnerChoice | None = None) -> dict[str, Any]:
    """Run the flow on the chosen task runner (local threads by default); a version that is
    already complete returns at once, without starting Prefect."""
    choice = runner or RunnerChoice()
    root_obj = open_root(root)
    recipe, _, _ = resolve_version(root_obj.url, config)
    if TargetStore(root_obj).status(recipe.version_id()) == "complete":
        return complete_result(recipe.version_id())
    # An existing cluster spreads one task per shard over its workers; locally, one per worker.
    workers = 0 if choice.dask_address is not None else (choice.dask_local or choice.workers)
    return run_flow(pi0_targets_flow, choice, root_obj, root_url=root_obj.url, config=config, workers=workers)
