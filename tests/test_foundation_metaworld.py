"""MetaWorld through the Prefect flow: upright frames, success recorded, instruction present."""

from __future__ import annotations

import numpy as np

from foresight.flows.ingest import MetaWorldIngestConfig, ingest_metaworld_flow
from foresight.flows.runtime import RunnerChoice, run_flow
from foresight.pipelines.ingest.metaworld import upright
from foresight.storage.episodes import EpisodeStore


def test_two_tasks_one_episode_through_the_flow(tmp_path):
    config = MetaWorldIngestConfig(dataset="mw", tasks=["reach", "button-press"], episodes_per_task=1, size=64)
    results = run_flow(ingest_metaworld_flow, RunnerChoice(), root_url=str(tmp_path), config=config)
    assert {name: r.succeeded for name, r in results.items()} == {"reach": 1, "button-press": 1}
    store = EpisodeStore(tmp_path, "mw")
    assert len(store.episode_ids()) == 2
    for record in store.records():
        assert record.success is True
        assert record.instructions and record.instructions[0]
        frames = store.read_frames(record.episode_id, "corner2")
        assert frames.shape == (record.length, 64, 64, 3)
        assert store.read_column(record.episode_id, "action").shape == (record.length, 4)
        assert np.abs(store.read_column(record.episode_id, "action")).max() <= 1.0
        assert store.read_column(record.episode_id, "state").shape == (record.length, 39)
        assert _is_upright(frames[0])
    # Rerunning changes nothing: every episode is skipped by its source checksum.
    again = run_flow(ingest_metaworld_flow, RunnerChoice(), root_url=str(tmp_path), config=config)
    assert all(r.skipped == 1 for r in again.values())


def _is_upright(frame: np.ndarray) -> bool:
    """In an upright corner2 view the plain backdrop fills the top rows; the floor and table the bottom.

    So the top band is flat (near-zero spread) and the bottom band is not; upside down it is the reverse.
    """
    gray = frame.astype(np.float32).mean(axis=-1)
    band = max(2, gray.shape[0] // 8)
    return gray[:band].std() < 1.0 < gray[-band:].std()


def test_upright_flips_corner_cameras_only():
    image = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    assert np.array_equal(upright(image, "corner2"), image[::-1, ::-1])
    assert np.array_equal(upright(image, "topview"), image)
