"""Episode store: round trip, atomic publication under SIGKILL, idempotence, fingerprints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from foresight.schemas.base import FORMAT_VERSION
from tests.factories import FEATURES, episode_arrays, make_dataset, write_episode


@pytest.mark.parametrize("url_kind", ["path", "file", "memory"])
def test_episode_round_trip(tmp_path, url_kind):
    root = {"path": str(tmp_path), "file": f"file://{tmp_path}", "memory": f"memory://rt-{tmp_path.name}"}[url_kind]
    store = make_dataset(root)
    arrays = write_episode(store, "ep-0", length=150)  # > 2 frame shards, partial last shard
    assert store.episode_ids() == ["ep-0"]
    frames = store.read_frames("ep-0", "cam")
    assert frames.dtype == np.uint8 and frames.tobytes() == arrays["frames"].tobytes()
    assert np.array_equal(store.read_frames("ep-0", "cam", [3, 77, 149]), arrays["frames"][[3, 77, 149]])
    assert np.array_equal(store.read_column("ep-0", "action"), arrays["action"])
    assert np.array_equal(store.read_column("ep-0", "state"), arrays["state"])
    table = store.read_lowdim("ep-0")
    assert table.column("frame_index").to_pylist() == list(range(150))
    record = store.record("ep-0")
    assert record.length == 150 and record.instructions == ["reach the thing"]


def test_same_source_is_skipped_and_changed_source_replaces(tmp_path):
    store = make_dataset(tmp_path)
    write_episode(store, "ep-0", seed=1, checksum="aaa")
    assert store.has_episode("ep-0", "aaa") and not store.has_episode("ep-0", "bbb")
    fingerprint = store.fingerprint()
    new = write_episode(store, "ep-0", seed=2, checksum="bbb")
    assert np.array_equal(store.read_frames("ep-0", "cam"), new["frames"])
    assert store.fingerprint() != fingerprint
    assert store.episode_ids() == ["ep-0"]


def test_failed_write_leaves_nothing(tmp_path):
    store = make_dataset(tmp_path)
    record_arrays = write_episode(store, "keep")
    with pytest.raises(ValueError, match="episode 'bad'.*'action'.*NaN"):
        from foresight.schemas.dataset import EpisodeRecord

        record = EpisodeRecord(episode_id="bad", task="t", length=5, source_path="x", source_checksum="c")
        with store.writer(record, FEATURES) as writer:
            writer.append_frames("cam", record_arrays["frames"][:5])
            writer.set_lowdim({"action": np.full((5, 4), np.nan), "state": np.zeros((5, 6))})
    assert store.episode_ids() == ["keep"]


def _jpeg_episode(store, publisher, episode_id: str, length: int, seed: int) -> np.ndarray:
    """One episode of a pass-through JPEG camera 'cam' (chunks as a source hands them) and a raw
    'depth' camera, through ``publisher``; returns the decoded JPEG frames."""
    import cv2

    from foresight.schemas.dataset import EpisodeRecord, FrameStorage

    arrays = episode_arrays(length, 16, seed)
    jpegs = [cv2.imencode(".jpg", frame)[1].tobytes() for frame in arrays["frames"]]
    storage = {"cam": FrameStorage(codec="source-jpeg", pass_through=True), "depth": FrameStorage(codec="raw")}
    record = EpisodeRecord(episode_id=episode_id, task="t", length=length, source_path="x", source_checksum=f"c{seed}")
    with store.writer(record, FEATURES, storage, publisher=publisher) as writer:
        for start in range(0, length, 5):
            writer.append_chunks("cam", jpegs[start:start + 5], len(jpegs[start:start + 5]), (16, 16, 3))
            writer.append_frames("depth", arrays["frames"][start:start + 5])
        writer.set_lowdim({"action": arrays["action"], "state": arrays["state"]})
    return np.stack([cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs])


def test_background_publisher_syncs_each_episode_before_its_marker(tmp_path, monkeypatch):
    """With an EpisodePublisher each episode is synced whole (pass-through chunks and the metadata
    the writer stores itself included) before its rename and marker, and all are complete once
    the publisher's ``with`` is left."""
    import foresight.storage.fs as fs
    from foresight.storage.episodes import EpisodePublisher

    synced: set[str] = set()
    unsynced_at_rename: list[list[str]] = []
    real_fsync = os.fsync
    monkeypatch.setattr(fs.os, "fsync", lambda fd: (synced.add(os.readlink(f"/proc/self/fd/{fd}")),
                                                    real_fsync(fd))[1])

    def record_rename(self, src_rel, dst_rel, _real=fs.Root.rename):
        if ".staging" in src_rel:
            folder = self.path(src_rel)
            staged = [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files] + [folder]
            unsynced_at_rename.append(sorted(p for p in staged if p not in synced))
        return _real(self, src_rel, dst_rel)

    monkeypatch.setattr(fs.Root, "rename", record_rename)
    store = make_dataset(tmp_path)
    with EpisodePublisher() as publisher:
        decoded = {f"ep{i}": _jpeg_episode(store, publisher, f"ep{i}", 12, i) for i in range(3)}
    assert unsynced_at_rename == [[], [], []]
    assert store.episode_ids() == ["ep0", "ep1", "ep2"]
    for episode_id, frames in decoded.items():
        assert np.array_equal(store.read_frames(episode_id, "cam"), frames)
        depth = episode_arrays(12, 16, int(episode_id[2:]))["frames"]
        assert np.array_equal(store.read_frames(episode_id, "depth"), depth)


@pytest.mark.parametrize("length", [1, 37, 150])
def test_pass_through_metadata_is_what_zarr_writes(tmp_path, length):
    """The writer stores pass-through cameras' zarr documents itself (made once per camera format,
    the length set as zarr's resize does): the bytes equal zarr's own for the same array."""
    import zarr

    from foresight.storage import frame_codecs
    from foresight.storage.episodes import EpisodePublisher

    store = make_dataset(tmp_path)
    with EpisodePublisher() as publisher:
        _jpeg_episode(store, publisher, "ep0", length, 0)
    frames = tmp_path / "datasets/toy/episodes/ep0/frames.zarr"
    stored = store.frame_storage("ep0", "cam")
    expected = zarr.storage.MemoryStore()
    serializer, compressors = frame_codecs.serializer_and_compressors(stored, None, 30.0)
    zarr.open_group(expected, mode="w").create_array(
        "cam", shape=(length, 16, 16, 3), dtype="uint8", chunks=(1, 16, 16, 3), shards=(64, 16, 16, 3),
        serializer=serializer, compressors=compressors, fill_value=0,
        attributes={"frame_storage": stored.model_dump(mode="json")})
    for key in ("zarr.json", "cam/zarr.json"):
        assert (frames / key).read_bytes() == expected._store_dict[key].to_bytes(), key


def test_background_publisher_raises_a_failed_publication(tmp_path, monkeypatch):
    """A publication that fails (here its sync) is raised when the publisher's ``with`` is left;
    that episode gets no marker, the others are published."""
    import foresight.storage.fs as fs
    from foresight.storage.episodes import EpisodePublisher

    real_sync = fs.Root.fsync_tree

    def failing_sync(self, rel):
        if "/ep1-" in rel:
            raise OSError(5, "Input/output error")
        return real_sync(self, rel)

    monkeypatch.setattr(fs.Root, "fsync_tree", failing_sync)
    store = make_dataset(tmp_path)
    with pytest.raises(OSError, match="Input/output error"):
        with EpisodePublisher() as publisher:
            for i in range(3):
                _jpeg_episode(store, publisher, f"ep{i}", 6, i)
    assert "ep1" not in store.episode_ids() and "ep0" in store.episode_ids()


def test_format_version_mismatch_is_a_clear_error(tmp_path):
    store = make_dataset(tmp_path)
    data = store.root.read_json(store.dir, "dataset.json")
    data["format_version"] = FORMAT_VERSION + 1
    store.root.write_json_atomic(f"{store.dir}/dataset.json", data)
    with pytest.raises(ValueError, match="format_version"):
        store.info()


WRITER_SCRIPT = textwrap.dedent("""
    import sys, time, numpy as np
    sys.path.insert(0, {repo!r})
    from foresight.schemas.dataset import EpisodeRecord
    from tests.factories import FEATURES
    from foresight.storage.episodes import EpisodeStore
    store = EpisodeStore({root!r}, "toy")
    record = EpisodeRecord(episode_id="big", task="t", length=400, source_path="x", source_checksum="c1")
    with store.writer(record, FEATURES) as writer:
        frames = np.random.default_rng(0).integers(0, 256, (400, 16, 16, 3), dtype=np.uint8)
        for start in range(0, 400, 10):
            writer.append_frames("cam", frames[start:start + 10])
            if start == 200:
                print("HALFWAY", flush=True)
                time.sleep(30)
        writer.set_lowdim({{"action": np.zeros((400, 4)), "state": np.zeros((400, 6))}})
""")


def test_sigkill_mid_episode_leaves_no_partial_episode(tmp_path):
    store = make_dataset(tmp_path)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = WRITER_SCRIPT.format(repo=repo, root=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while proc.stdout.readline().strip() != "HALFWAY":
        assert time.time() < deadline and proc.poll() is None, "writer never reached the middle"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert store.episode_ids() == []
    # A rerun completes the episode.
    write_episode(store, "big", length=400, checksum="c1")
    assert store.episode_ids() == ["big"] and store.record("big").length == 400
