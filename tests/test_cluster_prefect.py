"""Deployments on a real ``prefect server start`` (SQLite) on loopback: ``foresight serve`` serves
the pipeline, a run is triggered through the REST API and completes; ``foresight deploy``
registers the pipeline for a process work pool."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster_servers import child_env, shared_prefect_api, wait_until
from fixtures_sources import make_teleop_episode
from foresight.storage.targets import TargetStore

RUN_TIMEOUT_S = 400
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

PIPELINE = """
name = "served"
dataset = "toy"
[ingest]
kind = "teleop"
src = "{src}"
options = {{ fps = 10.0, instruction = "open the drawer" }}
[plan]
frames = 4
limit = 4
[text]
model = "tiny"
"""

pytestmark = pytest.mark.slow  # starts real servers; still part of `make test`


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    return shared_prefect_api(tmp_path_factory.getbasetemp())


def call(api: str, method: str, path: str, body: dict | None = None, attempts: int = 10) -> dict:
    """One REST call; a busy SQLite-backed server answers 503 at times, so those are retried."""
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(attempts):
        request = urllib.request.Request(f"{api}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            if err.code < 500 or attempt == attempts - 1:
                raise
            time.sleep(1)
    raise AssertionError("unreachable: the last attempt returns or raises")


def deployment(api: str, name: str) -> dict | None:
    try:
        return call(api, "GET", f"/deployments/name/foresight-pipeline/{name}")
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


def write_pipeline(tmp_path: Path) -> Path:
    src = tmp_path / "teleop"
    for index in range(2):
        make_teleop_episode(src / f"episode_{index}.hdf5", length=10, cameras=("cam_high",), size=(32, 32))
    path = tmp_path / "pipeline.toml"
    path.write_text(PIPELINE.format(src=src))
    return path


def foresight(args: list[str], api: str, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from foresight.flows.cli import main; main()", *args],
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=child_env(PREFECT_API_URL=api),
                            start_new_session=True)


def test_served_deployment_runs_when_triggered_through_the_api(tmp_path, api):
    pipeline = write_pipeline(tmp_path)
    root = tmp_path / "root"
    log_path = tmp_path / "serve.log"
    served = foresight(["serve", str(pipeline), "--root", str(root)], api, log_path)
    try:
        wait_until(lambda: deployment(api, "served") is not None, "served deployment", timeout_s=240)
        found = deployment(api, "served")
        assert found["entrypoint"] == "foresight.flows.pipeline.pipeline_flow"
        assert found["parameters"]["config"]["dataset"] == "toy"
        run = call(api, "POST", f"/deployments/{found['id']}/create_flow_run", {})
        deadline = time.monotonic() + RUN_TIMEOUT_S
        state = run["state"]["type"]
        while state not in TERMINAL and time.monotonic() < deadline and served.poll() is None:
            time.sleep(1)
            state = call(api, "GET", f"/flow_runs/{run['id']}")["state"]["type"]
        assert state == "COMPLETED", log_path.read_text(errors="replace")[-4000:]
    finally:
        served.send_signal(signal.SIGINT)
        try:
            served.wait(timeout=30)
        except subprocess.TimeoutExpired:
            served.kill()
    texts = TargetStore(str(root)).ids("text")
    assert len(texts) == 1 and TargetStore(str(root)).status(texts[0]) == "complete"


def test_deploy_registers_the_pipeline_on_a_process_pool(tmp_path, api):
    pipeline = write_pipeline(tmp_path)
    log_path = tmp_path / "deploy.log"
    proc = foresight(["deploy", str(pipeline), "--pool", "foresight-test", "--name", "nightly", "--cron",
                      "0 2 * * *", "--root", "s3://bucket/prefix"], api, log_path)
    assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, log_path.read_text(errors="replace")[-4000:]
    found = deployment(api, "nightly")
    assert found["work_pool_name"] == "foresight-test"
    assert found["entrypoint"] == "foresight.flows.pipeline.pipeline_flow"
    assert found["parameters"]["root_url"] == "s3://bucket/prefix"
    assert found["parameters"]["config"]["text"] == {"model": "tiny"}  # the file's own keys, as written
    assert [s["schedule"]["cron"] for s in found["schedules"]] == ["0 2 * * *"]
    assert call(api, "GET", "/work_pools/foresight-test")["type"] == "process"
