"""A flow on a real Dask cluster (scheduler + 2 workers on loopback) survives a SIGKILLed worker.

The flow is submitted through the command line with ``--dask-address``. One worker is killed
with SIGKILL while it holds a shard claim and has not finished the shard; Dask reruns the task on
the other worker, which takes the dead worker's claim over at once (same machine, dead pid) and
writes the shard. The version completes with shard checksums identical to a single-process run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cluster_servers import TESTS, DaskCluster, child_env, shared_prefect_api
from foresight.flows.runtime import RunnerChoice
from foresight.storage import layout
from foresight.storage.claims import current_claim
from foresight.storage.fs import open_root
from test_cluster_stage import build, held_generations, placement_flow, shard_checksums, synthetic_recipe, \
    written_shards

CLIPS, SHARD = 12, 3
FLOW_TIMEOUT_S = 300

pytestmark = pytest.mark.slow  # starts real servers; still part of `make test`


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    return shared_prefect_api(tmp_path_factory.getbasetemp())


@pytest.fixture
def cluster(tmp_path):
    cluster = DaskCluster(tmp_path, n_workers=2)
    yield cluster
    cluster.stop()


def _claimed_unfinished_shard(root_url: str, version_id: str, pids: set[int]) -> tuple[int, int] | None:
    """(shard, pid) of a shard a worker holds and has not finished, if any."""
    root = open_root(root_url)
    for name in root.ls(layout.target_dir(version_id), layout.CLAIMS_DIR):
        _, record = current_claim(root, version_id, int(name))
        if record is not None and record.state == "held" and record.pid in pids and \
                not root.exists(layout.target_dir(version_id), layout.DONE_DIR, name):
            return int(name), record.pid
    return None


def _kill_worker_mid_shard(cluster: DaskCluster, root_url: str, version_id: str,
                           flow: subprocess.Popen) -> tuple[int, int]:
    deadline = time.monotonic() + FLOW_TIMEOUT_S
    while time.monotonic() < deadline and flow.poll() is None:
        found = _claimed_unfinished_shard(root_url, version_id, set(cluster.worker_pids()))
        if found is not None:
            os.kill(found[1], signal.SIGKILL)
            return found
        time.sleep(0.05)
    raise AssertionError(f"no worker ever held an unfinished shard (flow rc={flow.poll()})")


def test_worker_killed_mid_shard_task_retried_elsewhere(tmp_path, api, cluster):
    reference_root = str(tmp_path / "reference")
    version = build(reference_root, CLIPS, SHARD)  # single process, in this process
    assert version == synthetic_recipe(CLIPS, SHARD, 0).version_id()

    root = str(tmp_path / "root")
    write_log = tmp_path / "writes.log"
    argv = [sys.executable, str(TESTS / "test_cluster_stage.py"), "--root", root, "--clips", str(CLIPS),
            "--shard-size", str(SHARD), "--delay", "1.5", "--write-log", str(write_log),
            "--dask-address", cluster.address]
    flow_log = open(tmp_path / "flow.log", "wb")
    flow = subprocess.Popen(argv, stdout=flow_log, stderr=subprocess.STDOUT, env=child_env())
    killed_shard, killed_pid = _kill_worker_mid_shard(cluster, root, version, flow)
    rc = flow.wait(timeout=FLOW_TIMEOUT_S)
    flow_log.close()
    output = (tmp_path / "flow.log").read_text()
    assert rc == 0, output[-4000:]
    assert output.strip().splitlines()[-1] == version

    survivors = set(cluster.worker_pids())
    assert killed_pid not in survivors and len(survivors) == 1
    reader = open_root(root)
    assert reader.exists(layout.target_dir(version), layout.MANIFEST)
    assert shard_checksums(root, version) == shard_checksums(reference_root, version)
    from foresight.storage.targets import TargetStore

    assert TargetStore(root).open(version).verify() == []
    # The killed shard was taken over (two acquisitions) and written once, by the survivor.
    assert held_generations(root, version, killed_shard) == 2
    writes = [line.split() for line in write_log.read_text().splitlines()]
    assert [int(pid) for shard, pid in writes if int(shard) == killed_shard] == list(survivors)
    assert written_shards(write_log) == list(range(CLIPS // SHARD))


def test_gpu_tasks_run_only_on_workers_declaring_a_gpu(tmp_path, api, cluster):
    from foresight.flows.runtime import run_flow

    gpu_cluster = DaskCluster(tmp_path / "gpu", n_workers=2, resources=[None, "GPU=1"])
    try:
        choice = RunnerChoice(dask_address=gpu_cluster.address)
        placed = run_flow(placement_flow, choice, devices=["cuda", "cuda:0", "cuda", "cpu", "cpu", "cpu"])
        assert placed[:3] == ["worker-1"] * 3  # only worker-1 declares a GPU
        assert set(placed[3:]) <= {"worker-0", "worker-1"}
    finally:
        gpu_cluster.stop()
    with pytest.raises(ValueError, match="no worker declares a 'GPU' resource"):
        run_flow(placement_flow, RunnerChoice(dask_address=cluster.address), devices=["cuda"])
