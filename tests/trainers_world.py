"""A tiny data root for the trainer tests: dataset, plan, video/teacher/text versions and exports.

The teacher targets are a fixed linear function of the one-step features plus the reference map, so
a decoupler can learn them; actions depend on the clip, so the action expert has signal to fit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from foresight.flows.export import ExportConfig, export_recipe, plan_export, write_shard
from foresight.schemas.dataset import DatasetInfo, EpisodeRecord, FeatureSpec
from foresight.storage.episodes import EpisodeStore
from foresight.storage.exports import ExportStore
from foresight.storage.fs import Root

import factories

T, GRID, C_IN, ACTION_D, TEXT_L, TEXT_D, EPISODE_LEN = 4, (4, 4), 16, 4, 3, 8, 12
TEACHERS = {"dinov2": 8, "da3": 12}
EPISODES = 4


def make_dataset(root: Root) -> EpisodeStore:
    """Dataset 'demo': the last episode is the held-out ('val') split."""
    store = EpisodeStore(root, "demo")
    features = {"action": FeatureSpec(dtype="float32", shape=[ACTION_D]),
                "state": FeatureSpec(dtype="float32", shape=[3])}
    store.write_info(DatasetInfo(name="demo", source_kind="synthetic", source="tests", source_fingerprint="f" * 64,
                                 fps=10.0, cameras={"front": [8, 8, 3]}, features=features))
    rng = np.random.default_rng(1)
    for e in range(EPISODES):
        record = EpisodeRecord(episode_id=f"ep{e}", split="val" if e == EPISODES - 1 else "train", task="pick",
                               instructions=["pick the cube"], length=EPISODE_LEN, source_path=f"gen/ep{e}",
                               source_checksum=f"ep{e}")
        with store.writer(record, features) as writer:
            writer.append_frames("front", rng.integers(0, 256, (EPISODE_LEN, 8, 8, 3), dtype=np.uint8))
            actions = np.cumsum(rng.standard_normal((EPISODE_LEN, ACTION_D)), axis=0).astype(np.float32)
            writer.set_lowdim({"action": actions, "state": rng.standard_normal((EPISODE_LEN, 3)).astype(np.float32)})
    return store


def make_plan(root: Root, dataset: EpisodeStore, num_clips: int) -> str:
    return factories.make_demo_plan(root, dataset, num_clips, T, lambda i, episodes: (i // episodes) % EPISODE_LEN)


def make_version(root: Root, kind: str, stage: str, arrays: dict[str, np.ndarray], inputs: dict[str, str],
                 params: dict) -> str:
    return factories.make_version(root, kind, stage, arrays, inputs, params, shard_size=8)


def make_targets(root: Root, plan_id: str, num_clips: int, teacher_seed: int = 1) -> dict[str, str]:
    """A video version, one version per teacher (learnable from the features) and a text version."""
    rng = np.random.default_rng(0)
    onestep = rng.standard_normal((num_clips, T, *GRID, C_IN)).astype(np.float16)
    video = make_version(root, "video", "svd.generate", {
        "frames": rng.integers(0, 256, (num_clips, T, 8, 8, 3), dtype=np.uint8), "onestep": onestep,
        "seed": np.arange(num_clips, dtype=np.int64)}, {"plan": plan_id}, {"seed": 0})
    ids = {"video": video}
    for name, channels in TEACHERS.items():
        trng = np.random.default_rng([teacher_seed, channels])
        weight = trng.standard_normal((C_IN, channels)).astype(np.float32) / np.sqrt(C_IN)
        reference = trng.standard_normal((num_clips, 1, *GRID, channels)).astype(np.float32)
        target = onestep.astype(np.float32) @ weight + 0.5 * reference
        ids[name] = make_version(root, "teacher", f"teachers.{name}", {
            "target": target.astype(np.float16), "reference": reference.astype(np.float16)},
            {"video": video}, {"seed": teacher_seed})
    text = rng.standard_normal((num_clips, TEXT_L, TEXT_D)).astype(np.float16)
    ids["text"] = make_version(root, "text", "text.clip", {"embedding": text}, {"plan": plan_id}, {})
    return ids


def export(root: Root, plan_id: str, targets: list[str], split: str | None, chunk: int = 5,
           codec: str = "f16") -> str:
    """Run the export stage in-process (no Prefect); returns the export id."""
    config = ExportConfig(plan=plan_id, targets=targets, split=split, action_chunk=chunk, shard_size="40KB",
                          codec=codec)
    recipe = export_recipe(root.url, config)
    store = ExportStore(root.url)
    if not store.exists(recipe.export_id()):
        store.begin(plan_export(root.url, recipe))
        for shard in store.pending_shards(recipe.export_id()):
            write_shard(root.url, recipe.export_id(), shard)
        store.finalize(recipe.export_id())
    return recipe.export_id()


def make_world(tmp_path: Path, num_clips: int = 24) -> dict[str, str]:
    """Root + train/val exports of every target; also a second dinov2 version for the version guard."""
    root = Root(tmp_path / "root")
    plan_id = make_plan(root, make_dataset(root), num_clips)
    ids = make_targets(root, plan_id, num_clips)
    targets = [ids["video"], ids["dinov2"], ids["da3"], ids["text"]]
    world = {"root": root.url, "plan": plan_id, **ids,
             "train": export(root, plan_id, targets, "train"), "val": export(root, plan_id, targets, "val")}
    return world
