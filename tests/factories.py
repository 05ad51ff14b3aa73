"""Factory helpers that write tiny datasets and episodes into a store (used across test files)."""

from __future__ import annotations

import numpy as np

from foresight.schemas.dataset import DatasetInfo, EpisodeRecord, FeatureSpec
from foresight.schemas.model import ModelIdentity
from foresight.schemas.plan import ClipRow, PlanInfo
from foresight.schemas.target import ArraySpec, TargetRecipe, content_id
from foresight.storage.episodes import EpisodeStore
from foresight.storage.plans import PlanStore
from foresight.storage.targets import TargetStore

FEATURES = {"action": FeatureSpec(dtype="float32", shape=[4]), "state": FeatureSpec(dtype="float32", shape=[6])}


def make_dataset(root, name: str = "toy", camera: str = "cam", size: int = 16) -> EpisodeStore:
    """An empty synthetic dataset with one camera and action/state features."""
    store = EpisodeStore(root, name)
    store.write_info(DatasetInfo(name=name, source_kind="synthetic", source="tests", source_fingerprint="f0",
                                 fps=10.0, cameras={camera: [size, size, 3]}, features=FEATURES))
    return store


def episode_arrays(length: int, size: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random frames and low-dim columns of one episode."""
    rng = np.random.default_rng(seed)
    return {
        "frames": rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8),
        "action": rng.uniform(-1, 1, (length, 4)).astype(np.float32),
        "state": rng.normal(size=(length, 6)).astype(np.float32),
    }


def write_episode(store: EpisodeStore, episode_id: str, length: int = 20, seed: int = 0, camera: str = "cam",
                  task: str = "reach", checksum: str | None = None) -> dict[str, np.ndarray]:
    """Write one episode in blocks of 7 frames (exercises partial shards); returns its arrays."""
    size = store.info().cameras[camera][0]
    arrays = episode_arrays(length, size, seed)
    record = EpisodeRecord(episode_id=episode_id, task=task, instructions=[f"{task} the thing"], length=length,
                           success=True, source_path=f"tests://{episode_id}", source_checksum=checksum or f"c{seed}")
    with store.writer(record, FEATURES) as writer:
        for start in range(0, length, 7):
            writer.append_frames(camera, arrays["frames"][start:start + 7])
        writer.set_lowdim({"action": arrays["action"], "state": arrays["state"]})
    return arrays


def make_version(root, kind: str, stage: str, arrays: dict[str, np.ndarray], inputs: dict[str, str],
                 params: dict, shard_size: int = 4) -> str:
    """A complete target version holding ``arrays`` (made by a `tiny` model); an existing complete
    version of the same recipe is returned as it is."""
    recipe = TargetRecipe(kind=kind, stage=stage, stage_version=1, params=params, inputs=inputs,
                          model=ModelIdentity(spec="tiny", family=stage, source="tiny", seed=0))
    store = TargetStore(root)
    if store.status(recipe.version_id()) == "complete":
        return recipe.version_id()
    specs = [ArraySpec(name=n, shape=list(a.shape), dtype=str(a.dtype)) for n, a in arrays.items()]
    writer = store.begin(recipe, specs, num_clips=len(next(iter(arrays.values()))), shard_size=shard_size)
    for shard in writer.pending_shards():
        clips = writer.shard_clips(shard)
        writer.write_shard(shard, {n: a[clips.start:clips.stop] for n, a in arrays.items()})
    writer.finalize()
    return writer.version_id


def make_demo_plan(root, dataset: EpisodeStore, num_clips: int, num_frames: int, start_of) -> str:
    """A plan of the "demo" dataset: clip i on episode i mod E (round robin), from frame
    ``start_of(i, E)``, camera "front", stride 1; returns its content-addressed id."""
    episodes = dataset.episode_ids()
    rows = [ClipRow(clip_id=f"{episodes[i % len(episodes)]}_s{i}", dataset="demo",
                    episode_id=episodes[i % len(episodes)], camera="front", start=start_of(i, len(episodes)),
                    num_frames=num_frames, stride=1, instruction=f"pick the cube {i}") for i in range(num_clips)]
    params = {"num_clips": num_clips}
    plan_id = content_id("plan", {"dataset": "demo", "params": params})
    PlanStore(root).write(PlanInfo(plan_id=plan_id, dataset="demo", dataset_fingerprint=dataset.fingerprint(),
                                   params=params, num_clips=num_clips), rows)
    return plan_id
