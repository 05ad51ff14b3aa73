"""``foresight run | serve | deploy``: the whole chain from one pipeline file, now or on a schedule.

- ``run PIPELINE.toml`` runs the chain in this process (embedded Prefect API unless
  ``PREFECT_API_URL`` points at a server) and prints what ran, what was skipped and how long.
- ``serve PIPELINE.toml`` registers a deployment of the chain on a Prefect server and executes
  its runs (triggered from the UI, the API, or a schedule) until stopped.
- ``deploy PIPELINE.toml --pool POOL`` registers a deployment for a work pool; any
  ``prefect worker start --pool POOL`` on a machine with this checkout runs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from foresight import checkout_top
from foresight.flows.cli.common import ROOT_OPTION, fail
from foresight.flows.cli.runner import runner_options
from foresight.flows.runtime import RunnerChoice

ENTRYPOINT = "foresight.flows.pipeline.pipeline_flow"
"""A module path, not a file path: the flow is imported as flows.pipeline, so its pydantic parameter
models are pickled by reference into the run's process (by value they fail to rebuild)."""
PIPELINE_ARGUMENT = typer.Argument(..., help="Pipeline file (TOML), see docs/DEPLOY.md.")
NAME_OPTION = typer.Option(None, "--name", help="Deployment name (default: the pipeline's name).")
CRON_OPTION = typer.Option(None, "--cron", help="Schedule as a cron string, e.g. '0 2 * * *'.")
INTERVAL_OPTION = typer.Option(None, "--interval", min=1, help="Schedule every N seconds.")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("serve")(serve)
    app.command("deploy")(deploy)


@runner_options
def run(pipeline: Path = PIPELINE_ARGUMENT, root: str = ROOT_OPTION,
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
        runner: RunnerChoice = None) -> None:
    """Run ingest -> plan -> text -> generate -> teachers -> export; finished stages are skipped."""
    from foresight.flows.pipeline import format_summary, load_pipeline, run_pipeline

    config = load_pipeline(pipeline)
    override = runner if runner != RunnerChoice() else None  # options given: they win over the file
    summary = run_pipeline(config, root=root, runner=override)
    typer.echo(json.dumps(summary.model_dump(mode="json"), indent=2) if as_json else format_summary(summary))


def _deployment_parameters(pipeline: Path, root: str | None) -> tuple[dict, str]:
    from foresight.flows.pipeline import load_pipeline

    config = load_pipeline(pipeline)
    return {"config": config.model_dump(mode="json", exclude_unset=True), "root_url": root}, config.name


def _require_server() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL")
    if not url:
        fail("a deployment lives on a Prefect server: start one (`prefect server start`) and set "
             "PREFECT_API_URL=http://HOST:4200/api")
    return url


def serve(pipeline: Path = PIPELINE_ARGUMENT, root: str = ROOT_OPTION, name: str = NAME_OPTION,
          cron: str = CRON_OPTION, interval: int = INTERVAL_OPTION) -> None:
    """Serve the chain as a deployment on the Prefect server at PREFECT_API_URL (blocks)."""
    from prefect.deployments.runner import EntrypointType

    from foresight.flows.pipeline import pipeline_flow

    url = _require_server()
    parameters, default_name = _deployment_parameters(pipeline, root)
    name = name or default_name
    typer.echo(f"serving deployment {pipeline_flow.name}/{name} on {url} (Ctrl-C to stop)")
    # A module-path entrypoint: runs import foresight.flows.pipeline, so its pydantic models unpickle by reference.
    pipeline_flow.serve(name=name, parameters=parameters, cron=cron, interval=interval, print_starting_message=False,
                        entrypoint_type=EntrypointType.MODULE_PATH)


def deploy(pipeline: Path = PIPELINE_ARGUMENT, pool: str = typer.Option(..., "--pool", help="Work pool name."),
           root: str = ROOT_OPTION, name: str = NAME_OPTION, cron: str = CRON_OPTION,
           interval: int = INTERVAL_OPTION) -> None:
    """Register the chain as a deployment for a work pool (created as a process pool if missing)."""
    from foresight.flows.deployments import deploy_pipeline

    url = _require_server()
    parameters, default_name = _deployment_parameters(pipeline, root)
    folder = deployment_folder()
    deployment_id = deploy_pipeline(folder, ENTRYPOINT, name or default_name, pool, parameters, cron, interval)
    typer.echo(f"deployment foresight-pipeline/{name or default_name} ({deployment_id}) on {url}, pool '{pool}'\n"
               f"run it: prefect deployment run 'foresight-pipeline/{name or default_name}'\n"
               f"execute runs: prefect worker start --pool {pool}  (in {folder})")


def deployment_folder() -> Path:
    """Where the deployment's runs start: foresight's own checkout when it runs from one; else
    (an installed wheel) the folder ``deploy`` is run in. The entrypoint is a module path, so a
    worker imports the foresight installed beside it; site-packages is never a project folder."""
    return checkout_top() or Path.cwd()
