"""Audit of target versions at the store level: verify, lineage, references, gc, and the drift maths.

The builders here (``build_world`` and friends) make a tiny data root with real stores: a dataset,
a plan, a video version and a teacher version with random arrays. tests/test_viz_*.py reuse them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from foresight.pipelines.audit import DriftAccumulator, array_stats, flatten, record_diff, sample_clip_indices, spread_indices
from foresight.schemas.dataset import DatasetInfo, EpisodeRecord
from foresight.schemas.model import ModelIdentity
from foresight.schemas.plan import ClipRow, PlanInfo
from foresight.schemas import refs
from foresight.schemas.target import ArraySpec, TargetRecipe, content_id
from foresight.storage import audit, references
from foresight.storage.episodes import EpisodeStore
from foresight.storage.fs import Root
from foresight.storage.graph import VersionGraph
from foresight.storage.plans import PlanStore
from foresight.storage.targets import TargetStore, shard_object

N_CLIPS, T, SHARD = 6, 4, 4
FRAME_HW, GRID, VIDEO_C, TEACHER_C = (16, 16), (4, 4), 8, 6


# builders -------------------------------------------------------------------------------------
def make_dataset(root: Root, name: str = "demo", episodes: int = 2, length: int = 10) -> EpisodeStore:
    """A synthetic dataset of ``episodes`` random-frame episodes on camera 'front' (24x32)."""
    store = EpisodeStore(root, name)
    store.write_info(DatasetInfo(name=name, source_kind="synthetic", source="tests", source_fingerprint="f" * 64,
                                 fps=10.0, cameras={"front": [24, 32, 3]}, features={}))
    rng = np.random.default_rng(1)
    for e in range(episodes):
        add_episode(store, f"ep{e}", length, rng)
    return store


def add_episode(store: EpisodeStore, episode_id: str, length: int, rng: np.random.Generator) -> None:
    record = EpisodeRecord(episode_id=episode_id, task="pick", instructions=["pick the cube"], length=length,
                           source_path=f"gen/{episode_id}", source_checksum=episode_id)
    with store.writer(record, {}) as writer:
        writer.append_frames("front", rng.integers(0, 256, (length, 24, 32, 3), dtype=np.uint8))


def make_plan(root: Root, dataset: EpisodeStore, num_clips: int = N_CLIPS) -> str:
    """A plan of ``num_clips`` clips of T frames spread over the dataset's episodes."""
    episodes = dataset.episode_ids()
    rows = [ClipRow(clip_id=f"{episodes[i % len(episodes)]}_s{i}", dataset=dataset.dataset,
                    episode_id=episodes[i % len(episodes)], camera="front", start=i, num_frames=T, stride=1,
                    instruction="pick the cube") for i in range(num_clips)]
    params = {"frames": T, "stride": 1, "num_clips": num_clips}
    plan_id = content_id("plan", {"dataset": dataset.dataset, "fingerprint": dataset.fingerprint(), "params": params})
    PlanStore(root).write(PlanInfo(plan_id=plan_id, dataset=dataset.dataset, dataset_fingerprint=dataset.fingerprint(),
                                   params=params, num_clips=num_clips, created="2026-01-01T00:00:00+00:00"), rows)
    return plan_id


def tiny_model(family: str) -> ModelIdentity:
    return ModelIdentity(spec="tiny", family=family, source="tiny", seed=0, config={"width": 8})


def make_version(root: Root, kind: str, arrays: dict[str, np.ndarray], inputs: dict[str, str],
                 params: dict | None = None, model: ModelIdentity | None = None, finalize: bool = True,
                 stage: str | None = None) -> str:
    """Write a version of ``kind`` holding exactly ``arrays`` through the real TargetStore path."""
    recipe = TargetRecipe(kind=kind, stage=stage or f"test.{kind}", stage_version=1, model=model,
                          params=params or {}, inputs=inputs)
    specs = [ArraySpec(name=n, shape=list(a.shape), dtype=str(a.dtype)) for n, a in arrays.items()]
    num_clips = next(iter(arrays.values())).shape[0]
    writer = TargetStore(root).begin(recipe, specs, num_clips=num_clips, shard_size=SHARD)
    for shard in writer.pending_shards():
        clips = writer.shard_clips(shard)
        writer.write_shard(shard, {n: a[clips.start:clips.stop] for n, a in arrays.items()})
    if finalize:
        writer.finalize()
    return writer.version_id


def video_arrays(seed: int, num_clips: int = N_CLIPS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"frames": rng.integers(0, 256, (num_clips, T, *FRAME_HW, 3), dtype=np.uint8),
            "onestep": rng.standard_normal((num_clips, T, *GRID, VIDEO_C)).astype(np.float16),
            "seed": np.arange(num_clips, dtype=np.int64)}


def teacher_arrays(seed: int, num_clips: int = N_CLIPS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"target": rng.standard_normal((num_clips, T, *GRID, TEACHER_C)).astype(np.float16),
            "reference": rng.standard_normal((num_clips, 1, *GRID, TEACHER_C)).astype(np.float16)}


def make_video(root: Root, plan_id: str, steps: int = 2, seed: int = 0) -> str:
    return make_version(root, "video", video_arrays(seed), {"plan": plan_id}, {"steps": steps, "guidance": 3.0},
                        tiny_model("svd"), stage="svd.generate")


def make_teacher(root: Root, video_id: str, resolution: int = 224, seed: int = 1, finalize: bool = True) -> str:
    return make_version(root, "teacher", teacher_arrays(seed), {"video": video_id},
                        {"teacher": "dinov2", "resolution": resolution}, tiny_model("dinov2"),
                        finalize=finalize, stage="teacher.dinov2")


def build_world(tmp_path: Path) -> dict[str, str]:
    """Root with dataset 'demo', a plan, a video version and a teacher version made from it."""
    root = Root(tmp_path / "root")
    dataset = make_dataset(root)
    plan_id = make_plan(root, dataset)
    video_id = make_video(root, plan_id)
    teacher_id = make_teacher(root, video_id)
    return {"root": root.url, "plan": plan_id, "video": video_id, "teacher": teacher_id}


def write_export(root: Root, export_id: str, versions: dict[str, str]) -> None:
    """An index.json shaped like the export stage's: field -> version id."""
    root.write_json_atomic(f"exports/{export_id}/index.json",
                           {"export_id": export_id, "versions": versions, "shards": [{"name": "shard-000000.tar"}]})


def write_run(root: Root, run_id: str, export_id: str, versions: dict[str, str]) -> None:
    """run.json and one step-N/checkpoint.json, with the keys trainers/loop.py writes."""
    record = {"run_id": run_id, "export_id": export_id, "target_versions": versions}
    root.write_json_atomic(f"runs/{run_id}/run.json", record)
    root.write_json_atomic(f"runs/{run_id}/step-10/checkpoint.json", {**record, "step": 10})


def flip_byte(path: str, position: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(position)
        value = handle.read(1)[0]
        handle.seek(position)
        handle.write(bytes([value ^ 0x01]))


@pytest.fixture()
def world(tmp_path: Path) -> dict[str, str]:
    return build_world(tmp_path)


# verify ---------------------------------------------------------------------------------------
def test_intact_version_verifies_clean(world):
    store = TargetStore(world["root"])
    assert audit.verify_version(store, world["teacher"]) == []
    assert audit.verify_version(store, world["video"]) == []


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_is_caught_and_named(world, where):
    store = TargetStore(world["root"])
    manifest = store.manifest(world["video"])
    path = store.root.path(shard_object(manifest, "onestep", 1))
    size = os.path.getsize(path)
    flip_byte(path, {"first": 0, "middle": size // 2, "last": size - 1}[where])
    problems = audit.verify_version(store, world["video"])
    assert len(problems) == 1
    assert "array 'onestep' shard 1 is corrupt" in problems[0] and world["video"] in problems[0]


def test_missing_shard_and_bad_metadata_are_named(world):
    store = TargetStore(world["root"])
    manifest = store.manifest(world["teacher"])
    os.remove(store.root.path(shard_object(manifest, "reference", 0)))
    meta = Path(store.root.path(f"targets/{world['teacher']}/target.zarr/zarr.json"))
    data = json.loads(meta.read_text())
    data["shape"][0] += 1
    meta.write_text(json.dumps(data))
    problems = audit.verify_version(store, world["teacher"])
    assert any("array 'reference' shard 0 is missing" in p for p in problems)
    assert any("array 'target'" in p and "stored shape" in p for p in problems)


def test_iter_batches_bounds_memory_and_keeps_order(world):
    reader = TargetStore(world["root"]).open(world["video"])
    per_clip = T * GRID[0] * GRID[1] * VIDEO_C
    batches = list(audit.iter_batches(reader, "onestep", [5, 0, 3], max_elements=2 * per_clip))
    assert [len(b) for b in batches] == [2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), reader.read("onestep", [5, 0, 3]))
    assert [len(b) for b in audit.iter_batches(reader, "onestep", [1, 2], max_elements=1)] == [1, 1]


# lineage --------------------------------------------------------------------------------------
def test_lineage_tree_reaches_the_dataset(world):
    tree = audit.lineage_tree(world["root"], world["teacher"])
    assert (tree.type, tree.id, tree.details["weights"]) == ("version", world["teacher"], "tiny")
    video = tree.children[0]
    assert (video.type, video.id, video.role) == ("version", world["video"], "video")
    plan = video.children[0]
    assert (plan.type, plan.id, plan.details["dataset"]) == ("plan", world["plan"], "demo")
    dataset = plan.children[0]
    assert dataset.type == "dataset" and dataset.details["state"] == "unchanged"
    assert audit.resolve_plan(TargetStore(world["root"]), world["teacher"]) == world["plan"]


def test_lineage_notices_changed_dataset_and_events(world):
    root = Root(world["root"])
    add_episode(EpisodeStore(root, "demo"), "ep9", 6, np.random.default_rng(3))
    from foresight.storage.lineage import emit

    emit(root, "teachers.dinov2", "run-1", inputs=[refs.version(world["video"])],
         outputs=[refs.version(world["teacher"])], facets={"x": 1})
    dataset = audit.lineage_tree(root, world["teacher"]).children[0].children[0].children[0]
    assert dataset.details["state"].startswith("changed since")
    events = audit.version_events(root, world["teacher"])
    assert [e["job"]["name"] for e in events] == ["teachers.dinov2"]


# references and gc ----------------------------------------------------------------------------
def test_references_are_transitive(world):
    root = Root(world["root"])
    write_export(root, "export-aaaaaaaaaaaa", {"dinov2.target": world["teacher"]})
    store = TargetStore(root)
    uses = references.users_of(store, world["video"])
    assert [(u.kind, u.id, u.direct) for u in uses] == [("export", "export-aaaaaaaaaaaa", False)]
    assert VersionGraph(store).closure([world["teacher"]]) == {world["teacher"], world["video"]}


def test_gc_keeps_referenced_and_removes_unreferenced(world):
    root = Root(world["root"])
    other_teacher = make_teacher(root, world["video"], resolution=448, seed=5)
    write_export(root, "export-aaaaaaaaaaaa", {"dinov2.target": world["teacher"]})
    plan = references.plan_gc(root)
    assert [i.version_id for i in plan.remove] == [other_teacher]
    assert {i.version_id for i in plan.keep} == {world["teacher"], world["video"]}
    references.apply_gc(root, plan, run_id="gc-1")
    store = TargetStore(root)
    assert store.status(other_teacher) is None and not root.exists(f"targets/{other_teacher}")
    assert store.status(world["teacher"]) == "complete" and store.status(world["video"]) == "complete"
    assert references.plan_gc(root).remove == []


@pytest.mark.parametrize("broken", ["export", "run"])
def test_gc_removes_no_complete_version_while_a_reference_file_is_unreadable(world, broken):
    """An unreadable index.json or run file may name any version: gc keeps every complete one."""
    root = Root(world["root"])
    if broken == "export":
        write_export(root, "export-aaaaaaaaaaaa", {"dinov2.target": world["teacher"]})
        rel = "exports/export-aaaaaaaaaaaa/index.json"
    else:
        write_run(root, "run-1", "export-aaaaaaaaaaaa", {"dinov2.target": world["teacher"]})
        rel = "runs/run-1/run.json"
    Path(root.path(rel)).write_text('{"versions": {"dinov2.ta')
    for path in Path(root.path("runs")).rglob("*.json") if broken == "run" else []:
        path.write_text("[1,")  # the run's checkpoint records name the version too
    plan = references.plan_gc(root)
    assert plan.remove == [] and {i.version_id for i in plan.keep} == {world["teacher"], world["video"]}
    assert all("unreadable reference files" in i.reason and root.url_of(rel) in i.reason for i in plan.keep)


def test_gc_cut_short_never_leaves_markers_over_missing_data(world, monkeypatch):
    """apply_gc removes the manifest, then the _done markers, then the data: a removal killed after
    the markers went leaves nothing a rerun of the stage would trust."""
    root = Root(world["root"])
    victim = make_teacher(root, world["video"], resolution=448, seed=5)
    plan = references.plan_gc(root)
    removed: list[str] = []
    real_rm = Root.rm

    def rm(self, *parts, **kwargs):
        removed.append("/".join(parts))
        if len(removed) == 3:
            raise KeyboardInterrupt  # killed before the data goes
        return real_rm(self, *parts, **kwargs)

    monkeypatch.setattr(Root, "rm", rm)
    with pytest.raises(KeyboardInterrupt):
        references.apply_gc(root, plan, run_id="gc-1")
    assert removed == [f"targets/{victim}/manifest.json", f"targets/{victim}/_done", f"targets/{victim}"]
    assert not root.exists(f"targets/{victim}/_done") and not root.exists(f"targets/{victim}/manifest.json")


def test_gc_sizes_every_version_from_one_listing(world, monkeypatch):
    root = Root(world["root"])
    expected = {v: root.du(f"targets/{v}") for v in (world["teacher"], world["video"])}
    assert TargetStore(root).folder_sizes() == expected
    monkeypatch.setattr(Root, "du", lambda self, *parts: pytest.fail(f"a listing per version ({parts})"))
    monkeypatch.setattr(references, "last_modified", lambda *a: pytest.fail("a listing per building version"))
    plan = references.plan_gc(root)
    assert {i.version_id: i.bytes for i in plan.keep + plan.remove} == expected


def test_gc_run_reference_through_export_and_building_ages(world):
    root = Root(world["root"])
    write_export(root, "export-bbbbbbbbbbbb", {"dinov2.target": world["teacher"]})
    write_run(root, "run-1", "export-bbbbbbbbbbbb", {})
    uses = references.users_of(TargetStore(root), world["teacher"])  # the run inherits its export's versions
    assert [(u.kind, u.id) for u in uses] == [("export", "export-bbbbbbbbbbbb"), ("run", "run-1")]
    root.rm("exports/export-bbbbbbbbbbbb")  # the export is gone, the run still names its versions
    write_run(root, "run-1", "export-bbbbbbbbbbbb", {"dinov2.target": world["teacher"]})
    video2 = make_video(root, world["plan"], steps=3)
    fresh = make_teacher(root, video2, resolution=112, finalize=False)
    stale = make_teacher(root, world["video"], resolution=64, finalize=False)
    old = time.time() - 48 * 3600
    for path in Path(root.path(f"targets/{stale}")).rglob("*"):
        os.utime(path, (old, old))
    plan = references.plan_gc(root)
    removed = {i.version_id: i.reason for i in plan.remove}
    assert set(removed) == {stale}, plan
    kept = {i.version_id: i.reason for i in plan.keep}
    assert "still building" in kept[fresh] and "input of a version still building" in kept[video2]
    assert "referenced" in kept[world["teacher"]] and "referenced" in kept[world["video"]]


def test_gc_keeps_complete_versions_while_an_export_is_being_written(world):
    root = Root(world["root"])
    root.write_bytes_atomic("exports/export-ffffffffffff/.tmp-shard-000000.tar", b"partial")
    plan = references.plan_gc(root)
    assert plan.remove == [] and all("exports in progress" in i.reason for i in plan.keep)
    old = time.time() - 48 * 3600
    for path in [*Path(root.path("exports/export-ffffffffffff")).rglob("*"), Path(root.path("exports/export-ffffffffffff"))]:
        os.utime(path, (old, old))
    assert {i.version_id for i in references.plan_gc(root).remove} == {world["teacher"], world["video"]}
    # Once the build plan lands, the export references exactly the versions it packs.
    root.write_json_atomic("exports/export-ffffffffffff/_build.json",
                           {"export_id": "export-ffffffffffff", "fields": {"dinov2.target": {"version": world["teacher"]}}})
    plan = references.plan_gc(root)
    assert plan.remove == [] and {i.version_id for i in plan.keep} == {world["teacher"], world["video"]}


# pure audit maths -----------------------------------------------------------------------------
def test_record_diff_names_nested_fields():
    a = {"params": {"steps": 2, "guidance": 3.0}, "model": {"weights_sha256": {"unet": "aa"}}, "inputs": {}}
    b = {"params": {"steps": 3, "guidance": 3.0}, "model": {"weights_sha256": {"unet": "bb"}}, "extra": 1, "inputs": {}}
    changes = {c.path: c for c in record_diff(a, b)}
    assert set(changes) == {"params.steps", "model.weights_sha256.unet", "extra"}
    assert (changes["params.steps"].a, changes["params.steps"].b) == (2, 3)
    assert changes["extra"].only_in == "b"
    assert flatten({"a": {"b": {}}})["a.b"] == {}


def test_drift_statistics_known_values():
    a = np.ones((2, 4), np.float32)
    b = a.copy()
    b[1] = -1.0
    acc = DriftAccumulator()
    acc.update(a[:1], b[:1])
    acc.update(a[1:], b[1:])
    stats = acc.result()
    assert stats.clips == 2 and stats.elements == 8
    assert stats.mean_abs_diff == pytest.approx(1.0) and stats.max_abs_diff == pytest.approx(2.0)
    assert stats.rel_l2 == pytest.approx(np.sqrt(16 / 8))
    assert stats.cosine["q0"] == pytest.approx(-1.0) and stats.cosine["q1"] == pytest.approx(1.0)


def test_sampling_and_stats_helpers():
    assert sample_clip_indices(5, None).tolist() == [0, 1, 2, 3, 4]
    picked = sample_clip_indices(100, 7, seed=3)
    assert len(picked) == 7 and picked.tolist() == sorted(set(picked.tolist()))
    assert picked.tolist() == sample_clip_indices(100, 7, seed=3).tolist()
    assert spread_indices(9, 3) == [0, 4, 8] and spread_indices(2, 5) == [0, 1]
    stats = array_stats(np.array([[0.0, 2.0], [np.nan, 4.0]]))
    assert (stats.nonfinite, stats.mean, stats.zero_fraction) == (1, pytest.approx(2.0), pytest.approx(1 / 3))
