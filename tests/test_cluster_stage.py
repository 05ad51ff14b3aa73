"""A deterministic numpy stage used by the cluster tests, and its own single-process tests.

The stage is a flows.build Stage like the real ones (one claiming task per shard, then wait for
shards other builders hold, then finalize), but with arithmetic instead of models, so the runner, claim and fault tests are fast
and do not depend on any model code. Each write is logged (shard, pid) to a local file so tests
can count writes. Run as a command (what the Dask test submits)::

    python tests/test_cluster_stage.py --root R --clips 12 --shard-size 3 --dask-address tcp://...
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from prefect import flow, task

from foresight.flows.build import TargetOutput, TargetStage, prefect_tasks, write_shards
from foresight.flows.build import build as build_output
from foresight.flows.cli.runner import runner_options
from foresight.flows.runtime import RunnerChoice, gather, run_flow
from foresight.schemas.base import StrictModel
from foresight.schemas.target import ArraySpec, TargetRecipe
from foresight.storage import layout
from foresight.storage.claims import ClaimSet, current_claim
from foresight.storage.fs import open_root
from foresight.storage.targets import TargetStore

STAGE = "tests.synthetic"
FEATURES = (4, 8)


def synthetic_recipe(num_clips: int, shard_size: int, seed: int) -> TargetRecipe:
    return TargetRecipe(kind="text", stage=STAGE, stage_version=1,
                        params={"num_clips": num_clips, "shard_size": shard_size, "seed": seed})


def synthetic_clips(seed: int, clips: range) -> dict[str, np.ndarray]:
    """Values of a range of clips: each clip from its own seeded generator (order independent)."""
    values = np.stack([np.random.default_rng([seed, i]).standard_normal(FEATURES, dtype=np.float32)
                       for i in clips])
    return {"value": values, "clip": np.arange(clips.start, clips.stop, dtype=np.int64)}


def _log_write(write_log: str | None, shard: int) -> None:
    if write_log:
        # O_APPEND writes of one short line are atomic between processes on a local disk.
        with open(write_log, "a") as handle:
            handle.write(f"{shard} {os.getpid()}\n")


class SyntheticConfig(StrictModel):
    """The synthetic stage's config."""

    num_clips: int
    shard_size: int
    seed: int = 0


class LoggedOutput(TargetOutput):
    """A target version that logs each shard write (shard, pid) once it is stored."""

    def __init__(self, writer, write_log: str | None):
        super().__init__(writer)
        self.write_log = write_log

    def write(self, shard: int, payload: dict) -> None:
        super().write(shard, payload)
        _log_write(self.write_log, shard)


class SyntheticWorker:
    """Arithmetic instead of a model: each shard's values from seeded generators."""

    identity = None

    def __init__(self, output: TargetOutput, seed: int, delay_s: float):
        self.writer, self.seed, self.delay_s = output.writer, seed, delay_s

    def compute(self, shard: int) -> dict[str, np.ndarray]:
        arrays = synthetic_clips(self.seed, self.writer.shard_clips(shard))
        time.sleep(self.delay_s)  # stands in for model time: a window in which a test can kill us
        return arrays


class SyntheticStage(TargetStage[SyntheticConfig]):
    """A stage through flows.build like the real ones (pickled to Dask workers with its settings)."""

    name, config_type = "synthetic", SyntheticConfig

    def __init__(self, delay_s: float = 0.0, write_log: str | None = None):
        self.delay_s, self.write_log = delay_s, write_log

    def recipe(self, root_url: str, config: SyntheticConfig) -> TargetRecipe:
        return synthetic_recipe(config.num_clips, config.shard_size, config.seed)

    def arrays(self, root_url: str, config: SyntheticConfig, recipe: TargetRecipe):
        n = config.num_clips
        return [ArraySpec(name="value", shape=[n, *FEATURES], dtype="float32"),
                ArraySpec(name="clip", shape=[n], dtype="int64")], n, config.shard_size

    def begin(self, root_url: str, config: SyntheticConfig, recipe: TargetRecipe) -> TargetOutput:
        return LoggedOutput(super().begin(root_url, config, recipe).writer, self.write_log)

    def reopen(self, root_url: str, output_id: str) -> TargetOutput:
        return LoggedOutput(TargetStore(root_url).writer(output_id), self.write_log)

    def open_worker(self, root_url: str, config: SyntheticConfig, output: TargetOutput, shards: list[int]):
        return SyntheticWorker(output, config.seed, self.delay_s)

    def inputs(self, root_url: str, config: SyntheticConfig, recipe: TargetRecipe) -> list[str]:
        return []


@flow(name="synthetic-stage")
def synthetic_flow(root: str, num_clips: int, shard_size: int, seed: int = 0, delay_s: float = 0.0,
                   write_log: str | None = None) -> str:
    """Build (or finish) the synthetic version with one claiming task per shard; returns its id."""
    config = SyntheticConfig(num_clips=num_clips, shard_size=shard_size, seed=seed)
    return build_output(SyntheticStage(delay_s, write_log), root, config, prefect_tasks(0), poll_s=0.2).version


@task
def worker_name(device: str) -> str:
    """Name of the Dask worker running this task (placement tests); ``device`` only routes it."""
    from distributed import get_worker

    return get_worker().name


@flow(name="placement")
def placement_flow(devices: list[str]) -> list[str]:
    """Which worker ran a task per device: CUDA tasks must land on workers declaring a GPU."""
    return gather([worker_name.submit(device) for device in devices])


def build(root: str, num_clips: int, shard_size: int, runner: RunnerChoice | None = None, **kwargs) -> str:
    return run_flow(synthetic_flow, runner, open_root(root), root=root, num_clips=num_clips, shard_size=shard_size,
                    **kwargs)


app = typer.Typer(add_completion=False)


@app.command()
@runner_options
def main(root: str = typer.Option(..., "--root"), clips: int = typer.Option(12, "--clips"),
         shard_size: int = typer.Option(3, "--shard-size"), seed: int = typer.Option(0, "--seed"),
         delay: float = typer.Option(0.0, "--delay"), write_log: str = typer.Option(None, "--write-log"),
         runner: RunnerChoice = None) -> None:
    """Build the synthetic version and print its id."""
    typer.echo(build(root, clips, shard_size, runner, seed=seed, delay_s=delay, write_log=write_log))


def shard_checksums(root: str, version_id: str) -> dict[str, dict[str, str]]:
    """The per-shard checksums recorded at finalize (what 'byte-identical' compares)."""
    return TargetStore(root).open(version_id).sums.by_shard()


def written_shards(write_log: Path) -> list[int]:
    return sorted(int(line.split()[0]) for line in write_log.read_text().splitlines())


def held_generations(root: str, version_id: str, shard: int) -> int:
    """How many times a builder acquired this shard (claims alternate held / released)."""
    store = TargetStore(root)
    folder = f"{layout.target_dir(version_id)}/{layout.CLAIMS_DIR}/{shard}"
    names = store.root.ls(folder)
    return sum(1 for n in names if '"held"' in store.root.read_bytes(f"{folder}/{n}").decode())


# -- tests of the stage itself (single process) ---------------------------------------------------

@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    from cluster_servers import shared_prefect_api

    shared_prefect_api(tmp_path_factory.getbasetemp())


def test_single_process_build_is_deterministic_and_resumes(tmp_path, prefect_env):
    root = str(tmp_path / "root")
    log_path = tmp_path / "writes.log"
    version = build(root, 7, 3, write_log=str(log_path))
    reader = TargetStore(root).open(version)
    assert reader.manifest.status == "complete" and reader.verify() == []
    assert np.array_equal(reader.read("value"), synthetic_clips(0, range(7))["value"])
    assert written_shards(log_path) == [0, 1, 2]
    assert all(held_generations(root, version, i) == 1 for i in range(3))
    # A second build of the complete version writes nothing.
    assert build(root, 7, 3, write_log=str(log_path)) == version
    assert written_shards(log_path) == [0, 1, 2]
    # Another root gives byte-identical shards.
    other = str(tmp_path / "other")
    assert build(other, 7, 3) == version
    assert shard_checksums(other, version) == shard_checksums(root, version)


def test_claimed_shard_is_skipped_and_finished_after_release(tmp_path, prefect_env):
    root = str(tmp_path / "root")
    store = TargetStore(root)
    recipe = synthetic_recipe(6, 3, 0)
    writer = store.begin(recipe, [ArraySpec(name="value", shape=[6, *FEATURES], dtype="float32"),
                                  ArraySpec(name="clip", shape=[6], dtype="int64")], 6, 3)
    stage, config = SyntheticStage(), SyntheticConfig(num_clips=6, shard_size=3)
    with ClaimSet(root, writer.version_id, is_done=writer.is_done).hold(1) as held:
        assert held
        assert write_shards(stage, root, writer.version_id, config, [1]).shards == []  # held: skipped
        generation, record = current_claim(root, writer.version_id, 1)
        assert record.state == "held" and record.pid == os.getpid() and generation == 0
    assert current_claim(root, writer.version_id, 1)[1].state == "released"
    assert write_shards(stage, root, writer.version_id, config, [1]).shards == [1]
    assert write_shards(stage, root, writer.version_id, config, [1]).shards == []  # done: skipped


if __name__ == "__main__":
    # Re-import under the module's own name so Dask workers unpickle tasks by reference.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_cluster_stage import app as stage_app

    stage_app()
