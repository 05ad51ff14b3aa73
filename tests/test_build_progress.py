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


def test_an_export_look_lists_done_once_and_reads_no_plan(tmp_path, monkeypatch):
    """A look at a building export is one listing of ``_done/`` (and one existence check of its
    index): the build plan, which lists every clip, is read once per output, never per look."""
    from test_export_store import make_world

    from foresight.flows.export import EXPORT, ExportConfig, export_recipe, plan_export, write_shard
    from foresight.storage import fs
    from foresight.storage.exports import ExportStore

    world = make_world(tmp_path)
    config = ExportConfig(plan=world["plan"], targets=[world["video"], world["teacher"]], shard_size="12KB")
    recipe = export_recipe(world["root"], config)
    ExportStore(world["root"]).begin(plan_export(world["root"], recipe))
    write_shard(world["root"], recipe.export_id(), 1)
    output = EXPORT.reopen(world["root"], recipe.export_id())
    first = output.pending()
    assert 1 not in first and len(first) >= 2
    calls: list[tuple[str, tuple]] = []
    for name in ("ls", "read_json", "read_bytes", "open", "file_exists", "size"):  # (local file_exists is exists)
        original = getattr(fs.Root, name)
        monkeypatch.setattr(fs.Root, name, lambda self, *a, _n=name, _o=original, **k: calls.append((_n, a)) or
                            _o(self, *a, **k))
    assert output.pending() == first
    assert [name for name, _ in calls] == ["ls", "file_exists"]
    assert calls[0][1][-1] == "_done" and calls[1][1][0].endswith("index.json")


def test_the_wait_after_a_look_grows_with_its_cost(monkeypatch):
    """The polling thread waits at least LOOK_COST_FACTOR times as long as a look took (listings
    grow with the shards: the poll's share of one thread stays bounded)."""
    from foresight.flows import progress as progress_module

    clock, waits = [0.0], []

    class Stop(threading.Event):
        """A stop event whose waits are recorded, not slept; set after the fourth."""

        def wait(self, seconds: float) -> bool:
            waits.append(seconds)
            return len(waits) > 3

    def slow_look() -> list[int]:
        clock[0] += 0.5 * len(waits)  # looks take 0.5, 1.0, 1.5 s
        return [0]

    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: clock[0])
    progress = BuildProgress("x", slow_look, CLIPS_PER_SHARD.get, poll_s=2.0, terminal=False, artifact=False)
    progress._stop = Stop()
    progress.clips, progress.total = {0: 4}, 4
    progress._poll()
    assert waits == [2.0, 25.0, 50.0, 75.0]
