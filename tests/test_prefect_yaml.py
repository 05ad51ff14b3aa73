"""prefect.yaml as shipped: no example runs on a schedule, no site placeholder is deployed by
``prefect deploy --all``, the pull step names a folder rather than the deploying shell's $PWD,
and ``tiny-demo`` deployed from the file onto a real Prefect server (loopback, SQLite) runs to the
end on a process worker."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster_servers import BIN, REPO, child_env, shared_prefect_api
from foresight.storage.exports import ExportStore
from foresight.storage.targets import TargetStore

PREFECT_FILE = REPO / "prefect.yaml"
EXAMPLE_FILE = REPO / "docs" / "prefect-svam-calvin.yaml"
PULL_STEP = "prefect.deployments.steps.set_working_directory"
RUN_TIMEOUT_S = 540
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def test_examples_are_inactive_and_pull_into_a_documented_folder():
    shipped = yaml.safe_load(PREFECT_FILE.read_text())
    example = yaml.safe_load(EXAMPLE_FILE.read_text())
    assert [d["name"] for d in shipped["deployments"]] == ["tiny-demo"]  # what `prefect deploy --all` registers
    for spec in (shipped, example):
        for deployment in spec["deployments"]:
            assert all(schedule.get("active") is False for schedule in deployment.get("schedules", [])), \
                deployment["name"]
        (step,) = spec["pull"]
        directory = step[PULL_STEP]["directory"]
        assert directory.startswith("/") and "{{" not in directory  # not filled from the deploying shell
    assert "{{" not in PREFECT_FILE.read_text().split("deployments:", 1)[1]


def api_get(api: str, path: str) -> dict:
    with urllib.request.urlopen(f"{api}{path}", timeout=30) as response:
        return json.loads(response.read())


def prefect_cli(args: list[str], api: str, cwd: Path, log_path: Path, timeout: float = 300) -> None:
    with open(log_path, "ab") as log:
        code = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=cwd, env=child_env(PREFECT_API_URL=api),
                              stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
    assert code == 0, log_path.read_text(errors="replace")[-4000:]


def deploy_tiny_demo(tmp_path: Path, api: str, pool: str) -> Path:
    """Deploy tiny-demo from prefect.yaml; only the two site settings the header documents change:
    the pull folder (a temporary one here) and the pool name (one of this test's own)."""
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    workdir = tmp_path / "worker-folder"
    workdir.mkdir()
    spec["pull"][0][PULL_STEP]["directory"] = str(workdir)
    spec["deployments"][0]["work_pool"]["name"] = pool
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    log_path = tmp_path / "deploy.log"
    prefect_cli(["work-pool", "create", pool, "--type", "process"], api, tmp_path, log_path)
    prefect_cli(["deploy", "--prefect-file", str(prefect_file), "--name", "tiny-demo"], api, tmp_path, log_path)
    return workdir


def smaller(config: dict) -> dict:
    """tiny-demo's own config over less data (2 episodes, 4 clips instead of 6 and 12): every stage
    still runs, in a third of the time (the file's size took 8 min on a loaded 2-core box)."""
    config = json.loads(json.dumps(config))
    config["ingest"].update(tasks=config["ingest"]["tasks"][:2], episodes_per_task=1, size=64)
    config["plan"]["limit"] = 4
    return config


def run_with_worker(tmp_path: Path, api: str, pool: str, deployment: dict) -> str:
    """Create a flow run (the deployment's config over less data), start a process worker on the
    pool, wait for a terminal state."""
    parameters = {**deployment["parameters"], "config": smaller(deployment["parameters"]["config"])}
    request = urllib.request.Request(f"{api}/deployments/{deployment['id']}/create_flow_run", method="POST",
                                     data=json.dumps({"parameters": parameters}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        run_id = json.loads(response.read())["id"]
    log_path = tmp_path / "worker.log"
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                              cwd=tmp_path, env=child_env(PREFECT_API_URL=api, MUJOCO_GL="osmesa"),
                              stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        state = "SCHEDULED"
        while state not in TERMINAL and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(2)
            state = api_get(api, f"/flow_runs/{run_id}")["state"]["type"]
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=30)
    assert state == "COMPLETED", f"{state}:\n{log_path.read_text(errors='replace')[-4000:]}"
    return run_id


@pytest.mark.slow  # a real Prefect server and worker and the whole tiny chain: minutes on 2 cores
def test_tiny_demo_deployed_from_the_file_runs_on_a_process_worker(tmp_path):
    api = shared_prefect_api(tmp_path.parent)
    pool = "foresight-yaml-test"
    workdir = deploy_tiny_demo(tmp_path, api, pool)
    found = api_get(api, "/deployments/name/foresight-pipeline/tiny-demo")
    assert found["entrypoint"] == "foresight.flows.pipeline.pipeline_flow" and found["work_pool_name"] == pool
    assert found["pull_steps"] == [{PULL_STEP: {"directory": str(workdir)}}] and not found["schedules"]
    assert found["parameters"]["config"] == yaml.safe_load(PREFECT_FILE.read_text())["deployments"][0]["parameters"]["config"]
    run_with_worker(tmp_path, api, pool, found)
    root = workdir / "foresight-data"  # root_url null and no $FORESIGHT_ROOT: the pull folder's
    store = TargetStore(str(root))
    versions = store.ids()
    assert {v.split("-")[0] for v in versions} == {"text", "video", "teacher"}, versions
    assert all(store.status(v) == "complete" for v in versions), {v: store.status(v) for v in versions}
    assert len(ExportStore(str(root)).ids()) == 1
