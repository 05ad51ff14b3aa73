"""``foresight eval metaworld``: closed-loop evaluation of a trained policy in MetaWorld v3."""

from __future__ import annotations

import json
import logging
from typing import Literal

import typer

from foresight.flows.cli.common import ROOT_OPTION, get_root, sub_app, usage_value
from foresight.flows.cli.runner import runner_options
from foresight.flows.runtime import RunnerChoice

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    evals = sub_app(app, "eval", "Closed-loop evaluation of trained policies.")
    evals.command("metaworld")(runner_options(eval_metaworld))
    evals.command("calvin-check")(calvin_check)


def parse_seeds(text: str | None) -> list[int] | None:
    """'100,101,105' or '100-124' (inclusive) -> seeds; None stays None."""
    if not text:
        return None
    seeds: list[int] = []
    try:
        for part in text.split(","):
            first, sep, last = part.strip().partition("-")
            seeds.extend(range(int(first), int(last) + 1) if sep else [int(first)])
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected a comma list of seeds or ranges like 100-124") from None
    return seeds


def parse_versions(text: str | None) -> dict[str, str]:
    """'onestep=video-...,text=text-...' -> {field: version}."""
    pairs = {}
    for part in (text or "").split(","):
        if part.strip():
            field, sep, version = part.partition("=")
            if not sep or not field.strip() or not version.strip():
                raise ValueError(f"--versions {text!r}: expected FIELD=VERSION[,FIELD=VERSION]")
            pairs[field.strip()] = version.strip()
    return pairs


def eval_metaworld(
    run: str = typer.Option(None, "--run", help="Trainer run to evaluate: RUN or RUN/step-N (default: newest)."),
    policy: Literal["oracle", "random"] | None = typer.Option(None, "--policy",
                                                              help="A reference policy instead of a run."),
    tasks: str = typer.Option("easy", help="Comma list of tasks, or easy|medium|hard|very-hard|all."),
    episodes: int = typer.Option(25, min=1, help="Episodes per task."),
    seeds: str = typer.Option(None, help="Episode seeds, e.g. 100000-100024 (default: from 100000)."),
    camera: str = typer.Option(None, help="Camera (default: the run's training camera)."),
    size: int = typer.Option(None, help="Frame side in pixels (default: the run's training size)."),
    device: str = typer.Option("cpu", help="Torch device of the policy, e.g. cuda."),
    max_steps: int = typer.Option(None, "--max-steps", help="Cap of the per-task step limit (default 500)."),
    video: bool = typer.Option(False, "--video", help="Record an MP4 of the first episode(s) of every task."),
    video_episodes: int = typer.Option(1, "--video-episodes", min=1, help="Episodes per task recorded with --video."),
    execute: int = typer.Option(None, min=1, help="Actions of each chunk executed before re-planning (default: all)."),
    pi0_teacher: bool = typer.Option(False, "--pi0-teacher",
                                     help="Of a shallow-pi run, evaluate its π0 teacher instead of the student."),
    versions: str = typer.Option(None, help="FIELD=VERSION,... to use instead of the run's versions."),
    allow_version_change: bool = typer.Option(False, "--allow-version-change",
                                              help="Accept (and record) versions or weights other than the run's."),
    as_json: bool = typer.Option(False, "--json", help="Print the eval record as JSON."),
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Roll the policy out on MetaWorld v3 tasks; results go to evals/<id>/ (rerun: only missing episodes).

    ``--workers N`` runs episodes in N local processes (one rendering env each); ``--dask-local N`` or
    ``--dask-address`` spreads them over a Dask cluster."""
    from foresight.flows.eval import EvalConfig, eval_key, eval_metaworld_flow, format_table, resolve_policy
    from foresight.flows.runtime import run_flow
    from foresight.pipelines.ingest.metaworld import resolve_tasks

    if (run is None) == (policy is None):
        raise typer.BadParameter("name exactly one policy: --run RUN[/step-N] or --policy oracle|random")
    config = EvalConfig(policy=run or policy, tasks=usage_value(resolve_tasks, tasks), episodes=episodes,
                        seeds=usage_value(parse_seeds, seeds), camera=camera, size=size, device=device, max_steps=max_steps,
                        video=video_episodes if video else 0, versions=usage_value(parse_versions, versions),
                        allow_version_change=allow_version_change, execute=execute, pi0_teacher=pi0_teacher,
                        workers=runner.tasks)
    data_root = get_root(root, writable=True)
    eval_key(config, resolve_policy(data_root, config))  # refuse a bad run, versions or seeds before any rollout
    if not runner.uses_dask and runner.workers > 1:
        runner = RunnerChoice(workers=runner.workers, processes=True)  # one rendering env per process
    outcome = run_flow(eval_metaworld_flow, runner, data_root, root_url=data_root.url, config=config)
    if as_json:
        typer.echo(json.dumps(outcome.model_dump(mode="json"), indent=2))
        return
    typer.echo(format_table(outcome.record))
    typer.echo(f"{outcome.ran} episode(s) run, {outcome.skipped} already finished; record "
               f"{data_root.url_of('evals', outcome.record.eval_id)}; report {outcome.report}")



def calvin_check() -> None:
    """Check that CALVIN's simulator and evaluation packages are importable (README: CALVIN evaluation);
    prints the protocol foresight follows, or one line naming what to install."""
    from foresight.pipelines.eval.calvin import CHAIN_LENGTH, NUM_CHAINS, SUBTASK_STEPS, require_calvin_env

    require_calvin_env()
    typer.echo(f"calvin_env and calvin_agent are importable: protocol {NUM_CHAINS} chains x {CHAIN_LENGTH} "
               f"subtasks, {SUBTASK_STEPS} steps per subtask, reported as success@k and average length")
