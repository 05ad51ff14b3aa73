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

from schemas.base import FORMAT_VERSION
from tests.factories import FEATURES, make_dataset, write_episode


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
        from schemas.dataset import EpisodeRecord

        record = EpisodeRecord(episode_id="bad", task="t", length=5, source_path="x", source_checksum="c")
        with store.writer(record, FEATURES) as writer:
            writer.append_frames("cam", record_arrays["frames"][:5])
            writer.set_lowdim({"action": np.full((5, 4), np.nan), "state": np.zeros((5, 6))})
    assert store.episode_ids() == ["keep"]


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
    from schemas.dataset import EpisodeRecord
    from tests.factories import FEATURES
    from storage.episodes import EpisodeStore
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
