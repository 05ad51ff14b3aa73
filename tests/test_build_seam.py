"""The build seam (flows/build.py): skip, resume, claims, waiting and the identity check belong to
build() alone. Shown on a fake stage (arithmetic, no model, in-process), by the stage registry
(every sharded stage's flow is a build() call), and by two `foresight export` processes racing."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import integrity_world as iw
import trainers_world as tw
from foresight.flows import build as seam
from foresight.flows.build import BuildSummary, TargetOutput, TargetStage, build, in_process, write_shards
from foresight.flows.export import EXPORT
from foresight.flows.generate import GENERATE, TEXT
from foresight.flows.pi0 import PI0
from foresight.flows.pipeline import STAGES
from foresight.flows.teachers import TEACHERS
from foresight.schemas.base import StrictModel
from foresight.schemas.model import ModelIdentity
from foresight.schemas.target import ArraySpec, TargetRecipe
from foresight.storage.claims import ClaimSet, current_claim
from foresight.storage.exports import ExportStore
from foresight.storage.fs import Root
from foresight.storage.targets import TargetStore

REPO = Path(__file__).resolve().parents[1]


class CountConfig(StrictModel):
    """A fake stage's config: how many clips, and which fake model computes them."""

    num_clips: int = 6
    shard_size: int = 2
    seed: int = 0


def fake_identity(seed: int) -> ModelIdentity:
    return ModelIdentity(spec="tiny", family="fake", source="tiny", seed=seed, config={"width": 3})


class CountWorker:
    """Clip i's values are i + seed; every computed shard is recorded on the stage."""

    def __init__(self, stage: "CountStage", output: TargetOutput, seed: int):
        self.stage, self.writer, self.identity, self.seed = stage, output.writer, fake_identity(seed), seed

    def compute(self, shard: int) -> dict[str, np.ndarray]:
        self.stage.computed.append(shard)
        clips = self.writer.shard_clips(shard)
        return {"value": np.arange(clips.start, clips.stop, dtype=np.float32)[:, None] + self.seed + np.zeros(3)}


class CountStage(TargetStage[CountConfig]):
    """A target stage through build(); the recipe always records the model of seed 0."""

    name, config_type = "count", CountConfig

    def __init__(self):
        self.computed: list[int] = []

    def recipe(self, root_url: str, config: CountConfig) -> TargetRecipe:
        return TargetRecipe(kind="text", stage="tests.count", stage_version=1, model=fake_identity(0),
                            params={"num_clips": config.num_clips, "shard_size": config.shard_size})

    def arrays(self, root_url: str, config: CountConfig, recipe: TargetRecipe):
        return [ArraySpec(name="value", shape=[config.num_clips, 3], dtype="float32")], config.num_clips, \
            config.shard_size

    def open_worker(self, root_url: str, config: CountConfig, output: TargetOutput, shards: list[int]) -> CountWorker:
        return CountWorker(self, output, config.seed)

    def inputs(self, root_url: str, config: CountConfig, recipe: TargetRecipe) -> list[str]:
        return []


def begin(stage: CountStage, root: str, config: CountConfig) -> TargetOutput:
    return stage.begin(root, config, stage.recipe(root, config))


def test_build_writes_every_shard_once_and_a_rerun_is_skipped(tmp_path):
    stage, root = CountStage(), str(tmp_path)
    summary = build(stage, root, CountConfig(), in_process)
    assert isinstance(summary, BuildSummary) and not summary.skipped and summary.status == "complete"
    assert (summary.shards_written, summary.clips, summary.num_samples, summary.num_shards) == (3, 6, 6, 3)
    assert sorted(stage.computed) == [0, 1, 2]
    reader = TargetStore(root).open(summary.version)
    assert reader.verify() == [] and reader.read("value")[:, 0].tolist() == list(range(6))
    assert "samples_per_s" in reader.manifest.timings
    again = build(stage, root, CountConfig(), in_process)
    assert again.skipped and again.version == summary.version and again.shards_written == 0
    assert sorted(stage.computed) == [0, 1, 2]  # nothing computed by the rerun


def test_build_resumes_without_recomputing_done_shards(tmp_path):
    stage, root = CountStage(), str(tmp_path)
    output = begin(stage, root, CountConfig())
    assert write_shards(stage, root, output.version_id, CountConfig(), [1]).shards == [1]
    summary = build(stage, root, CountConfig(), in_process)
    assert stage.computed == [1, 0, 2] and summary.shards_written == 2 and summary.clips == 4


def test_other_weights_are_refused_before_any_shard(tmp_path):
    stage, root = CountStage(), str(tmp_path)
    output = begin(stage, root, CountConfig())
    with pytest.raises(ValueError, match="not the one the version was started with") as err:
        write_shards(stage, root, output.version_id, CountConfig(seed=1), [0])
    assert "\n" not in str(err.value) and stage.computed == []


def test_build_waits_for_a_shard_another_builder_holds_then_writes_it(tmp_path):
    stage, root = CountStage(), str(tmp_path)
    output = begin(stage, root, CountConfig())
    other = ClaimSet(root, output.version_id, is_done=output.is_done)
    assert other.take(0) is not None  # a live builder (this process) holds shard 0
    result: dict[str, BuildSummary] = {}
    builder = threading.Thread(target=lambda: result.update(summary=build(stage, root, CountConfig(), in_process,
                                                                          poll_s=0.05)))
    builder.start()
    deadline = time.monotonic() + 60
    while sorted(stage.computed) != [1, 2] and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert builder.is_alive() and 0 not in stage.computed  # waiting, not writing a held shard
    other.release(0)  # the holder gave up without writing it: the waiting build picks it up
    builder.join(timeout=60)
    assert result["summary"].status == "complete" and stage.computed == [1, 2, 0]
    assert current_claim(root, output.version_id, 0)[1].state == "released"


def test_a_dead_builders_shard_is_taken_over_at_once(tmp_path):
    stage, root = CountStage(), str(tmp_path)
    output = begin(stage, root, CountConfig())
    code = ("from foresight.storage.claims import ShardClaim; import time; "
            f"c = ShardClaim({root!r}, {output.version_id!r}, 2, ttl_s=600); assert c.acquire(); "
            "print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.readline().strip() == "held"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    summary = build(stage, root, CountConfig(), in_process, poll_s=0.05)
    assert summary.status == "complete" and sorted(stage.computed) == [0, 1, 2]


def test_every_sharded_stage_of_the_chain_is_a_build_stage():
    stages = {chain.key: chain for chain in STAGES}
    assert list(stages) == ["text", "generate", "teachers", "pi0", "export"]
    for chain, stage in zip(STAGES, (TEXT, GENERATE, TEACHERS, PI0, EXPORT), strict=True):
        assert isinstance(stage, seam.Stage) and stage.config_type is chain.config
        # The flow body is one build() call: the seam owns begin, claims, writes and finalize.
        names = chain.flow.fn.__code__.co_names
        assert "build" in names and not {"finalize", "begin", "claim_shard", "ClaimSet"} & set(names), chain.key


# ---------------------------------------------------------------- two `foresight export` at once
def cli_export(args: list[str]) -> None:
    from foresight.flows.cli import app

    app(args, standalone_mode=False)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    from cluster_servers import shared_prefect_api

    shared_prefect_api(tmp_path_factory.getbasetemp())


def test_two_concurrent_cli_exports_write_each_shard_once_and_both_succeed(tmp_path, prefect_env):
    root = Root(tmp_path / "root")
    plan = tw.make_plan(root, tw.make_dataset(root), 16)
    ids = tw.make_targets(root, plan, 16)
    args = ["export", "--plan", plan, "--targets", f"{ids['video']},{ids['dinov2']}", "--shard-size", "20KB",
            "--codec", "bf16", "--action-chunk", "5", "--root", root.url]
    codes, lines = iw.race([functools.partial(cli_export, args)] * 2, tmp_path / "publish.log")
    assert codes == [0, 0], lines
    [export_id] = ExportStore(root).ids()
    index = ExportStore(root).index(export_id)
    assert len(index.shards) > 2  # enough shards for the two builders to share them
    assert sorted(line.split()[1] for line in lines) == sorted(s.name for s in index.shards)  # each once
    assert ExportStore(root).verify(export_id) == []


# ---------------------------------------------------------------- pipeline.toml through the registry
def test_pipeline_with_pi0_builds_the_ids_the_cli_builds(tmp_path, prefect_env):
    """[text] and [pi0] of a pipeline file give the ids tests/test_pinned_ids.py pins for the same
    settings given to `foresight text` / `foresight pi0-targets`, and the same stored bytes."""
    from typer.testing import CliRunner

    from factories import make_dataset, write_episode
    from foresight.flows.cli import app
    from foresight.flows.pipeline import load_pipeline, run_pipeline
    from foresight.storage.targets import TargetStore
    from test_pinned_ids import PINNED

    roots = {way: str(tmp_path / way) for way in ("root", "cli")}
    for each in roots.values():
        store = make_dataset(each, name="pins", camera="cam", size=32)
        for index in range(2):
            write_episode(store, f"ep{index}", length=20, seed=index, camera="cam")
    root = roots["root"]
    path = tmp_path / "pipeline.toml"
    path.write_text('dataset = "pins"\n[plan]\nframes = 4\nstride = 1\nevery = 6\nlimit = 4\n'
                    '[text]\nmodel = "tiny"\nshard_size = 2\n'
                    '[pi0]\nmodel = "tiny"\npairs = 1\nstate_indices = [0, 1, 2, 3, 4, 5]\nshard_size = 2\n'
                    'batch = 2\nmax_text_tokens = 24\n')
    summary = run_pipeline(load_pipeline(path), root)
    outputs = {row.stage: row.output for row in summary.stages}
    assert outputs == {"plan": PINNED["plan"], "text": PINNED["text"], "pi0": PINNED["pi0"]}
    at = ["--root", roots["cli"]]
    for args in (["plan", "--dataset", "pins", "--frames", "4", "--stride", "1", "--every", "6", "--limit", "4"],
                 ["pi0-targets", "--plan", PINNED["plan"], "--model", "tiny", "--pairs", "1", "--state-indices",
                  "0-5", "--shard-size", "2", "--batch", "2", "--max-text-tokens", "24"]):
        assert CliRunner().invoke(app, [*args, *at]).exit_code == 0, args
    by_pipeline, by_cli = (TargetStore(each).open(PINNED["pi0"]).sums.by_shard() for each in (root, roots["cli"]))
    assert by_pipeline == by_cli and by_cli  # shard checksums: the same bytes
    again = run_pipeline(load_pipeline(path), root)
    assert [row.status for row in again.stages] == ["skipped"] * 3
