"""Object storage: the whole chain with the root at s3://bucket/prefix, against moto's S3 server
started on loopback by the test; shard claims on S3 (conditional PUT); two flows building the
same version at once, on S3 and on a local disk, write each shard once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from cluster_servers import TESTS, DaskCluster, moto_bucket, child_env, shared_prefect_api
from fixtures_sources import make_teleop_episode
from foresight.storage.claims import ShardClaim, create_exclusive, current_claim
from foresight.storage.fs import Root
from foresight.storage.targets import TargetStore
from test_cluster_stage import held_generations, synthetic_clips, synthetic_recipe, written_shards

BUCKET = "foresight-test"
RUN_TIMEOUT_S = 420

pytestmark = pytest.mark.slow  # starts real servers; still part of `make test`


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto in server mode; this process and its children talk to it through the AWS variables."""
    with moto_bucket(tmp_path_factory.mktemp("moto"), BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    return shared_prefect_api(tmp_path_factory.getbasetemp())


def cli(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start the foresight command (or a test script) as a separate process."""
    handle = open(log_path, "wb")
    return subprocess.Popen([sys.executable, *args], stdout=handle, stderr=subprocess.STDOUT, env=env)


def finish(proc: subprocess.Popen, log_path: Path) -> str:
    rc = proc.wait(timeout=RUN_TIMEOUT_S)
    output = log_path.read_text(errors="replace")
    assert rc == 0, output[-5000:]
    return output


def test_claims_on_s3_are_exclusive(s3):
    root = Root(f"s3://{BUCKET}/claims")
    wins = []
    barrier = threading.Barrier(6)

    def race(index: int) -> None:
        barrier.wait()
        wins.append(create_exclusive(root, "race/marker", str(index).encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(wins) == 1
    first, second = ShardClaim(root, "text-0123456789ab", 0), ShardClaim(root, "text-0123456789ab", 0)
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    assert current_claim(root, "text-0123456789ab", 0)[0] == 3


@pytest.mark.parametrize("where", ["s3", "local"])
def test_two_flows_build_one_version_each_shard_written_once(tmp_path, s3, api, where):
    root = f"s3://{BUCKET}/concurrent" if where == "s3" else str(tmp_path / "root")
    clips, shard_size = 32, 2  # 16 shards x 1 s: long enough that a late-starting flow still gets some
    write_log = tmp_path / "writes.log"
    args = [str(TESTS / "test_cluster_stage.py"), "--root", root, "--clips", str(clips), "--shard-size",
            str(shard_size), "--delay", "1.0", "--write-log", str(write_log), "--workers", "2"]
    env = child_env(FORESIGHT_CLAIM_TTL_S="30")
    flows = [cli(args, tmp_path / f"flow{i}.log", env) for i in range(2)]
    versions = {finish(flow, tmp_path / f"flow{i}.log").strip().splitlines()[-1] for i, flow in enumerate(flows)}
    version = synthetic_recipe(clips, shard_size, 0).version_id()
    assert versions == {version}
    shards = clips // shard_size
    assert written_shards(write_log) == list(range(shards))  # every shard written exactly once
    writers = {line.split()[1] for line in write_log.read_text().splitlines()}
    assert len(writers) == 2  # both flows worked on the version at the same time
    assert all(held_generations(root, version, i) == 1 for i in range(shards))
    reader = TargetStore(root).open(version)
    assert reader.manifest.status == "complete" and reader.verify() == []
    assert np.array_equal(reader.read("value"), synthetic_clips(0, range(clips))["value"])


PIPELINE = """
name = "s3-chain"
dataset = "toy"
[ingest]
kind = "teleop"
src = "{src}"
options = {{ fps = 10.0, instruction = "pick up the cube" }}
[plan]
frames = 4
stride = 2
every = 4
limit = 4
[text]
model = "tiny"
shard_size = 2
[generate]
model = "tiny"
params = {{ num_frames = 4, size = 32, steps = 2 }}
batch = 2
shard_size = 2
[[teachers]]
teacher = "dinov2"
model = "tiny"
batch = 2
[export]
codec = "f16"
"""


def test_whole_chain_on_s3_on_dask(tmp_path, s3, api):
    """First run on a real Dask cluster (its workers get the S3 endpoint), then a local rerun."""
    src = tmp_path / "teleop"
    for index in range(2):
        make_teleop_episode(src / f"episode_{index}.hdf5", length=12, cameras=("cam_high",), size=(32, 32))
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text(PIPELINE.format(src=src))
    root_url = f"s3://{BUCKET}/chain"
    run = ["-c", "from foresight.flows.cli import main; main()", "run", str(pipeline), "--root", root_url, "--json"]
    cluster = DaskCluster(tmp_path, n_workers=2)  # after the s3 fixture: workers inherit its endpoint
    try:
        first = _json_tail(tmp_path, [*run, "--dask-address", cluster.address], "run1")
    finally:
        cluster.stop()
    assert first["runner"] == f"dask cluster at {cluster.address}"
    stages = {row["stage"]: row for row in first["stages"]}
    assert list(stages) == ["ingest", "plan", "text", "generate", "teachers:dinov2", "export"]
    assert all(row["status"] == "ran" for row in stages.values()) and first["root"] == root_url

    root = Root(root_url)
    targets = TargetStore(root)
    for stage in ("text", "generate", "teachers:dinov2"):
        assert targets.open(stages[stage]["output"]).verify() == []
    index = root.read_json(f"exports/{stages['export']['output']}/index.json")
    for shard in index["shards"]:
        assert root.sha256(f"exports/{stages['export']['output']}/{shard['name']}") == shard["sha256"]

    second = _json_tail(tmp_path, run, "run2")  # everything is complete: every stage is skipped
    assert [(r["stage"], r["status"], r["output"]) for r in second["stages"]] == \
        [(name, "skipped", row["output"]) for name, row in stages.items()]


def _json_tail(tmp_path: Path, run: list[str], name: str) -> dict:
    """Run the CLI with --json and parse the JSON document it prints last."""
    output = finish(cli(run, tmp_path / f"{name}.log", child_env()), tmp_path / f"{name}.log")
    return json.loads(output[output.rindex("\n{") + 1 if "\n{" in output else output.index("{"):])
