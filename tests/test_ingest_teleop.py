"""Teleop HDF5 ingest: raw and JPEG-compressed ALOHA-style episodes with a known coloured patch."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import fixtures_sources as fx
from foresight.flows.ingest_sources import ingest_teleop
from foresight.pipelines.ingest import teleop
from foresight.pipelines.ingest.common import unpack_depth_uint24
from foresight.storage.episodes import EpisodeStore


def _ingest(tmp_path, src, **options):
    root = str(tmp_path / "root")
    summary = ingest_teleop(root, "tel", str(src), teleop.TeleopOptions(**options))
    return summary, EpisodeStore(root, "tel")


def _patch(frames):
    """Mean colour of the patch interior (JPEG rings at its edges)."""
    rows, cols = fx.PATCH
    inner = (slice(None), slice(rows.start + 4, rows.stop - 4), slice(cols.start + 4, cols.stop - 4))
    return frames[inner].reshape(-1, 3).mean(axis=0)


@pytest.mark.parametrize("compress", [False, True, None])
def test_patch_keeps_the_recorded_channel_order(tmp_path, compress):
    fx.make_teleop_episode(tmp_path / "src" / "episode_0.hdf5", length=6, compress=compress)
    summary, store = _ingest(tmp_path, tmp_path / "src", instruction="fold the towel")
    assert summary.written == ["episode_0"]
    assert sorted(store.info().cameras) == sorted(fx.ALOHA_CAMERAS)
    for cam in fx.ALOHA_CAMERAS:
        patch = _patch(store.read_frames("episode_0", cam))
        np.testing.assert_allclose(patch, fx.PATCH_COLOR, atol=0 if not compress else 8)
    record = store.record("episode_0")
    assert record.instructions == ["fold the towel"] and record.length == 6 and record.extra["sim"] is False


def test_raw_frames_and_vectors_are_stored_exactly(tmp_path):
    fx.make_teleop_episode(tmp_path / "src" / "episode_3.hdf5", length=70, cameras=("cam_high",), size=(16, 24),
                           base_action=True)
    summary, store = _ingest(tmp_path, tmp_path / "src", fps=30)
    np.testing.assert_array_equal(store.read_frames("episode_3", "cam_high", [0, 69]),
                                  np.stack([fx.teleop_frame(0, t, (16, 24)) for t in (0, 69)]))
    np.testing.assert_array_equal(store.read_column("episode_3", "state"), fx.teleop_vectors(70, 14, 0))
    np.testing.assert_array_equal(store.read_column("episode_3", "base_action"), fx.teleop_vectors(70, 2, 4))
    lowdim = store.read_lowdim("episode_3", ["timestamp"]).column("timestamp").to_numpy()
    np.testing.assert_allclose(lowdim[:3], [0, 1 / 30, 2 / 30])
    info = store.info()
    assert set(info.features) == {"state", "qvel", "effort", "action", "base_action"}
    assert info.stats["action"].count == 70


def test_compress_len_rows_follow_the_recorder_camera_order(tmp_path):
    path = fx.make_teleop_episode(tmp_path / "src" / "episode_0.hdf5", length=4, compress=True)
    with h5py.File(path) as h5:
        listed = list(h5["observations/images"])
        lengths = h5["compress_len"][()]
        assert listed != list(fx.ALOHA_CAMERAS) and lengths.dtype == np.float32
        true = {cam: teleop.jpeg_lengths(h5[f"observations/images/{cam}"][()]) for cam in listed}
    for row, cam in enumerate(fx.ALOHA_CAMERAS):
        np.testing.assert_array_equal(true[cam], lengths[row])
    summary, store = _ingest(tmp_path, tmp_path / "src")
    assert not summary.partial


def test_depth_and_mobile_base(tmp_path):
    fx.make_teleop_episode(tmp_path / "src" / "episode_0.hdf5", length=5, cameras=("cam_high", "cam_left_wrist"),
                           effort=False, base_action=True, depth=True)
    summary, store = _ingest(tmp_path, tmp_path / "src", fps=30)
    depth = unpack_depth_uint24(store.read_frames("episode_0", "cam_left_wrist_depth", [4]), 1.0)
    assert depth[0, 0, 0] == 4 * 100 + 7
    assert "effort" not in store.info().features


def test_second_run_changes_nothing(tmp_path):
    fx.make_teleop_episode(tmp_path / "src" / "episode_0.hdf5", length=4, compress=True)
    _ingest(tmp_path, tmp_path / "src")
    root = tmp_path / "root"
    before = {p: p.stat().st_mtime_ns for p in root.joinpath("datasets").rglob("*") if p.is_file()}
    summary, _ = _ingest(tmp_path, tmp_path / "src")
    assert summary.skipped == ["episode_0"] and summary.written == []
    assert before == {p: p.stat().st_mtime_ns for p in root.joinpath("datasets").rglob("*") if p.is_file()}


def _corrupt_jpeg(path):
    with h5py.File(path, "r+") as h5:
        data = h5["observations/images/cam_low"]
        frame = data[2]
        frame[:64] = 7  # SOI and headers gone
        data[2] = frame


def _short_action(path):
    with h5py.File(path, "r+") as h5:
        action = h5["action"][:-1]
        del h5["action"]
        h5.create_dataset("action", data=action)


def _nan_action(path):
    with h5py.File(path, "r+") as h5:
        action = h5["action"][()]
        action[3, 5] = np.nan
        h5["action"][...] = action


def _unreadable(path):
    path.write_bytes(b"not an hdf5 file" * 10)


def _no_qpos(path):
    with h5py.File(path, "r+") as h5:
        del h5["observations/qpos"]


def _no_frames(path):
    with h5py.File(path, "r+") as h5:
        names = []
        h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim else None)
        for name in names:
            empty = h5[name][:0]
            del h5[name]
            h5.create_dataset(name, data=empty)


@pytest.mark.parametrize("damage, field, reason", [
    (_corrupt_jpeg, "observations/images/cam_low", "frame 2: corrupt JPEG"),
    (_short_action, "action", "5 steps but observations/qpos has 6"),
    (_nan_action, "action", "NaN or inf at frame 3"),
    (_unreadable, None, "unreadable HDF5"),
    (_no_qpos, "observations/qpos", "dataset missing"),
    (_no_frames, "length", "the episode has no frames"),
])
def test_bad_episode_is_quarantined_and_the_rest_lands(tmp_path, damage, field, reason):
    for index in range(3):
        fx.make_teleop_episode(tmp_path / "src" / f"episode_{index}.hdf5", length=6, compress=True)
    damage(tmp_path / "src" / "episode_1.hdf5")
    summary, store = _ingest(tmp_path, tmp_path / "src")
    assert store.episode_ids() == ["episode_0", "episode_2"]
    [line] = summary.quarantined
    assert "episode_1.hdf5" in line and "episode 'episode_1'" in line and reason in line
    if field:
        assert f"field '{field}'" in line
    [item] = store.quarantined()
    assert item["field"] == field and item["episode"] == "episode_1"


def test_strict_makes_the_first_bad_item_fatal(tmp_path):
    fx.make_teleop_episode(tmp_path / "src" / "episode_0.hdf5", length=6, compress=True)
    _corrupt_jpeg(tmp_path / "src" / "episode_0.hdf5")
    with pytest.raises(ValueError, match="corrupt JPEG"):
        ingest_teleop(str(tmp_path / "root"), "tel", str(tmp_path / "src"), teleop.TeleopOptions(), strict=True)


def test_jpeg_lengths_ignore_zero_padding():
    buffers = np.zeros((2, 10), dtype=np.uint8)
    buffers[0, :4] = [0xFF, 0xD8, 0xFF, 0xD9]
    buffers[1, :6] = [0xFF, 0xD8, 0, 0, 0xFF, 0xD9]
    np.testing.assert_array_equal(teleop.jpeg_lengths(buffers), [4, 6])
