"""Build progress counted from the store: the terminal bar and the Prefect progress artifact
follow the shards as they are done (flows/progress.py), and nothing runs when neither is wanted."""

from __future__ import annotations

import threading

from prefect import flow

from foresight.flows.progress import BuildProgress

CLIPS_PER_SHARD = {0: 4, 1: 4, 2: 3}


class FakeOutput:
    """Pending shards that another thread completes one by one."""

    def __init__(self):
        self.left = sorted(CLIPS_PER_SHARD)
        self.lock = threading.Lock()
        self.looks = 0

    def pending(self) -> list[int]:
        with self.lock:
            self.looks += 1
            return list(self.left)

    def finish(self, shard: int) -> None:
        with self.lock:
            self.left.remove(shard)


def test_the_bar_follows_the_done_shards(capsys):
    output = FakeOutput()
    with BuildProgress("teachers teacher-abc", output.pending, CLIPS_PER_SHARD.get, poll_s=0.01,
                       terminal=True, artifact=False) as progress:
        assert progress.total == 11
        output.finish(1)
        assert progress.update() == (1, 4)
        output.finish(0)
        output.finish(2)
    assert progress.update() == (3, 11)
    bar = capsys.readouterr().err
    assert "teachers teacher-abc" in bar and "11/11" in bar and "3/3 shards" in bar


def test_nothing_is_polled_without_a_terminal_or_a_flow_run():
    output = FakeOutput()
    with BuildProgress("x", output.pending, CLIPS_PER_SHARD.get, poll_s=0.01, terminal=False) as progress:
        output.finish(0)
    assert progress._thread is None and output.looks == 0


def test_a_flow_run_gets_a_progress_artifact_that_reaches_100():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    output = FakeOutput()

    @flow(name="progress-test")
    def building() -> str:
        from prefect.runtime import flow_run

        with BuildProgress("export export-abc", output.pending, CLIPS_PER_SHARD.get, poll_s=0.01,
                           terminal=False) as progress:
            assert progress.artifact
            for shard in sorted(CLIPS_PER_SHARD):
                output.finish(shard)
        return flow_run.id

    run_id = building()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    progress_artifacts = [a for a in artifacts if a.type == "progress"]
    assert len(progress_artifacts) == 1 and progress_artifacts[0].data == 100.0
    assert "export export-abc" in progress_artifacts[0].description
