"""LeRobot ingest: a v3.0 folder (two episodes in one data file and one mp4) and a v2.1 folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fixtures_sources as fx
from foresight.flows.ingest_sources import dataset_stats, ingest_lerobot
from foresight.pipelines.ingest import lerobot
from foresight.storage.episodes import EpisodeStore


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("lerobot")
    return {"v3.0": fx.make_lerobot_v3(base / "v3"), "v2.1": fx.make_lerobot_v21(base / "v21")}


@pytest.fixture()
def v3_copy(sources, tmp_path):
    return shutil.copytree(sources["v3.0"], tmp_path / "src")


def _ingest(tmp_path, src, **kwargs):
    root = str(tmp_path / "root")
    return ingest_lerobot(root, "lr", str(src), lerobot.LeRobotOptions(), **kwargs), EpisodeStore(root, "lr")


def _grey(frames):
    """The left-half grey level of each frame (encodes the global frame index)."""
    return frames[:, :, : frames.shape[2] // 2].reshape(len(frames), -1).mean(axis=1)


@pytest.mark.parametrize("version, lengths", [("v3.0", (12, 9)), ("v2.1", (8, 7))])
def test_frames_vectors_and_tasks_land_per_episode(sources, tmp_path, version, lengths):
    summary, store = _ingest(tmp_path, sources[version])
    assert summary.written == ["episode_000000", "episode_000001"] and not summary.partial
    first = 0
    for ep, length in enumerate(lengths):
        episode_id = f"episode_{ep:06d}"
        frames = store.read_frames(episode_id, "top")
        assert frames.shape == (length, *fx.LEROBOT_SIZE, 3)
        np.testing.assert_allclose(_grey(frames), [(8 * i) % 256 for i in range(first, first + length)], atol=3)
        red = frames[:, :, -8:].reshape(-1, 3).mean(axis=0)
        assert red[0] > 200 and red[2] < 40  # RGB, not BGR
        index = np.arange(first, first + length)
        np.testing.assert_array_equal(store.read_column(episode_id, "action"), fx.lerobot_vectors(index, 0))
        np.testing.assert_array_equal(store.read_column(episode_id, "state"), fx.lerobot_vectors(index, 1))
        first += length
    assert store.record("episode_000000").instructions == fx.LEROBOT_TASKS
    assert store.record("episode_000001").task == fx.LEROBOT_TASKS[0]
    segments = [(s.episode_id, s.start, s.end, s.text) for s in store.segments()]
    half = lengths[0] // 2
    assert segments == [("episode_000000", 0, half - 1, fx.LEROBOT_TASKS[0]),
                        ("episode_000000", half, lengths[0] - 1, fx.LEROBOT_TASKS[1]),
                        ("episode_000001", 0, lengths[1] - 1, fx.LEROBOT_TASKS[0])]
    info = store.info()
    assert info.fps == fx.LEROBOT_FPS and info.extra["codebase_version"] == version
    assert info.stats["state"].count == sum(lengths)


def test_dataset_statistics_come_from_the_values_written(sources, tmp_path, monkeypatch):
    """A fresh ingest computes the statistics from the values it wrote (no episode is read back),
    and they equal those of the stored tables."""
    reads = []
    real_read = EpisodeStore.read_lowdim
    monkeypatch.setattr(EpisodeStore, "read_lowdim",
                        lambda self, episode_id, *args, **kwargs: (reads.append(episode_id),
                                                                   real_read(self, episode_id, *args, **kwargs))[1])
    _, store = _ingest(tmp_path, sources["v3.0"])
    assert reads == []
    monkeypatch.undo()
    info = store.info()
    read_back = dataset_stats(store, info.features)
    assert {k: v.model_dump() for k, v in info.stats.items()} == {k: v.model_dump() for k, v in read_back.items()}


def test_v3_episodes_sharing_files_form_one_group(sources):
    meta = lerobot.load_meta(sources["v3.0"])
    assert lerobot.episode_groups(meta, lerobot.LeRobotOptions()) == [[0, 1]]
    meta = lerobot.load_meta(sources["v2.1"])
    assert lerobot.episode_groups(meta, lerobot.LeRobotOptions()) == [[0], [1]]


def test_second_run_changes_nothing(sources, tmp_path):
    _ingest(tmp_path, sources["v3.0"])
    files = lambda: {p: p.stat().st_mtime_ns for p in (tmp_path / "root/datasets").rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    summary, _ = _ingest(tmp_path, sources["v3.0"])
    assert summary.skipped == ["episode_000000", "episode_000001"] and files() == before


def test_missing_info_json_is_a_usage_error_and_writes_nothing(v3_copy, tmp_path):
    (v3_copy / "meta/info.json").unlink()
    with pytest.raises(lerobot.LeRobotUsageError, match="meta/info.json: file missing"):
        _ingest(tmp_path, v3_copy)
    assert not (tmp_path / "root").exists()


def test_unsupported_codebase_version_is_a_usage_error(v3_copy, tmp_path):
    info = json.loads((v3_copy / "meta/info.json").read_text())
    info["codebase_version"] = "v1.6"
    (v3_copy / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(lerobot.LeRobotUsageError, match="field 'codebase_version'.*'v1.6'"):
        _ingest(tmp_path, v3_copy)
    assert not (tmp_path / "root").exists()


def _rewrite_data(src, change):
    path = src / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    pq.write_table(change(table), path)


def _nan_action_in_episode_0(table):
    action = np.stack(table.column("action").to_pylist()).astype(np.float32)
    action[3, 2] = np.nan
    index = table.column_names.index("action")
    return table.set_column(index, "action", pa.array(list(action), type=pa.list_(pa.float32(), 6)))


def _drop_last_row_of_episode_0(table):
    keep = np.ones(len(table), dtype=bool)
    keep[11] = False
    return table.filter(pa.array(keep))


@pytest.mark.parametrize("change, field, reason", [
    (_nan_action_in_episode_0, "action", "NaN or inf at frame 3"),
    (_drop_last_row_of_episode_0, "episode_index", "11 data rows but the episode metadata says length 12"),
])
def test_bad_episode_in_a_shared_file_leaves_the_other_landing(v3_copy, tmp_path, change, field, reason):
    _rewrite_data(v3_copy, change)
    summary, store = _ingest(tmp_path, v3_copy)
    assert store.episode_ids() == ["episode_000001"]
    np.testing.assert_allclose(_grey(store.read_frames("episode_000001", "top")),
                               [(8 * i) % 256 for i in range(12, 21)], atol=3)
    [line] = summary.quarantined
    assert "file-000.parquet" in line and "episode 'episode_000000'" in line and f"field '{field}'" in line
    assert reason in line


def test_video_shorter_than_the_data_is_quarantined(sources, tmp_path):
    src = shutil.copytree(sources["v2.1"], tmp_path / "src")
    video = src / f"videos/chunk-000/{fx.LEROBOT_CAMERA}/episode_000001.mp4"
    fx.write_mp4(video, np.stack([fx.lerobot_frame(8 + t) for t in range(5)]), fx.LEROBOT_FPS)
    summary, store = _ingest(tmp_path, src)
    assert store.episode_ids() == ["episode_000000"]
    [line] = summary.quarantined
    assert "episode_000001.mp4" in line and f"field '{fx.LEROBOT_CAMERA}'" in line and "5 frames" in line


def test_strict_makes_the_first_bad_item_fatal(v3_copy, tmp_path):
    _rewrite_data(v3_copy, _nan_action_in_episode_0)
    with pytest.raises(ValueError, match="NaN or inf"):
        _ingest(tmp_path, v3_copy, strict=True)
