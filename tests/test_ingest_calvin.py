"""CALVIN ingest on generated splits: global ids from 358482, float64 vectors, language windows."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest

import fixtures_sources as fx
from foresight.flows.ingest_sources import ingest_calvin
from foresight.pipelines.ingest import calvin
from foresight.pipelines.ingest.common import READ_BLOCK, FrameBlock, LowdimBlock, unpack_depth_uint24
from foresight.storage.episodes import EpisodeStore


@pytest.fixture(scope="module")
def calvin_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("calvin")
    written = fx.make_calvin_dataset(root / "task_D_D")
    return root / "task_D_D", written


@pytest.fixture()
def src_copy(calvin_src, tmp_path):
    shutil.copytree(calvin_src[0], tmp_path / "src")
    return tmp_path / "src"


def _tiny_split(tmp_path, lengths=(3, 3)):
    """Two short training episodes (no validation split), for bad-input cases."""
    ranges, start = [], fx.CALVIN_DEBUG_START
    for length in lengths:
        ranges.append((start, start + length - 1))
        start += length
    fx.make_calvin_split(tmp_path / "src" / "training", ranges)
    return tmp_path / "src", ranges


def _frame(src, frame_id, split="training"):
    return src / split / f"episode_{frame_id:07d}.npz"


def _rewrite_frame(path, **changes):
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        arrays.pop(key)
    np.savez_compressed(path, **arrays)


def test_ingest_stores_every_episode_with_its_content(calvin_src, tmp_path):
    src, written = calvin_src
    options = calvin.CalvinOptions(depth=True)
    summary = ingest_calvin(str(tmp_path / "root"), "cal", str(src), options)
    assert not summary.partial and summary.frames_written == 70 + 6 + 5
    store = EpisodeStore(str(tmp_path / "root"), "cal")
    assert store.episode_ids() == ["training-0358482", "training-0358555", "validation-0553567"]
    record = store.record("training-0358482")
    assert record.length == 70 and record.extra["start_id"] == 358482 and record.extra["scene"] == "calvin_scene_D"
    frames = store.read_frames("training-0358482", "rgb_static", [0, 69])
    np.testing.assert_array_equal(frames[1], fx.calvin_image("rgb_static", 358551))
    np.testing.assert_array_equal(store.read_frames("validation-0553567", "rgb_gripper", [4])[0],
                                  fx.calvin_image("rgb_gripper", 553571))
    depth = unpack_depth_uint24(store.read_frames("training-0358555", "depth_static", [2]), calvin.DEPTH_SCALE_M)
    np.testing.assert_allclose(depth[0], fx.calvin_image("depth_static", 358557), atol=calvin.DEPTH_SCALE_M)
    action = store.read_column("training-0358482", "action")
    expected = np.stack([fx.calvin_vectors(i)["rel_actions"] for i in range(358482, 358552)])
    np.testing.assert_array_equal(action, expected.astype(np.float32))
    state = store.read_column("validation-0553567", "state")
    np.testing.assert_array_equal(state[0], fx.calvin_vectors(553567)["robot_obs"].astype(np.float32))
    assert store.info().extra["source_columns"]["abs_action"] == "actions"


def test_language_windows_become_episode_relative_segments(calvin_src, tmp_path):
    src, written = calvin_src
    ingest_calvin(str(tmp_path / "root"), "cal", str(src), calvin.CalvinOptions())
    store = EpisodeStore(str(tmp_path / "root"), "cal")
    segments = {(s.episode_id, s.start, s.end, s.task) for s in store.segments()}
    assert segments == {("training-0358482", 2, 40, "open_drawer"), ("training-0358555", 0, 5, "lift_red_block_table"),
                        ("validation-0553567", 0, 3, "push_blue_block_left")}
    assert store.segment_embeddings().shape == (3, 384)


def test_stats_are_stored_with_the_dataset(calvin_src, tmp_path):
    src, _ = calvin_src
    ingest_calvin(str(tmp_path / "root"), "cal", str(src), calvin.CalvinOptions(splits=["training"]))
    stats = EpisodeStore(str(tmp_path / "root"), "cal").info().stats
    actions = np.stack([fx.calvin_vectors(i)["rel_actions"] for i in [*range(358482, 358552), *range(358555, 358561)]])
    assert stats["action"].count == 76
    np.testing.assert_allclose(stats["action"].mean, actions.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["action"].max, actions.max(axis=0).astype(np.float32), rtol=1e-6)
    assert set(stats) == {"action", "abs_action", "state", "scene_obs"}


def test_reader_streams_blocks_never_the_whole_episode(calvin_src):
    src, written = calvin_src
    options = calvin.CalvinOptions(cameras=["rgb_static", "rgb_tactile"])
    scan = calvin.scan_calvin(src, options)
    assert set(scan.layout.cameras) == {"rgb_static", "rgb_tactile_0", "rgb_tactile_1"}
    blocks = list(calvin.read_calvin_episode(src, scan.episodes[0], options, scan.layout.extra["frame_shapes"]))
    frame_blocks = [b for b in blocks if isinstance(b, FrameBlock)]
    assert max(len(b.frames_THWC) for b in frame_blocks) == READ_BLOCK
    assert sum(len(b.frames_THWC) for b in frame_blocks if b.camera == "rgb_tactile_1") == 70
    assert isinstance(blocks[-1], LowdimBlock) and blocks[-1].columns["action"].shape == (70, 7)


def test_second_run_changes_nothing(calvin_src, tmp_path):
    src, _ = calvin_src
    root = tmp_path / "root"
    ingest_calvin(str(root), "cal", str(src), calvin.CalvinOptions())
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (root / "datasets").rglob("*") if p.is_file()}
    summary = ingest_calvin(str(root), "cal", str(src), calvin.CalvinOptions())
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (root / "datasets").rglob("*") if p.is_file()}
    assert summary.written == [] and len(summary.skipped) == 3
    assert before == after


def test_changed_source_replaces_only_when_the_new_episode_is_complete(src_copy, tmp_path):
    root = str(tmp_path / "root")
    options = calvin.CalvinOptions(splits=["training"])
    ingest_calvin(root, "cal", str(src_copy), options)
    store = EpisodeStore(root, "cal")
    old = store.record("training-0358555").source_checksum
    new_image = np.zeros((200, 200, 3), np.uint8)
    _rewrite_frame(_frame(src_copy, 358556), rgb_static=new_image)
    _rewrite_frame(_frame(src_copy, 358560), rel_actions=np.full(7, np.nan))
    summary = ingest_calvin(root, "cal", str(src_copy), options)
    assert summary.quarantined and store.record("training-0358555").source_checksum == old
    np.testing.assert_array_equal(store.read_frames("training-0358555", "rgb_static", [1])[0],
                                  fx.calvin_image("rgb_static", 358556))
    _rewrite_frame(_frame(src_copy, 358560), rel_actions=fx.calvin_vectors(358560)["rel_actions"])
    summary = ingest_calvin(root, "cal", str(src_copy), options)
    assert summary.written == ["training-0358555"] and summary.skipped == ["training-0358482"]
    np.testing.assert_array_equal(store.read_frames("training-0358555", "rgb_static", [1])[0], new_image)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, field, reason", [
    (lambda p: _truncate(p), "<archive>", "unreadable npz"),
    (lambda p: _rewrite_frame(p, robot_obs=None), "robot_obs", "key missing"),
    (lambda p: _rewrite_frame(p, scene_obs=np.zeros(23)), "scene_obs", "expected float32 or float64 (24,)"),
    (lambda p: _rewrite_frame(p, actions=np.zeros(7, dtype=np.int64)), "actions", "found int64"),
    (lambda p: _rewrite_frame(p, rgb_static=np.zeros((100, 200, 3), np.uint8)), "rgb_static", "expected uint8"),
    (lambda p: _rewrite_frame(p, rel_actions=np.array([0, 0, np.inf, 0, 0, 0, 0.0])), "rel_actions", "NaN or inf"),
    (lambda p: p.unlink(), None, "frame file missing"),
])
def test_bad_frame_quarantines_its_episode_and_the_rest_lands(tmp_path, damage, field, reason):
    src, ranges = _tiny_split(tmp_path)
    bad = _frame(src, ranges[1][0] + 1)
    damage(bad)
    root = str(tmp_path / "root")
    summary = ingest_calvin(root, "cal", str(src), calvin.CalvinOptions(splits=["training"]))
    store = EpisodeStore(root, "cal")
    assert store.episode_ids() == ["training-0358482"]
    [line] = summary.quarantined
    assert str(bad.name) in line and "episode 'training-0358485'" in line and reason in line
    if field:
        assert f"field '{field}'" in line
    [item] = store.quarantined()
    assert item["episode"] == "training-0358485" and item["field"] == field and item["kind"] == "calvin"


def test_truncated_zip_member_is_reported(tmp_path):
    src, ranges = _tiny_split(tmp_path)
    bad = _frame(src, ranges[0][0])
    with zipfile.ZipFile(bad) as archive:
        names = archive.namelist()
    assert "rgb_static.npy" in names
    data = bytearray(bad.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = b"\x00" * 64
    bad.write_bytes(bytes(data))
    summary = ingest_calvin(str(tmp_path / "root"), "cal", str(src), calvin.CalvinOptions(splits=["training"]))
    assert len(summary.quarantined) == 1 and "training-0358482" in summary.quarantined[0]
    assert summary.written == ["training-0358485"]


def test_refused_pickle_in_annotations_is_quarantined_and_frames_land(tmp_path):
    src, ranges = _tiny_split(tmp_path)
    lang = src / "training" / "lang_annotations"
    lang.mkdir()
    np.save(lang / "auto_lang_ann.npy", np.array({"language": shutil.rmtree}, dtype=object), allow_pickle=True)
    summary = ingest_calvin(str(tmp_path / "root"), "cal", str(src), calvin.CalvinOptions(splits=["training"]))
    [line] = summary.quarantined
    assert "auto_lang_ann.npy" in line and "refusing to unpickle global 'shutil.rmtree'" in line
    assert len(summary.written) == 2


def test_strict_makes_the_first_bad_item_fatal(tmp_path):
    src, ranges = _tiny_split(tmp_path)
    _rewrite_frame(_frame(src, ranges[0][1]), actions=np.full(7, np.nan))
    with pytest.raises(ValueError, match=r"episode '\w+-0358482', field 'actions': NaN or inf"):
        ingest_calvin(str(tmp_path / "root"), "cal", str(src), calvin.CalvinOptions(splits=["training"]), strict=True)


def test_float32_vectors_are_accepted_too(tmp_path):
    src, ranges = _tiny_split(tmp_path, lengths=(2,))
    for frame_id in range(ranges[0][0], ranges[0][1] + 1):
        vectors = {k: v.astype(np.float32) for k, v in fx.calvin_vectors(frame_id).items()}
        _rewrite_frame(_frame(src, frame_id), **vectors)
    summary = ingest_calvin(str(tmp_path / "root"), "cal", str(src), calvin.CalvinOptions(splits=["training"]))
    assert summary.written == ["training-0358482"] and not summary.partial


def test_missing_index_file_quarantines_the_split(tmp_path):
    src, ranges = _tiny_split(tmp_path)
    fx.make_calvin_split(src / "validation", [(600000, 600001)])
    (src / "training" / "ep_start_end_ids.npy").unlink()
    summary = ingest_calvin(str(tmp_path / "root"), "cal", str(src), calvin.CalvinOptions())
    assert summary.written == ["validation-0600000"]
    assert "ep_start_end_ids.npy" in summary.quarantined[0]


def test_unknown_camera_is_a_config_error():
    with pytest.raises(ValueError, match="rgb_fisheye.*choose from rgb_static, rgb_gripper, rgb_tactile"):
        calvin.CalvinOptions(cameras=["rgb_static", "rgb_fisheye"])


def test_annotation_without_required_key_is_quarantined(tmp_path):
    src, _ = _tiny_split(tmp_path)
    lang = src / "training" / "lang_annotations"
    lang.mkdir()
    np.save(lang / "auto_lang_ann.npy", {"language": {"ann": ["x"], "task": ["t"]}, "info": {}}, allow_pickle=True)
    summary = ingest_calvin(str(tmp_path / "root"), "cal", str(src), calvin.CalvinOptions(splits=["training"]))
    [line] = summary.quarantined
    assert "auto_lang_ann.npy, field 'indx': key missing" in line and len(summary.written) == 2
